"""train.refit (issue 20): after validation has chosen each phase's epochs, the recipe again from the model as built
on training + validation images, with real training, a real S3 server and the real CLI. The validation report is
the one of the model the choices were made with (bit for bit the run without the refit), the exported model is the
refit one, its phases train exactly the chosen epochs, and a run stopped in the refit resumes to the same weights."""

from __future__ import annotations

import json
import signal

import pytest
from conftest import BACKBONE, SIZE, run_cli, write_config
from test_fault_tolerance import Running

from job import recipe

pytestmark = pytest.mark.slow


def config(tmp_path, dataset, run_id, refit=True):
    return write_config(
        tmp_path / f"{run_id}.yaml", run_id=run_id,
        data={"uri": f"s3://{dataset}/data", "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / f"c-{run_id}")},
        model={"backbone": BACKBONE, "weights": f"s3://{dataset}/weights/base.weights.h5", "head_units": 16},
        train={"batch_size": 16, "head": {"epochs": 3}, "finetune": {"epochs": 4, "unfreeze": 10},
               "early_stopping_patience": 0, "search": {"learning_rates": []}, "refit": refit},
        output={"uri": f"s3://{dataset}/runs"}, metrics={"port": 0, "linger_seconds": 0},
        checkpoint={"every_seconds": 0, "lease_seconds": 6}, export={"formats": ["saved_model"]})


def get_json(s3, bucket, key):
    return json.loads(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def untimed(history: dict) -> dict:
    return {p: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rs]
            for p, rs in history.items()}


def outcome(s3, dataset, run_id) -> dict:
    return {name: get_json(s3, dataset, f"runs/{run_id}/{name}.json") for name in ("manifest", "history", "metrics")}


@pytest.fixture(scope="module")
def refitted(s3, dataset, tmp_path_factory):
    """One uninterrupted run with the refit: its artifacts and log."""
    out = run_cli("train", "--config", str(config(tmp_path_factory.mktemp("refit"), dataset, "refit-whole")),
                  env=s3.env())
    assert out.returncode == 0, out.stderr[-3000:]
    return outcome(s3, dataset, "refit-whole"), out.records()


def test_the_refit_trains_the_chosen_epochs_on_train_and_validation(s3, dataset, refitted, tmp_path):
    found, records = refitted
    history, manifest = found["history"], found["manifest"]
    plan = next(r for r in records if r["event"] == "refit started")
    # The epochs are each phase's best on validation (no early stopping here: every epoch ran).
    assert len(history["head"]) == 3 and len(history["finetune"]) == 4
    assert plan["head_epochs"] == recipe.best_epoch("val_loss", history["head"]) >= 1
    assert plan["finetune_epochs"] == recipe.best_epoch("val_loss", history["finetune"]) >= 1
    counts = manifest["dataset"]["counts"]
    assert plan["images"] == sum(counts["train"].values()) + sum(counts["validation"].values())
    # The refit's phases ran exactly those epochs, with nothing to validate on, and kept the last.
    assert [r["epoch"] for r in history["refit_head"]] == list(range(1, plan["head_epochs"] + 1))
    assert [r["epoch"] for r in history["refit"]] == list(range(1, plan["finetune_epochs"] + 1))
    assert not any("val_loss" in r for r in history["refit_head"] + history["refit"])
    assert manifest["refit"] == {k: plan[k] for k in ("head_epochs", "finetune_epochs", "learning_rate")}

    # The same run without the refit: the same validation report (the model the choices were made with), bit for
    # bit, and another exported model; the test split judges each run's own.
    plain = run_cli("train", "--config", str(config(tmp_path, dataset, "refit-off", refit=False)), env=s3.env())
    assert plain.returncode == 0, plain.stderr[-3000:]
    off = outcome(s3, dataset, "refit-off")
    assert off["metrics"]["validation"] == found["metrics"]["validation"]
    assert untimed(off["history"]) == untimed({p: history[p] for p in ("head", "finetune")})
    assert off["manifest"]["weights_sha256"] != manifest["weights_sha256"]
    assert off["manifest"]["refit"] == {}


@pytest.mark.parametrize("phase", ["refit_head", "refit"])
def test_a_run_stopped_in_the_refit_resumes_to_the_same_weights(s3, dataset, refitted, tmp_path, phase):
    """Stopped after the phase's first epoch: in the head's refit the base comes from the weights file again (so an
    uninterrupted refit that did not start from the model as built would differ), in the fine-tuning's refit the
    whole model from the checkpoint."""
    found, records = refitted
    plan = next(r for r in records if r["event"] == "refit started")
    assert plan["head_epochs" if phase == "refit_head" else "finetune_epochs"] >= 2  # so that the stop is inside
    cfg = config(tmp_path, dataset, f"refit-stopped-{phase}")
    job = Running(cfg, s3.env())
    job.wait_for(lambda r: r["event"] == "epoch done" and r.get("phase") == phase)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60) == 143, job.stderr[-2000:]
    again = run_cli("train", "--config", str(cfg), env=s3.env())
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = next(r for r in again.records() if r["event"] == "resuming from checkpoint")
    assert resumed["phase"] == phase
    stopped = outcome(s3, dataset, f"refit-stopped-{phase}")
    assert stopped["manifest"]["weights_sha256"] == found["manifest"]["weights_sha256"]
    assert untimed(stopped["history"]) == untimed(found["history"])
    assert stopped["metrics"]["validation"] == found["metrics"]["validation"]
