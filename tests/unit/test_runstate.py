"""The run state that checkpoints carry (job/runstate.py): transitions, JSON, and which config changes
a resumed run refuses. Pure logic."""

import json

from hypothesis import given
from hypothesis import strategies as st

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


def test_a_data_uri_with_or_without_its_last_slash_is_the_same_dataset():
    # `s3://b/data/` after `s3://b/data` was refused as a config change ("data.uri: ... -> ...").
    assert runstate.config_changes({"data.uri": "s3://b/data"}, {"data.uri": "s3://b/data/"}) == []
    assert runstate.config_changes({"data.uri": "/d//"}, {"data.uri": "/d"}) == []
    assert runstate.config_changes({"data.uri": "s3://b/data"}, {"data.uri": "s3://b/data2"}) == [
        "data.uri: 's3://b/data' -> 's3://b/data2'"]
    assert runstate.config_changes({"data.manifest": "m.csv"}, {"data.manifest": "m.csv/"}) != []


def test_a_new_state_starts_the_head_phase_from_nothing():
    state = RunState()
    assert (state.phase, state.epoch, state.step, state.sums) == ("head", 0, 0, [0.0, 0.0])
    assert (state.best, state.best_epoch, state.patience_used) == (None, 0, 0)
    assert state.history == {"head": [], "finetune": []} and state.config == {} and state.search == []
    assert state.refit == {} and state.classes == []
    other = RunState()
    other.sums[0] += 1.0
    other.history["head"].append({})
    assert state.sums == [0.0, 0.0] and state.history["head"] == []  # no mutable default is shared
    assert runstate.PHASES == ("head", "finetune")


def test_json_round_trip_keeps_every_field():
    state = RunState(phase="finetune", epoch=4, step=7, sums=[2.5, 3.0], best=[0.25, 0.75], best_epoch=3,
                     patience_used=1, history={"head": [{"epoch": 1, "loss": 0.5}], "finetune": []},
                     config={"train.seed": 3, "train.class_weight": {"a": 2.0}},
                     search=[{"learning_rate": 1e-4, "val_loss": 0.5, "val_accuracy": 0.75, "chosen": True}],
                     refit={"head_epochs": 2, "finetune_epochs": 5, "learning_rate": 3e-4, "validation": {"loss": 0.4}},
                     classes=["cat", "dog"], dataset="ab12", base="cd34", splits="ef56")
    text = state.to_json()
    assert json.loads(text) == {"phase": "finetune", "epoch": 4, "step": 7, "sums": [2.5, 3.0], "best": [0.25, 0.75],
                                "best_epoch": 3, "patience_used": 1,
                                "history": {"head": [{"epoch": 1, "loss": 0.5}], "finetune": []},
                                "config": {"train.seed": 3, "train.class_weight": {"a": 2.0}},
                                "search": [{"learning_rate": 1e-4, "val_loss": 0.5, "val_accuracy": 0.75,
                                            "chosen": True}],
                                "refit": {"head_epochs": 2, "finetune_epochs": 5, "learning_rate": 3e-4,
                                          "validation": {"loss": 0.4}}, "classes": ["cat", "dog"], "dataset": "ab12",
                                "base": "cd34", "splits": "ef56"}
    assert RunState.from_json(text) == state
    assert RunState.from_json("{}") == RunState()  # a checkpoint from before a field was kept reads with its default


def test_resumes_only_a_phase_that_has_started_work():
    assert not RunState(phase="head", epoch=0, step=0).resumes("head")
    assert RunState(phase="head", epoch=0, step=1).resumes("head")
    assert RunState(phase="head", epoch=1, step=0).resumes("head")
    assert not RunState(phase="head", epoch=1, step=1).resumes("finetune")
    assert not RunState(phase="trained", epoch=0, step=0).resumes("finetune")


def test_start_resets_the_phase_and_keeps_the_history():
    state = RunState(phase="head", epoch=3, step=2, sums=[1.0, 2.0], best=[0.5, 0.5], best_epoch=2, patience_used=1,
                     history={"head": [{"epoch": 1}], "finetune": []}, config={"k": 1})
    state.start("finetune")
    assert state == RunState(phase="finetune", history={"head": [{"epoch": 1}], "finetune": []}, config={"k": 1})


def test_add_step_sums_the_loss_and_the_correct_predictions():
    state = RunState(step=4, sums=[1.0, 2.0])
    state.add_step(0.5, 3.0)
    assert (state.step, state.sums) == (5, [1.5, 5.0])


def test_end_epoch_records_and_takes_the_epoch_from_the_record():
    state = RunState(phase="finetune", epoch=0, step=9, sums=[4.0, 5.0])
    assert state.end_epoch({"epoch": 1, "loss": 0.4}, (0.4, 0.5), "val_loss", 0, 10)
    assert state.history == {"head": [], "finetune": [{"epoch": 1, "loss": 0.4}]}
    assert (state.epoch, state.step, state.sums) == (1, 0, [0.0, 0.0])
    assert (state.best, state.best_epoch, state.patience_used) == ([0.4, 0.5], 1, 0)
    assert isinstance(state.best, list)  # JSON keeps lists; a tuple would not compare equal after a resume


def test_patience_counts_epochs_in_a_row_and_a_better_epoch_resets_it():
    state = RunState()
    state.start("head")
    assert state.end_epoch({"epoch": 1}, (1.0, 0.5), "val_loss", 2, 10)
    assert not state.end_epoch({"epoch": 2}, (1.0, 0.5), "val_loss", 2, 10)  # equal is not better
    assert (state.epoch, state.patience_used, state.best_epoch) == (2, 1, 1)
    assert state.end_epoch({"epoch": 3}, (0.9, 0.5), "val_loss", 2, 10)
    assert (state.epoch, state.patience_used, state.best, state.best_epoch) == (3, 0, [0.9, 0.5], 3)
    assert not state.end_epoch({"epoch": 4}, (0.95, 0.5), "val_loss", 2, 10)
    assert (state.epoch, state.patience_used) == (4, 1)  # one short of patience: goes on
    assert not state.end_epoch({"epoch": 5}, (0.95, 0.5), "val_loss", 2, 10)
    assert (state.epoch, state.patience_used) == (10, 2)  # patience used up: the phase's epochs are over
    assert state.best == [0.9, 0.5] and state.best_epoch == 3


def test_patience_one_stops_at_the_first_epoch_that_is_not_better():
    state = RunState()
    state.end_epoch({"epoch": 1}, (1.0, 0.5), "val_loss", 1, 7)
    assert not state.end_epoch({"epoch": 2}, (1.5, 0.5), "val_loss", 1, 7)
    assert (state.epoch, state.patience_used) == (7, 1)


def test_patience_zero_never_stops_early():
    state = RunState()
    state.end_epoch({"epoch": 1}, (1.0, 0.5), "val_loss", 0, 5)
    for epoch in (2, 3, 4):
        assert not state.end_epoch({"epoch": epoch}, (2.0, 0.1), "val_loss", 0, 5)
        assert state.epoch == epoch
    assert state.patience_used == 3 and state.best_epoch == 1


def test_finish_keeps_the_history_and_the_best():
    state = RunState(phase="finetune", epoch=4, step=3, best=[0.1, 0.9], best_epoch=2,
                     history={"head": [{"epoch": 1}], "finetune": [{"epoch": 1}]})
    state.finish()
    assert (state.phase, state.epoch, state.step) == ("trained", 0, 0)
    assert (state.best, state.best_epoch, state.history["finetune"]) == ([0.1, 0.9], 2, [{"epoch": 1}])


def test_flatten_joins_keys_with_dots_and_keeps_class_weights_whole():
    tree = {"a": 1, "b": {"c": 2, "d": {"e": None}}, "train": {"class_weight": {"cat": 2.0}, "seed": 0},
            "empty": {}}
    assert runstate.flatten(tree) == {"a": 1, "b.c": 2, "b.d.e": None, "train.class_weight": {"cat": 2.0},
                                      "train.seed": 0}
    assert runstate.flatten({"x": {"y": 1}}, "p.") == {"p.x.y": 1}


def test_training_config_drops_exactly_the_keys_safe_to_change():
    cfg = {"run_id": "r", "output": {"uri": "s3://o", "overwrite": False},
           "checkpoint": {"keep": 3}, "metrics": {"port": 9}, "s3": {"endpoint": "e"},
           "distribution": {"strategy": "auto"}, "export": {"formats": ["onnx"]},
           "data": {"uri": "s3://d", "cache_dir": "/c", "max_bad_fraction": 0.1, "max_image_pixels": 5,
                    "val_fraction": 0.2},
           "train": {"seed": 1, "head": {"epochs": 3}}}
    assert runstate.training_config(cfg) == {"data.uri": "s3://d", "data.val_fraction": 0.2, "train.seed": 1,
                                             "train.head.epochs": 3}


def test_the_searchs_other_keys_train_nothing_when_it_searches_nothing():
    # 0e14115 reset train.search.epochs to 3 beside a set rate, this version keeps it as written: a run begun by one
    # was refused by the other ("train.search.epochs: 3 -> 1"), and a complete one warned of "another config".
    off = [_training(**{"train.finetune.learning_rate": 3e-4, "train.search.epochs": e}) for e in (1, 3)]
    assert off[0] == off[1] and runstate.config_changes(*off) == []
    on = [_training(**{"train.search.learning_rates": "[1e-4, 3e-4]", "train.search.epochs": e}) for e in (1, 3)]
    assert runstate.config_changes(*on) == ["train.search.epochs: 1 -> 3"]  # it searches: they train


def test_only_the_epoch_budgets_may_grow():
    for key in ("train.head.epochs", "train.finetune.epochs"):
        assert runstate.config_changes({key: 3}, {key: 4}) == []
        assert runstate.config_changes({key: 3}, {key: 3}) == []
        assert runstate.config_changes({key: 3}, {key: 2}) == [f"{key}: 3 -> 2"]
        assert runstate.config_changes({key: 3}, {key: "4"}) == [f"{key}: 3 -> '4'"]
        assert runstate.config_changes({key: "3"}, {key: 4}) == [f"{key}: '3' -> 4"]
        assert runstate.config_changes({}, {key: 4}) == [f"{key}: None -> 4"]
    assert runstate.config_changes({"train.seed": 1}, {"train.seed": 2}) == ["train.seed: 1 -> 2"]
    assert runstate.config_changes({"train.batch_size": 8}, {"train.batch_size": 16}) == [
        "train.batch_size: 8 -> 16"]


def test_config_changes_are_sorted_and_name_keys_only_on_one_side():
    stored = {"b": 1, "a": "x", "same": [1]}
    current = {"c": 2, "a": "y", "same": [1]}
    assert runstate.config_changes(stored, current) == ["a: 'x' -> 'y'", "b: 1 -> None", "c: None -> 2"]
    assert runstate.config_changes({}, {}) == []


def test_a_refit_phase_gets_its_history_when_it_starts():
    state = RunState.from_json('{"phase": "finetune", "history": {"head": [], "finetune": [{"epoch": 1}]}}')
    state.start("refit_head")  # a checkpoint of an older run has no such key: it is added, the others kept
    assert state.history == {"head": [], "finetune": [{"epoch": 1}], "refit_head": []}
    state.end_epoch({"epoch": 1, "loss": 0.5}, (0.5, 0.8), "val_loss", patience=0, epochs=2)
    assert state.history["refit_head"] == [{"epoch": 1, "loss": 0.5}] and state.best_epoch == 1


NAMES = st.lists(st.text(st.characters(whitelist_categories=("Ll",)), min_size=1, max_size=4), min_size=1,
                 max_size=5, unique=True)


@given(stored=NAMES, current=NAMES)
def test_class_changes_say_what_moved_the_outputs(stored, current):
    said = runstate.class_changes(stored, current)
    assert (said == "") == (stored == current)
    for gone in set(stored) - set(current):
        assert gone in said.split("gone: ")[1].split(";")[0].split(", ")
    for new in set(current) - set(stored):
        assert new in said.split("new: ")[1].split(", ")
    if set(stored) == set(current) and stored != current:  # the same names in another order: other outputs too
        assert said == f"another order: {', '.join(stored)} -> {', '.join(current)}"
    assert runstate.class_changes([], current) == ""  # a checkpoint written before the classes were kept


@given(st.sampled_from(runstate.ORDER), st.integers(1, 5), st.integers(1, 5), st.integers(0, 3), st.integers(0, 3))
def test_epochs_may_grow_only_while_their_phase_is_under_way(phase, head, finetune, more_head, more_finetune):
    # A checkpoint past fine-tuning ("trained") resumed with train.finetune.epochs raised: nothing trained, and the
    # run ended with the old epochs while its config.yaml and model card said the new ones.
    state = RunState(phase=phase, config={"train.head.epochs": head, "train.finetune.epochs": finetune})
    current = {"train.head.epochs": head + more_head, "train.finetune.epochs": finetune + more_finetune}
    said = runstate.grown_after_done(state, current)
    head_done, finetune_done = phase != "head", phase not in ("head", "finetune")
    assert said == ([f"train.head.epochs: {head} -> {head + more_head}"] if head_done and more_head else []) + \
        ([f"train.finetune.epochs: {finetune} -> {finetune + more_finetune}"] if finetune_done and more_finetune
         else [])
    assert runstate.config_changes(state.config, current) == []  # growing stays allowed in itself
    # From scratch there is no head phase: the fine-tuning phase trains the head's epochs too.
    scratch = runstate.grown_after_done(state, {**current, "model.weights": "none"})
    assert scratch == ([f"train.head.epochs: {head} -> {head + more_head}"] if finetune_done and more_head else []) \
        + ([f"train.finetune.epochs: {finetune} -> {finetune + more_finetune}"] if finetune_done and more_finetune
           else [])


def test_the_curves_draw_a_history_whose_epochs_have_different_keys(tmp_path):
    # A multi-label run resumed across versions: some epochs have val_accuracy, others not, and the
    # export failed (KeyError) on every attempt after training. A non-finite value is null in history.json.
    from job import evaluate

    history = {"head": [{"epoch": 1, "loss": 0.9, "accuracy": 0.6, "val_loss": 0.8, "val_accuracy": 0.75},
                        {"epoch": 2, "loss": 0.7, "accuracy": 0.7, "val_loss": None},
                        {"epoch": 3, "loss": 0.6, "accuracy": 0.7, "val_loss": 0.7}],
               "finetune": [{"epoch": 1, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.8}]}
    evaluate.plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_of_one_id_into_two_outputs_get_their_own_local_folders():
    # Sharing data.cache_dir, they shared runs/<run_id>/: one's export deleted the other's (exit 1).
    from job import pipeline

    def folder(out: str):
        return pipeline._work_folder(config.load(None, ["data.uri=/d", f"output.uri={out}", "run_id=same",
                                                       "data.cache_dir=/c"], environ={}))

    assert folder("s3://b/outA") != folder("s3://b/outB")
    assert folder("s3://b/outA") == folder("s3://b/outA/")  # one output, one folder (an overwrite reuses its caches)
    assert str(folder("s3://b/outA")).startswith("/c/runs/same/")
