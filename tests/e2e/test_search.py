"""train.search and train.refit (issue 20): the fine-tuning rate chosen on validation inside the run by successive
halving, then the recipe again on training + validation images for the chosen epochs, with real training, a real S3
server and the real CLI. The continued trial is exactly what a run at its rate alone trains (the same weights, bit
for bit, the same epochs); the refit trains exactly the chosen epochs and keeps the chosen model's validation
report; a run stopped during the search, after its choice or in the refit and resumed ends with the uninterrupted
run's choice and weights."""

from __future__ import annotations

import json
import signal

import pytest
from conftest import BACKBONE, SIZE, run_cli, write_config
from test_fault_tolerance import Running

from job import recipe

pytestmark = pytest.mark.slow

RATES = [3.0e-5, 3.0e-3]  # far apart: the two trials train differently on the sample data
RUNG = 2  # train.search.epochs: each trial's epochs before the choice (the phase has 4)
HEAD_EPOCHS = 3


def config(tmp_path, dataset, run_id, search=True, learning_rate=None):
    finetune = {"epochs": 4, "unfreeze": 10, **({"learning_rate": learning_rate} if learning_rate else {})}
    return write_config(
        tmp_path / f"{run_id}.yaml", run_id=run_id,
        data={"uri": f"s3://{dataset}/data", "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / f"c-{run_id}")},
        model={"backbone": BACKBONE, "weights": f"s3://{dataset}/weights/base.weights.h5", "head_units": 16},
        train={"batch_size": 16, "head": {"epochs": HEAD_EPOCHS}, "early_stopping_patience": 0, "finetune": finetune,
               "refit": True, **({"search": {"learning_rates": RATES, "epochs": RUNG}} if search else {})},
        output={"uri": f"s3://{dataset}/runs"}, metrics={"port": 0, "linger_seconds": 0},
        checkpoint={"every_seconds": 0, "lease_seconds": 6}, export={"formats": ["saved_model"]})


def get_json(s3, bucket, key):
    return json.loads(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def untimed(history: dict) -> dict:
    return {p: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rs]
            for p, rs in history.items()}


def outcome(s3, dataset, run_id) -> tuple[dict, dict]:
    return (get_json(s3, dataset, f"runs/{run_id}/manifest.json") | {"validation": get_json(
        s3, dataset, f"runs/{run_id}/metrics.json")["validation"]},
            untimed(get_json(s3, dataset, f"runs/{run_id}/history.json")))


@pytest.fixture(scope="module")
def searched(s3, dataset, tmp_path_factory):
    """One uninterrupted run with the search: its manifest, history and log."""
    out = run_cli("train", "--config", str(config(tmp_path_factory.mktemp("search"), dataset, "search-whole")),
                  env=s3.env())
    assert out.returncode == 0, out.stderr[-3000:]
    return (*outcome(s3, dataset, "search-whole"), out.records())


def test_the_search_continues_the_best_trial_which_is_the_run_at_its_rate_alone(s3, dataset, searched, tmp_path):
    manifest, history, records = searched
    trials = manifest["search"]
    assert [t["learning_rate"] for t in trials] == RATES
    assert all(t["epochs"] == RUNG and 1 <= t["best_epoch"] <= RUNG for t in trials)
    assert trials[0]["val_loss"] != trials[1]["val_loss"], "the two rates should train differently"
    best = recipe.choose_trial("val_loss", trials)
    assert [t["chosen"] for t in trials] == [i == best for i in range(len(trials))]
    chosen = trials[best]
    started = [r for r in records if r["event"] == "search trial started"]
    assert [(r["trial"], r["learning_rate"]) for r in started] == [(1, RATES[0]), (2, RATES[1])]
    # The continued phase: all 4 epochs, its first RUNG the chosen trial's, whose best validation loss it reports.
    assert len(history["finetune"]) == 4
    assert min(r["val_loss"] for r in history["finetune"][:RUNG]) == chosen["val_loss"]
    card = s3.client.get_object(Bucket=dataset, Key="runs/search-whole/MODEL_CARD.md")["Body"].read().decode()
    assert f"fine-tuning learning rate **{chosen['learning_rate']:g}**, chosen on validation" in card

    # The same config at the chosen rate alone (setting the rate alone turns the search off): the same model.
    done = run_cli("train", "--config", str(config(tmp_path, dataset, "search-alone", search=False,
                                                   learning_rate=chosen["learning_rate"])), env=s3.env())
    assert done.returncode == 0, done.stderr[-3000:]
    alone, alone_history = outcome(s3, dataset, "search-alone")
    assert alone["search"] == []
    assert alone["weights_sha256"] == manifest["weights_sha256"]
    assert alone_history == history


def test_the_refit_trains_the_chosen_epochs_on_train_and_validation(searched):
    manifest, history, records = searched
    plan = next(r for r in records if r["event"] == "refit started")
    # Each phase's best epoch on validation (no early stopping here: every epoch ran), at the chosen rate.
    assert len(history["head"]) == HEAD_EPOCHS and len(history["finetune"]) == 4
    assert plan["head_epochs"] == recipe.best_epoch("val_loss", history["head"]) >= 2
    assert plan["finetune_epochs"] == recipe.best_epoch("val_loss", history["finetune"]) >= 1
    assert plan["learning_rate"] == next(t["learning_rate"] for t in manifest["search"] if t["chosen"])
    counts = manifest["dataset"]["counts"]
    assert plan["images"] == sum(counts["train"].values()) + sum(counts["validation"].values())
    # Exactly those epochs, with nothing to validate on (the last epoch's weights kept).
    assert [r["epoch"] for r in history["refit_head"]] == list(range(1, plan["head_epochs"] + 1))
    assert [r["epoch"] for r in history["refit"]] == list(range(1, plan["finetune_epochs"] + 1))
    assert not any("val_loss" in r for r in history["refit_head"] + history["refit"])
    assert manifest["refit"] == {k: plan[k] for k in ("head_epochs", "finetune_epochs", "learning_rate")}
    # The validation report is the chosen model's (its best epoch's loss), not the refit model's, which trained
    # on those images.
    best = history["finetune"][plan["finetune_epochs"] - 1]
    assert manifest["validation"]["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert manifest["validation"]["accuracy"] == pytest.approx(best["val_accuracy"])


def stop(cfg, env, predicate, says: str = "") -> list[dict]:
    """A run of `cfg` (resuming whatever it left) stopped with SIGTERM once `predicate(its log so far, a line)`, its
    error line saying `says`: its log."""
    job = Running(cfg, env)
    job.wait_for(lambda r: predicate(job.lines, r))
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60) == 143, job.stderr[-2000:]
    assert says in job.stderr, job.stderr[-2000:]
    return job.lines


def finetune_epochs(count: int):
    """The stop predicate: `count` fine-tuning epochs done, the search's trials included."""
    return lambda lines, _: sum(x["event"] == "epoch done" and x.get("phase") == "finetune" for x in lines) >= count


def resumed_from(records: list[dict]) -> dict:
    return next(r for r in records if r["event"] == "resuming from checkpoint")


def test_a_search_stopped_three_times_resumes_to_the_same_choice_and_weights(s3, dataset, searched, tmp_path):
    """Stopped in the search's second trial, resumed; stopped after its choice, resumed; stopped in the refit's head
    phase, where the base comes from the weights file again on resume (an uninterrupted refit that did not start
    from the model as built would end with other weights), resumed to the end: the uninterrupted run's choice,
    weights and history."""
    manifest, history, _ = searched
    cfg = config(tmp_path, dataset, "search-stopped")
    # in the second trial, whose stop claimed "checkpoint saved" (none is, before the search's choice)
    stop(cfg, s3.env(), finetune_epochs(RUNG + 1), says="in a train.search trial: the rerun starts the search again")

    # Nothing of the search is in storage before its choice: the rung runs again from the head's checkpoint.
    records = stop(cfg, s3.env(), finetune_epochs(2 * RUNG + 1))  # after the choice
    assert resumed_from(records)["phase"] == "head"
    assert [r["trial"] for r in records if r["event"] == "search trial started"] == [1, 2]

    records = stop(cfg, s3.env(), lambda _, r: r["event"] == "epoch done" and r.get("phase") == "refit_head")
    first = resumed_from(records)
    assert first["phase"] == "finetune" and first["epochs_done"] > RUNG
    assert not any(r["event"] == "search trial started" for r in records)

    again = run_cli("train", "--config", str(cfg), env=s3.env())
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = resumed_from(again.records())
    assert resumed["phase"] == "refit_head" and resumed["epochs_done"] >= 1
    stopped, stopped_history = outcome(s3, dataset, "search-stopped")
    assert stopped["search"] == manifest["search"]
    assert stopped["weights_sha256"] == manifest["weights_sha256"]
    assert stopped_history == history
    # The trials' local checkpoints are gone with the run's (an attempt stopped after the choice left one a rate).
    (work,) = (tmp_path / "c-search-stopped" / "runs" / "search-stopped").glob("output-*/worker-0")
    assert work.is_dir() and not (work / "search").exists()
