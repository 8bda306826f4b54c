"""The run state that checkpoints carry (job/runstate.py): transitions, JSON, and which config changes
a resumed run refuses. Pure logic."""

from job import config, runstate
from job.runstate import RunState


def test_transitions_and_json_round_trip():
    state = RunState(config={"train.seed": 1})
    assert not state.resumes("head")
    state.start("head")
    state.add_step(2.0, 1.0)
    state.add_step(1.0, 2.0)
    assert state.resumes("head") and not state.resumes("finetune")
    assert (state.step, state.sums) == (2, [3.0, 3.0])
    assert state.end_epoch({"epoch": 1, "loss": 1.5}, (0.9, 0.5), "val_loss", 2, 10)
    assert (state.epoch, state.step, state.sums, state.best_epoch) == (1, 0, [0.0, 0.0], 1)
    assert not state.end_epoch({"epoch": 2}, (1.0, 0.6), "val_loss", 2, 10)
    assert state.epoch == 2 and state.patience_used == 1
    assert not state.end_epoch({"epoch": 3}, (1.1, 0.7), "val_loss", 2, 10)
    assert state.epoch == 10  # patience used up: the phase's epochs are over
    again = RunState.from_json(state.to_json())
    assert again == state and [r["epoch"] for r in again.history["head"]] == [1, 2, 3]
    again.start("finetune")
    assert again.history["head"] and again.best is None and again.phase == "finetune"
    again.finish()
    assert (again.phase, again.epoch, again.step) == ("trained", 0, 0)


def test_val_accuracy_stops_on_accuracy_not_loss():
    state = RunState()
    state.start("finetune")
    state.end_epoch({"epoch": 1}, (0.5, 0.70), "val_accuracy", 3, 10)
    assert state.end_epoch({"epoch": 2}, (0.6, 0.75), "val_accuracy", 3, 10)  # worse loss, better accuracy
    assert state.best_epoch == 2


def _training(**sets) -> dict:
    cfg = config.load(None, ["data.uri=s3://b/d", "output.uri=s3://b/o", "run_id=r"]
                      + [f"{k}={v}" for k, v in sets.items()], environ={})
    return runstate.training_config(config.redacted(cfg))


def test_config_changes_name_the_keys_that_matter():
    base = _training(**{"train.finetune.epochs": 10, "train.finetune.unfreeze": "all"})
    assert "train.finetune.learning_rate" in base and "data.uri" in base
    assert not any(k.startswith(("output.", "metrics.", "checkpoint.", "distribution.")) for k in base)
    same = {"train.finetune.epochs": 10, "train.finetune.unfreeze": "all"}
    assert runstate.config_changes(base, _training(**same, **{"metrics.port": 0, "checkpoint.keep": 9,
                                                      "distribution.cpu_replicas": 2,
                                                      "data.cache_dir": "/elsewhere"})) == []
    # epochs added: fine; epochs removed or the recipe changed: refused, naming the keys
    assert runstate.config_changes(base, _training(**{**same, "train.finetune.epochs": 30})) == []
    changes = runstate.config_changes(base, _training(**{"train.finetune.epochs": 0,
                                                         "train.finetune.unfreeze": 5}))
    assert changes == ["train.finetune.epochs: 10 -> 0", "train.finetune.unfreeze: 'all' -> 5"]
    assert runstate.config_changes(base, _training(**same, **{"train.class_weight": "{a: 2}"})) == [
        "train.class_weight: 'auto' -> {'a': 2.0}"]
