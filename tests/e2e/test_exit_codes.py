"""Each documented exit code from the real console script: one clear line on stderr, no traceback."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import BACKBONE, SIZE, run_cli, write_config


def config(tmp_path, data_uri, out_uri, **extra):
    sections = {
        "data": {"uri": data_uri, "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / "cache")},
        "model": {"backbone": BACKBONE, "weights": "none", "head_units": 0},
        "train": {"batch_size": 8, "head": {"epochs": 1}, "finetune": {"epochs": 0}},
        "output": {"uri": out_uri},
        "metrics": {"port": 0, "linger_seconds": 0},
        "export": {"formats": ["saved_model"]},
    }
    for key, value in extra.items():
        sections.setdefault(key, {}).update(value) if isinstance(value, dict) else sections.update({key: value})
    return write_config(tmp_path / "c.yaml", **sections)


def assert_one_line(result, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("finetune-job: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ 2: invalid config or usage


def test_unknown_key_exits_2(tmp_path):
    cfg = config(tmp_path, "/nowhere", str(tmp_path / "out"))
    result = run_cli("train", "--config", str(cfg), "--set", "train.learning_rate=0.1")
    assert_one_line(result, 2, "train.learning_rate", "unknown key")


def test_wrong_type_from_environment_exits_2(tmp_path):
    cfg = config(tmp_path, "/nowhere", str(tmp_path / "out"))
    result = run_cli("validate", "--config", str(cfg), env={"FINETUNE_TRAIN__BATCH_SIZE": "lots"})
    assert_one_line(result, 2, "train.batch_size")


def test_unfreeze_larger_than_base_exits_2_before_staging(tmp_path, sample_data, base_weights):
    # A pre-trained base: with `weights: none` (from scratch) every layer trains and unfreeze does not apply.
    cfg = config(tmp_path, str(sample_data), str(tmp_path / "out"), model={"weights": str(base_weights)},
                 train={"finetune": {"epochs": 1, "unfreeze": 5000}})
    result = run_cli("train", "--config", str(cfg))
    assert_one_line(result, 2, "train.finetune.unfreeze", "5000 is more than the")
    assert not (tmp_path / "out").exists()


def test_missing_config_file_exits_2(tmp_path):
    assert_one_line(run_cli("train", "--config", str(tmp_path / "missing.yaml")), 2, "not found")


@pytest.mark.parametrize("command", ["validate", "train"])
def test_class_weight_naming_a_class_the_data_lacks_exits_2(tmp_path, sample_data, command):
    # `validate` passes exactly what `train` would refuse: both read the classes and check the weights.
    cfg = config(tmp_path, str(sample_data), str(tmp_path / "out"), train={"class_weight": {"circel": 2.0}})
    assert_one_line(run_cli(command, "--config", str(cfg)), 2, "train.class_weight", "circel")


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_cache_dir_that_cannot_be_written_exits_2(tmp_path, sample_data, command):
    # A file where a folder is needed (a read-only root file system fails alike): one line, not a traceback.
    (tmp_path / "a-file").write_text("x")
    cfg = config(tmp_path, str(sample_data), str(tmp_path / "out"), data={"cache_dir": str(tmp_path / "a-file/c")})
    assert_one_line(run_cli(command, "--config", str(cfg)), 2, "data.cache_dir", "a-file/c cannot be written")


# ------------------------------------------------------------------ 3: data errors


def test_missing_train_folder_exits_3(tmp_path, s3):
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="ds/validation/a/x.png", Body=b"x")
    cfg = config(tmp_path, f"s3://{bucket}/ds", f"s3://{bucket}/out")
    # Python's import profile on stderr: the job's pipeline loaded, TensorFlow never did (the listing fails first,
    # in about a second).
    result = run_cli("train", "--config", str(cfg), env={**s3.env(), "PYTHONPROFILEIMPORTTIME": "1"})
    assert_one_line(result, 3, "no train/ folder", f"s3://{bucket}/ds")
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "job.pipeline" in imported and "tensorflow" not in imported and "keras" not in imported


def test_a_class_folder_that_train_lacks_exits_3_and_a_split_lacking_one_is_a_warning(tmp_path, sample_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    shutil.move(data / "test" / "square", data / "test" / "squares")
    cfg = config(tmp_path, str(data), str(tmp_path / "out"))
    assert_one_line(run_cli("validate", "--config", str(cfg)), 3, "test/", "missing square; not in train/: squares")
    # test/ without the class (a rare class kept for training): it runs, and its test scores do not measure it
    shutil.rmtree(data / "test" / "squares")
    out = run_cli("validate", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "warning: no test images of 1 class(es): the test scores do not measure them: square" in out.stderr
    test_counts = {row.split()[0]: int(row.split()[-1]) for row in out.stdout.splitlines()[1:]}
    assert test_counts["square"] == 0 and test_counts["circle"] > 0


def test_too_many_bad_images_exits_3(tmp_path, sample_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    for i in range(5):
        (data / "train" / "circle" / f"broken{i}.png").write_bytes(b"\x89PNG broken")
    cfg = config(tmp_path, str(data), str(tmp_path / "out"))
    assert_one_line(run_cli("train", "--config", str(cfg)), 3, "5 of 125 images are bad", "cannot be decoded",
                    "data.max_bad_fraction")


# ------------------------------------------------------------------ 4: storage errors


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_storage_exits_4_quickly(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = config(tmp_path, "s3://bucket/ds", "s3://bucket/out", s3={"endpoint_url": endpoint})
    t0 = time.monotonic()
    result = run_cli("train", "--config", str(cfg), env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
                     timeout=90)
    assert time.monotonic() - t0 < 60
    assert_one_line(result, 4, "storage unreachable")


def test_missing_bucket_exits_4(tmp_path, s3):
    cfg = config(tmp_path, "s3://no-such-bucket-xyz/ds", "s3://no-such-bucket-xyz/out")
    assert_one_line(run_cli("validate", "--config", str(cfg), env=s3.env()), 4, "bucket does not exist")


def test_incomplete_run_without_checkpoints_is_redone_not_refused(tmp_path, s3, sample_data, base_weights):
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="out/r1/model.keras", Body=b"half")  # a crash before any checkpoint
    cfg = config(tmp_path, str(sample_data), f"s3://{bucket}/out", run_id="r1",
                 model={"weights": str(base_weights)})
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "out/r1/_SUCCESS" in s3.keys(bucket)
    assert s3.client.get_object(Bucket=bucket, Key="out/r1/model.keras")["Body"].read() != b"half"


@pytest.mark.parametrize("command", ["train", "validate"])
def test_error_is_also_a_log_record(tmp_path, command):
    cfg = config(tmp_path, str(tmp_path / "empty"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    result = run_cli(command, "--config", str(cfg))
    assert_one_line(result, 3, f"nothing under {tmp_path / 'empty'}: no such folder or prefix, or an empty one")
    assert any(r.get("level") == "error" and r.get("exit_code") == 3 for r in result.records())


@pytest.fixture
def auth_checking_s3():
    """A second S3 server process that checks credentials (moto's IAM auth on from the first request)."""
    import os
    import subprocess
    import sys
    import urllib.request

    port = _closed_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def test_access_denied_exits_4(tmp_path, auth_checking_s3):
    cfg = config(tmp_path, "s3://bucket/ds", "s3://bucket/out", s3={"endpoint_url": auth_checking_s3})
    unknown_key = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN", "AWS_SECRET_ACCESS_KEY": "x"}
    result = run_cli("validate", "--config", str(cfg), env=unknown_key, timeout=90)
    assert_one_line(result, 4, "access denied", "s3://bucket/ds")
