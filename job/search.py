"""`train.search`: the fine-tuning learning rate chosen on validation inside the run.

A plain script fine-tunes at one rate because trying several costs a person's time; the job tries each rate of
`train.search.learning_rates` as a whole fine-tuning phase (early stopping included) from the same start: the
head's weights, the same order of training images and the same dropout draws. The trial with the best validation
score under `train.early_stopping_metric` is the model (ties: the earlier rate); its epochs are the fine-tuning
phase's history, and every trial, with its scores, goes into the manifest and the model card.

Reproducible: a trial is a deterministic function of the start, so the same seed gives the same choice and the same
weights. Resumable: after each trial a checkpoint holds the start, the best trial's weights so far and the trials'
scores (job/runstate.py `search`); a run stopped inside a trial runs that trial again from the start, which gives
exactly what it would have given. Without validation data there is nothing to choose on: no search.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from job import logs, recipe, signals
from job.runstate import RunState

log = logs.get()


def rates(cfg, has_validation: bool) -> list[float]:
    """The rates to try: none when there is one or none configured, or no validation data to choose on."""
    chosen = list(cfg.train.search.learning_rates)
    if len(chosen) > 1 and not has_validation:
        log.warning("train.search skipped: no validation split to choose on; fine-tuning at "
                    "train.finetune.learning_rate", learning_rate=cfg.train.finetune.learning_rate)
        return []
    return chosen if len(chosen) > 1 else []


class _NoCheckpoints:
    """A trial's own checkpoints: none (a stopped trial is run again from its start)."""

    def save(self, state, **objects) -> None:
        pass

    def restore(self, **objects) -> None:
        raise RuntimeError("a search trial does not resume")


def run(run, make_phase: Callable[[float], object], learning_rates: list[float]) -> None:
    """Try every rate (those not tried yet), then the soup; leave the chosen weights in the model and the best
    trial's epochs as the fine-tuning phase's, finished (`state.phase` "finetune", every epoch done)."""
    from job import loop

    model, state, cluster = run.parts.model, run.state, run.cluster
    variables = model.variables  # weights, moving statistics and dropout's random state: a trial's whole start
    with cluster.strategy.scope():  # each trial's best weights, kept for the choice and the soup
        kept = [[tf.Variable(v.value, trainable=False) for v in variables] for _ in learning_rates]
    if state.phase == "search":
        run.ckpt.restore(weights=model, rng=loop.random_states(model), trials=kept)
    else:
        state.phase, state.search, state.soup = "search", [], None
    start = [v.numpy() for v in variables]
    options = dataclasses.replace(run.options, metrics_file="")  # Katib hears the chosen trial's epochs only
    for i in range(len(state.search), len(learning_rates)):
        rate = learning_rates[i]
        log.info("search trial started", learning_rate=rate, trial=i + 1, trials=len(learning_rates))
        trial = RunState(phase="finetune", history={"finetune": []})
        try:
            loop.run_phase(make_phase(rate), cluster, run.cfg.train.batch_size, options, _NoCheckpoints(), trial)
        except signals.Preempted:
            _assign(variables, start)
            _save(run, state, kept)
            raise
        result = {"learning_rate": rate, "epochs": len(trial.history["finetune"]), "best_epoch": trial.best_epoch,
                  **dict(zip(("val_loss", _second(options)), trial.best)), "history": trial.history["finetune"]}
        for copy, variable in zip(kept[i], variables):
            copy.assign(variable.value)
        state.search.append(result)
        log.info("search trial done", **{k: v for k, v in result.items() if k != "history"})
        _assign(variables, start)
        _save(run, state, kept)
    chosen = recipe.choose_trial(options.metric, state.search)
    winner = state.search[chosen]
    _assign(variables, [v.value() for v in kept[chosen]])
    log.info("search chose", learning_rate=winner["learning_rate"], trial=chosen + 1,
             **{k: winner[k] for k in ("val_loss", _second(options)) if k in winner})
    if run.cfg.train.search.soup:
        _soup(make_phase(winner["learning_rate"]).validate, variables, kept, winner, state, options)
    state.phase, state.history["finetune"] = "finetune", winner["history"]
    state.epoch, state.best_epoch = max(1, len(winner["history"])), winner["best_epoch"]


def _soup(validate, variables, kept, winner: dict, state: RunState, options) -> None:
    """The uniform average of every trial's weights (a "model soup": fine-tuned from the same start, the trials lie
    in one basin), kept instead of the best trial only when it scores better on validation."""
    trainable = {id(v) for v in variables if v.trainable}
    chosen = [v.numpy() for v in variables]
    for n, variable in enumerate(variables):
        if id(variable) in trainable:
            variable.assign(sum(copy[n].numpy() for copy in kept) / len(kept))
    scores = validate()
    state.soup = {"val_loss": scores["val_loss"], _second(options): scores[_second(options)]}
    state.soup["chosen"] = recipe.choose_trial(options.metric, [winner, state.soup]) == 1
    if not state.soup["chosen"]:
        _assign(variables, chosen)
    log.info("search soup", **state.soup)


def _second(options) -> str:
    return "val_map" if options.multi_label else "val_accuracy"


def _assign(variables, values) -> None:
    for variable, value in zip(variables, values):
        variable.assign(value)


def _save(run, state: RunState, kept) -> None:
    from job import loop

    run.ckpt.save(state, weights=run.parts.model, rng=loop.random_states(run.parts.model), trials=kept)


def summary(state: RunState, metric: str) -> list[dict]:
    """The trials as the manifest and the model card show them: rate, scores, epochs, and which was kept."""
    chosen = recipe.choose_trial(metric, state.search) if state.search else -1
    if state.soup and state.soup["chosen"]:
        chosen = -1
    trials = [{**{k: v for k, v in t.items() if k != "history"}, "chosen": i == chosen}
              for i, t in enumerate(state.search)]
    return trials + ([{"learning_rate": "soup", **state.soup}] if state.soup else [])
