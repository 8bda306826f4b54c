"""`train.search`: the fine-tuning learning rate chosen on validation inside the run, by successive halving.

A plain script fine-tunes at one rate because trying several costs a person's time. The job starts a fine-tuning
phase at each rate of `train.search.learning_rates`, all from the same start (the head's weights, the same order
of training images, the same dropout draws), runs each for `train.search.epochs` epochs (the rung), and continues
only the one with the best validation score so far under `train.early_stopping_metric` (ties: the earlier rate),
from exactly where it paused: its weights, optimizer, moving average and best epoch. The others cost a rung each.
The trials' scores go into the run state, the manifest and the model card.

Reproducible: a trial is a deterministic function of its start, so the same seed gives the same choice and the
same weights, and the continued trial is bit for bit the run at its rate alone. Resumable: the trials pause into
this worker's local folder; once the choice is made, the continued phase checkpoints to storage like any other.
A run stopped before the choice resumes from the head's checkpoint and runs the rung again (the same result).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from job import logs, recipe
from job.errors import ConfigError
from job.runstate import RunState

log = logs.get()


def rates(cfg, has_validation: bool) -> list[float]:
    """The rates to try: none when one or none is configured, or without validation data to choose on."""
    chosen = list(cfg.train.search.learning_rates)
    if len(chosen) == 1 and chosen[0] != cfg.train.finetune.learning_rate:  # ignored without a word, as documented
        log.warning("train.search.learning_rates holds one rate: no search, and fine-tuning at "
                    "train.finetune.learning_rate, not at it; set that key to fine-tune at another rate",
                    listed=chosen[0], learning_rate=cfg.train.finetune.learning_rate)
    if len(chosen) > 1 and not has_validation:
        log.warning("train.search skipped: no validation split to choose on; fine-tuning at "
                    "train.finetune.learning_rate", learning_rate=cfg.train.finetune.learning_rate)
        return []
    return chosen if len(chosen) > 1 else []


class _Local:
    """One trial's pause: its objects in a local folder (every worker its own). With `then`, a restored trial's
    later checkpoints go there (the run's own, in storage) instead."""

    def __init__(self, folder: Path, then=None):
        self.folder, self.then = folder, then
        # what a stop inside a trial keeps: its pause is local to this pod (the message claimed a checkpoint)
        self.on_stop = "checkpoint saved" if then is not None else \
            "in a train.search trial: the rerun starts the search again from the head's last checkpoint"

    def save(self, state, **objects) -> None:
        if self.then is not None:
            return self.then.save(state, **objects)
        self.folder.mkdir(parents=True, exist_ok=True)
        tf.train.Checkpoint(**objects).write(str(self.folder / "trial"))

    def restore(self, **objects) -> None:
        tf.train.Checkpoint(**objects).read(str(self.folder / "trial")).expect_partial()


def run(run, make_phase: Callable[..., object], learning_rates: list[float], rung: int,
        replay: Callable[[dict], None]) -> None:
    """Every rate for `rung` epochs, then the best continued with the run's checkpoints to the phase's end:
    `run.state` is then the continued trial's, with `search` holding every trial's scores at the rung. The
    chosen trial's paused epochs go to `replay` (TensorBoard, Katib) before it continues."""
    from job import loop

    model, cluster, batch, options = run.parts.model, run.cluster, run.cfg.train.batch_size, run.options
    quiet = dataclasses.replace(options, metrics_file="")  # Katib's file hears the chosen trial only
    phases = [make_phase(rate, pause_after=rung) for rate in learning_rates]
    # weights, moving statistics and the random states of dropout and augmentation: a trial's whole start
    variables = model.variables + (phases[0].augment.variables if phases[0].augment is not None else [])
    start = [v.numpy() for v in variables]
    folder = run.work / "search"
    shutil.rmtree(folder, ignore_errors=True)
    trials, results, reuse = [], [], loop.Reuse()  # one traced step for every trial
    for i, (rate, phase) in enumerate(zip(learning_rates, phases)):
        log.info("search trial started", learning_rate=rate, trial=i + 1, trials=len(learning_rates),
                 epochs=min(rung, phase.epochs))  # a phase shorter than the rung ends the trial first
        for variable, value in zip(variables, start):
            variable.assign(value)
        trial = RunState(phase="finetune", history={"finetune": []})
        loop.run_phase(phase, cluster, batch, quiet, _Local(folder / str(i)), trial, reuse)
        trials.append(trial)
        results.append({"learning_rate": rate, "epochs": len(trial.history["finetune"]),
                        "best_epoch": trial.best_epoch, **dict(zip(("val_loss", _second(run)), trial.best))})
        log.info("search trial paused", **results[-1])
    chosen = recipe.choose_trial(options.metric, results)
    if recipe.diverged(results[chosen]):  # every trial: its NaN weights were continued, or exported as complete
        raise ConfigError(f"training diverged: every train.search trial has val_loss {results[chosen]['val_loss']} "
                          f"(learning rates {', '.join(f'{r:.3g}' for r in learning_rates)}); lower "
                          "train.search.learning_rates, under a new run_id (the head phase's checkpoints hold this "
                          "recipe, and a resume refuses another)")
    for i, r in enumerate(results):
        r["chosen"] = i == chosen
    log.info("search chose", **{k: v for k, v in results[chosen].items() if k != "chosen"}, trial=chosen + 1)
    winner = trials[chosen]
    state = run.state
    state.phase, state.epoch, state.step, state.sums = "finetune", winner.epoch, winner.step, winner.sums
    state.best, state.best_epoch, state.patience_used = winner.best, winner.best_epoch, winner.patience_used
    state.history["finetune"], state.search = winner.history["finetune"], results
    for record in state.history["finetune"]:
        replay(record)
    # The continued trial builds its own trainer (one trace more): with the trials' one, restored from its pause,
    # deleting its input iterator at the phase's end stalled for 4 to 14 s in 5 of 7 demo runs (the destructor waits
    # on a tf.data thread of the numpy_function reader; never without the reuse, 0 of 6).
    loop.run_phase(make_phase(results[chosen]["learning_rate"], on_epoch=True), cluster, batch, options,
                   _Local(folder / str(chosen), then=run.ckpt), state)
    shutil.rmtree(folder, ignore_errors=True)


def _second(run) -> str:
    return "val_map" if run.multi else "val_accuracy"


def chosen_rate(state: RunState) -> float | None:
    """The rate the search chose (a resumed run continues at it), or None without a search."""
    return next((t["learning_rate"] for t in state.search if t["chosen"]), None)
