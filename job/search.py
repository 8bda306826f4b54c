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
    """Try every rate (those not tried yet); leave the best trial's weights in the model and its epochs as the
    fine-tuning phase's, finished (`state.phase` "finetune", every epoch done)."""
    from job import loop

    model, state, cluster = run.parts.model, run.state, run.cluster
    variables = model.variables  # weights, moving statistics and dropout's random state: a trial's whole start
    with cluster.strategy.scope():
        best = [tf.Variable(v.value, trainable=False) for v in variables]
    if state.phase == "search":
        run.ckpt.restore(weights=model, rng=loop.random_states(model), chosen=best)
    else:
        state.phase, state.search = "search", []
    start = [v.numpy() for v in variables]
    options = dataclasses.replace(run.options, metrics_file="")  # Katib hears the chosen trial's epochs only
    for rate in learning_rates[len(state.search):]:
        log.info("search trial started", learning_rate=rate, trial=len(state.search) + 1, trials=len(learning_rates))
        trial = RunState(phase="finetune", history={"finetune": []})
        try:
            loop.run_phase(make_phase(rate), cluster, run.cfg.train.batch_size, options, _NoCheckpoints(), trial)
        except signals.Preempted:
            _assign(variables, start)
            _save(run, state, best)
            raise
        result = {"learning_rate": rate, "epochs": len(trial.history["finetune"]), "best_epoch": trial.best_epoch,
                  **dict(zip(("val_loss", _second(options)), trial.best)), "history": trial.history["finetune"]}
        if better(options.metric, result, state.search):
            for copy, variable in zip(best, variables):
                copy.assign(variable.value)
        state.search.append(result)
        log.info("search trial done", **{k: v for k, v in result.items() if k != "history"})
        _assign(variables, start)
        _save(run, state, best)
    chosen = recipe.choose_trial(options.metric, state.search)
    for variable, copy in zip(variables, best):
        variable.assign(copy.value())
    winner = state.search[chosen]
    state.phase, state.history["finetune"] = "finetune", winner["history"]
    state.epoch, state.best_epoch = max(1, len(winner["history"])), winner["best_epoch"]
    log.info("search chose", learning_rate=winner["learning_rate"], trial=chosen + 1,
             **{k: winner[k] for k in ("val_loss", _second(options)) if k in winner})


def _second(options) -> str:
    return "val_map" if options.multi_label else "val_accuracy"


def better(metric: str, result: dict, earlier: list[dict]) -> bool:
    """Whether `result` beats every earlier trial (it becomes the one kept)."""
    return not earlier or recipe.choose_trial(metric, [*earlier, result]) == len(earlier)


def _assign(variables, values) -> None:
    for variable, value in zip(variables, values):
        variable.assign(value)


def _save(run, state: RunState, best) -> None:
    from job import loop

    run.ckpt.save(state, weights=run.parts.model, rng=loop.random_states(run.parts.model), chosen=best)


def summary(state: RunState, metric: str) -> list[dict]:
    """The trials as the manifest and the model card show them: rate, scores, epochs, and which was kept."""
    chosen = recipe.choose_trial(metric, state.search) if state.search else -1
    return [{**{k: v for k, v in t.items() if k != "history"}, "chosen": i == chosen}
            for i, t in enumerate(state.search)]
