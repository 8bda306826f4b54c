"""train.search (issue 20): the fine-tuning rate chosen on validation inside the run, with real training, a real S3
server and the real CLI. The chosen trial is exactly what a run at its rate alone trains (the same weights, bit for
bit), and a run stopped in the middle of the search and resumed ends with the uninterrupted run's choice and weights."""

from __future__ import annotations

import json
import signal

import pytest
from conftest import SIZE, run_cli, write_config
from test_fault_tolerance import Running

from job import recipe

pytestmark = pytest.mark.slow

RATES = [3.0e-5, 3.0e-3]  # far apart: the two trials train differently on the sample data


def config(tmp_path, dataset, run_id, train=None, soup=True):
    return write_config(
        tmp_path / f"{run_id}.yaml", run_id=run_id,
        data={"uri": f"s3://{dataset}/data", "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / f"c-{run_id}")},
        model={"backbone": "mobilenet_v2", "weights": f"s3://{dataset}/weights/base.weights.h5", "head_units": 16},
        train={"batch_size": 16, "head": {"epochs": 2}, "early_stopping_patience": 0,
               "finetune": {"epochs": 3, "unfreeze": 10}, "search": {"learning_rates": RATES, "soup": soup},
               **(train or {})},
        output={"uri": f"s3://{dataset}/runs"}, metrics={"port": 0, "linger_seconds": 0},
        checkpoint={"every_seconds": 0, "lease_seconds": 6}, export={"formats": ["saved_model"]})


def _unchosen(trial: dict) -> dict:
    return {k: v for k, v in trial.items() if k != "chosen"}


def get_json(s3, bucket, key):
    return json.loads(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def untimed(history: dict) -> dict:
    return {p: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rs]
            for p, rs in history.items()}


def searched_run(s3, dataset, tmp, run_id, soup):
    """An uninterrupted run with the search: its manifest, history and output."""
    out = run_cli("train", "--config", str(config(tmp, dataset, run_id, soup=soup)), env=s3.env())
    assert out.returncode == 0, out.stderr[-3000:]
    return (get_json(s3, dataset, f"runs/{run_id}/manifest.json"), get_json(s3, dataset, f"runs/{run_id}/history.json"),
            out)


@pytest.fixture(scope="module")
def searched(s3, dataset, tmp_path_factory):
    """The defaults' search: the trials, then their average (the soup)."""
    return searched_run(s3, dataset, tmp_path_factory.mktemp("search"), "search-whole", soup=True)


def test_the_search_keeps_the_best_trial_which_is_a_run_at_its_rate_alone(s3, dataset, searched, tmp_path):
    manifest, history, out = searched_run(s3, dataset, tmp_path, "search-nosoup", soup=False)
    trials = manifest["search"]
    # The same trials as with the soup: it comes after them and changes none.
    assert [_unchosen(t) for t in trials] == [_unchosen(t) for t in searched[0]["search"][:-1]]
    assert [t["learning_rate"] for t in trials] == RATES
    assert all(t["epochs"] == 3 and 1 <= t["best_epoch"] <= 3 for t in trials)
    assert trials[0]["val_loss"] != trials[1]["val_loss"], "the two rates should train differently"
    best = recipe.choose_trial("val_loss", trials)
    assert [t["chosen"] for t in trials] == [i == best for i in range(len(trials))]
    chosen = trials[best]
    # The fine-tuning history is the chosen trial's; its best epoch's validation loss is the trial's score.
    assert min(r["val_loss"] for r in history["finetune"]) == chosen["val_loss"]
    assert any(r["event"] == "search chose" and r["learning_rate"] == chosen["learning_rate"] for r in out.records())
    card = s3.client.get_object(Bucket=dataset, Key="runs/search-nosoup/MODEL_CARD.md")["Body"].read().decode()
    assert f"- the model: the trial at **{chosen['learning_rate']:g}**" in card

    # The same config at the chosen rate, without a search (setting the rate alone turns it off): the same model.
    alone = config(tmp_path, dataset, "search-alone", train={"finetune": {
        "epochs": 3, "unfreeze": 10, "learning_rate": chosen["learning_rate"]}, "search": None})
    text = alone.read_text().replace("  search: null\n", "")
    alone.write_text(text)
    done = run_cli("train", "--config", str(alone), env=s3.env())
    assert done.returncode == 0, done.stderr[-3000:]
    other = get_json(s3, dataset, "runs/search-alone/manifest.json")
    assert other["search"] == []
    assert other["weights_sha256"] == manifest["weights_sha256"]
    assert untimed(get_json(s3, dataset, "runs/search-alone/history.json")) == untimed(history)


def test_the_soup_is_the_average_of_the_trials_kept_only_when_better_on_validation(s3, dataset, searched):
    manifest, _, out = searched
    *trials, soup = manifest["search"]
    assert soup["learning_rate"] == "soup" and set(soup) == {"learning_rate", "val_loss", "val_accuracy", "chosen"}
    best = trials[recipe.choose_trial("val_loss", trials)]
    assert soup["chosen"] == (soup["val_loss"] < best["val_loss"])
    assert [t["chosen"] for t in trials] == [not soup["chosen"] and t is best for t in trials]
    metrics = get_json(s3, dataset, "runs/search-whole/metrics.json")
    kept = soup if soup["chosen"] else best  # the model evaluated is the one kept: its validation loss
    assert metrics["validation"]["loss"] == pytest.approx(kept["val_loss"], rel=1e-5)


def test_a_run_stopped_in_the_second_trial_resumes_to_the_same_choice_and_weights(s3, dataset, searched, tmp_path):
    manifest, history, _ = searched
    cfg = config(tmp_path, dataset, "search-stopped")
    job = Running(cfg, s3.env())
    job.wait_for(lambda r: r["event"] == "search trial started" and r["trial"] == 2)
    # Trial 1's three epochs, then the first of trial 2's: two epochs left to stop in.
    job.wait_for(lambda r: sum(x["event"] == "epoch done" and x.get("phase") == "finetune" for x in job.lines) >= 4)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60) == 143, job.stderr[-2000:]
    saved = [r for r in job.lines if r["event"] == "checkpoint saved"][-1]
    assert saved["phase"] == "search"
    again = run_cli("train", "--config", str(cfg), env=s3.env())
    assert again.returncode == 0, again.stderr[-3000:]
    records = again.records()
    assert next(r for r in records if r["event"] == "resuming from checkpoint")["phase"] == "search"
    # Only the interrupted trial runs again; the first one's result came from the checkpoint.
    assert [r["trial"] for r in records if r["event"] == "search trial started"] == [2]
    resumed = get_json(s3, dataset, "runs/search-stopped/manifest.json")
    assert resumed["search"] == manifest["search"]
    assert resumed["weights_sha256"] == manifest["weights_sha256"]
    assert untimed(get_json(s3, dataset, "runs/search-stopped/history.json")) == untimed(history)
