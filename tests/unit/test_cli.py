"""The CLI surface: fast --help without TensorFlow, --version, commands listed."""

import hashlib
import json
import re
import subprocess
import sys

import pytest
from conftest import CLI
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import job
from job.cli import app

PURE = ["job.cli", "job.config", "job.layout", "job.errors", "job.backbones", "job.storage", "job.pipeline",
        "job.metrics", "job.logs", "job.evaluate", "job.distribute", "job.recipe", "job.runstate", "job.files",
        "job.lease", "job.predict"]


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "validate", "predict"):
        assert command in result.output


def test_each_command_has_help():
    for command in ("train", "validate", "predict"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and ("--config" in result.output or "--model" in result.output)


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"finetune-job {job.__version__}"


@pytest.mark.parametrize(("argv", "said"), [
    (["train", "--bogus"], "No such option: --bogus (see finetune-job train --help)"),
    (["train"], "Missing option '--config' / '-c'. (see finetune-job train --help)"),
    (["predict", "--model", "m", "--top-k", "0", "a.png"],
     "Invalid value for '--top-k' / '-k': Input should be greater than or equal to 1 "
     "(see finetune-job predict --help)"),
    (["bogus"], "No such command 'bogus'. (see finetune-job --help)"),
])
def test_usage_errors_are_one_line_exit_2(argv, said):
    # They were a box of four lines and more (CONTRACT section 7: one clear line), then one line without the `error`
    # log record every other error has (a shipper alerting on level=error saw none). predict's records go to stderr.
    result = subprocess.run([sys.executable, "-m", "job", *argv], capture_output=True, text=True, timeout=60)
    records, other = (result.stderr, result.stdout) if argv[0] == "predict" else (result.stdout, "")
    (record,) = [json.loads(line) for line in records.splitlines() if line.startswith("{")]
    assert (record["level"], record["event"], record["exit_code"]) == ("error", said, 2)
    assert (result.returncode, other) == (2, "")
    assert [line for line in result.stderr.splitlines() if not line.startswith("{")] == [f"finetune-job: error: {said}"]


def test_pure_modules_and_help_import_no_tensorflow():
    code = f"import sys; import {', '.join(PURE)}; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    code = ("import sys; from job.cli import app; sys.argv=['finetune-job', '--help']\n"
            "try: app()\nexcept SystemExit: pass\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_console_script_and_module_entry_points():
    for argv in ([CLI, "--version"], [sys.executable, "-m", "job", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"finetune-job {job.__version__}"


def test_validate_escapes_only_look_alike_names_in_its_table(capsys):
    # `circle ` beside `circle` print alike: escaped; a name merely decomposed (macOS) and alone is shown as it is.
    from job.cli import _print_counts
    from job.layout import Layout

    names = ["cafe\u0301", "circle", "circle "]
    _print_counts(Layout(names, {"train": {c: [f"train/{i}/1.jpg"] for i, c in enumerate(names)}}))
    rows = capsys.readouterr().out.splitlines()[1:4]
    assert [row.split("  ")[0] for row in rows] == ["cafe\u0301", "circle", "'circle '"]


def test_top_k_caps_a_multilabel_images_labels_above_their_thresholds():
    # --top-k was ignored for multi-label runs without a word: `-k 1` still printed every label above threshold.
    import numpy as np

    from job.predict import _result

    scores, above = np.array([0.9, 0.2, 0.95, 0.7]), np.array([True, False, True, True])
    labels = ["a", "b", "c", "d"]
    every = _result("x.png", (scores, above), labels, None, multi=True)
    assert [x["label"] for x in every["labels"]] == ["c", "a", "d"] and len(every["scores"]) == 4
    assert [x["label"] for x in _result("x.png", (scores, above), labels, 1, multi=True)["labels"]] == ["c"]
    probabilities = np.array([0.1, 0.2, 0.3, 0.4])
    assert [x["label"] for x in _result("x.png", probabilities, labels, None, multi=False)["top"]] == ["d", "c", "b"]
    assert [x["label"] for x in _result("x.png", probabilities, labels, 1, multi=False)["top"]] == ["d"]


def test_tied_scores_are_listed_in_label_order_as_the_models_own_label_names_them():
    # int8's uint8 probabilities tie (6 of 291 images in a probe): predict printed `square 0.395, circle 0.395`
    # where the SavedModel's `label` (argmax: the first of the tied) and metrics.json said circle.
    import numpy as np

    from job.predict import _result

    labels = ["a", "b", "c", "d"]
    tied = np.array([0.1, 0.4, 0.1, 0.4], np.float32)
    assert [x["label"] for x in _result("x.png", tied, labels, None, multi=False)["top"]] == ["b", "d", "a"]
    assert _result("x.png", tied, labels, 1, multi=False)["top"][0]["label"] == labels[int(tied.argmax())]
    above = np.array([True, True, False, True])
    assert [x["label"] for x in _result("x.png", (tied, above), labels, None, multi=True)["labels"]] == ["b", "d", "a"]


LINE_ENTRY = re.compile(r'("(?:[^"\\]|\\.)*"|[^,"]*?) (\d\.\d{3})(?:, |$)')
LABEL = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12)


@given(st.lists(LABEL, min_size=1, max_size=4, unique=True), st.booleans())
def test_predicts_line_reads_back_as_the_labels_it_printed(labels, multi):
    # A class `Zeta, "z"` printed as `Zeta, "z" 0.847, alpha 0.069`: no reader could tell where an entry ended.
    from job.cli import _shown

    if multi:
        result = {"labels": [{"label": x, "score": 0.5} for x in labels]}
    else:
        result = {"top": [{"label": x, "probability": 0.25} for x in labels]}
    line = _shown(result)
    entries = LINE_ENTRY.findall(line)
    assert "".join(f"{label} {p}, " for label, p in entries)[:-2] == line
    assert [json.loads(x) if x.startswith('"') else x for x, _ in entries] == labels


def test_a_model_that_is_no_run_says_where_the_runs_are(tmp_path):
    # Each was "not a complete run (no _SUCCESS)" alone, after TensorFlow's import (10 s).
    import pytest

    from job.errors import ConfigError, StorageError
    from job.predict import fetched_run

    for run in ("r1", "r2"):
        (tmp_path / "runs" / run / "saved_model").mkdir(parents=True)
        (tmp_path / "runs" / run / "_SUCCESS").write_text("")
    said = {}
    (tmp_path / "runs" / "r1" / "model.keras").write_text("")
    for model in ("nope", "runs", "runs/r1/saved_model", "runs/r1/model.keras"):
        with pytest.raises(StorageError) as e, fetched_run(str(tmp_path / model)):
            pass
        said[model] = str(e.value)
    assert said["nope"].endswith("not a complete run (no _SUCCESS): no such folder")
    assert said["runs"].endswith(f"; it holds 2 complete run(s) (r1, r2): give one, e.g. --model {tmp_path}/runs/r1")
    assert said["runs/r1/saved_model"].endswith(f"; it is inside the run {tmp_path}/runs/r1: give that folder")
    assert said["runs/r1/model.keras"].endswith(": a file, not a run's folder")
    # A format the run was not exported as is usage (exit 2), naming the ones it has; it was a storage error (4).
    (tmp_path / "runs" / "r1" / "manifest.json").write_text(json.dumps(
        {"files": {}, "formats": {"saved_model": {"accuracy": 1.0}, "onnx": {"accuracy": 1.0}}}))
    with pytest.raises(ConfigError) as e, fetched_run(str(tmp_path / "runs" / "r1"), fmt="tflite"):
        pass
    assert str(e.value) == f"--format tflite: the run {tmp_path}/runs/r1 was not exported as tflite (it was as: " \
                           "saved_model, onnx)"
    # One whose export failed is not among them: its error is named.
    (tmp_path / "runs" / "r1" / "manifest.json").write_text(json.dumps(
        {"files": {}, "formats": {"saved_model": {"accuracy": 1.0}, "onnx": {"error": "onnx: conversion failed"}}}))
    with pytest.raises(ConfigError) as e, fetched_run(str(tmp_path / "runs" / "r1"), fmt="onnx"):
        pass
    assert str(e.value).endswith("(it was as: saved_model; onnx failed: onnx: conversion failed)")
    # A listed file that is gone is said to be missing ("does not match the manifest's checksum" misled).
    (tmp_path / "runs" / "r1" / "labels.txt").write_text("a\nb\n")
    labels_sha = hashlib.sha256(b"a\nb\n").hexdigest()
    for sha, said in ((labels_sha, "saved_model/saved_model.pb: missing (the manifest lists it)"),
                      ("0" * 64, "labels.txt: does not match the manifest's checksum")):
        (tmp_path / "runs" / "r1" / "manifest.json").write_text(json.dumps(
            {"files": {"labels.txt": {"bytes": 4, "sha256": sha},
                       "saved_model/saved_model.pb": {"bytes": 1, "sha256": "0" * 64}}}))
        with pytest.raises(StorageError) as e, fetched_run(str(tmp_path / "runs" / "r1")):
            pass
        assert str(e.value) == f"{tmp_path}/runs/r1/{said}"
    # A file of the artifact that the manifest does not list (a manifest edited to drop a corrupted one): it was
    # loaded unchecked, a traceback (DataLossError, exit 1).
    pb = tmp_path / "runs" / "r1" / "saved_model" / "saved_model.pb"
    pb.write_bytes(b"pb")
    (pb.parent / "variables").mkdir()
    (pb.parent / "variables" / "variables.data-00000-of-00001").write_bytes(b"corrupted")
    (pb.parent / ".DS_Store").write_bytes(b"a copy's")  # hidden: not the model's
    (pb.parent / ".ipynb_checkpoints").mkdir()
    (pb.parent / ".ipynb_checkpoints" / "x.pb").write_bytes(b"a notebook's")
    (tmp_path / "runs" / "r1" / "manifest.json").write_text(json.dumps(
        {"files": {"labels.txt": {"bytes": 4, "sha256": labels_sha},
                   "saved_model/saved_model.pb": {"bytes": 2, "sha256": hashlib.sha256(b"pb").hexdigest()}}}))
    with pytest.raises(StorageError) as e, fetched_run(str(tmp_path / "runs" / "r1")):
        pass
    assert str(e.value) == (f"{tmp_path}/runs/r1/saved_model/variables/variables.data-00000-of-00001: not in the "
                            "manifest, so it cannot be checked; remove it if it is a stray file, else export the run "
                            "again")
    (pb.parent / "variables" / "variables.data-00000-of-00001").unlink()
    with fetched_run(str(tmp_path / "runs" / "r1")) as folder:  # every file listed and matching: fetched
        assert folder == tmp_path / "runs" / "r1"
    # No manifest, a cut one, or one that is no run's: a traceback (FileNotFoundError, JSONDecodeError), exit 1.
    manifest = tmp_path / "runs" / "r1" / "manifest.json"
    for body, said in ((None, "manifest.json: missing, so the run's files cannot be checked"),
                       ('{"files": {"labels.txt', "manifest.json: unreadable (JSONDecodeError)"),
                       ("[1, 2]", "manifest.json: not a run's manifest")):
        manifest.unlink(missing_ok=True)
        if body is not None:
            manifest.write_text(body)
        with pytest.raises(StorageError) as e, fetched_run(str(tmp_path / "runs" / "r1")):
            pass
        assert str(e.value).startswith(f"{tmp_path}/runs/r1/{said}"), str(e.value)
    code = "import sys, job.predict, job.files; print('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip() == "False"  # the run is checked before TensorFlow loads


def test_an_image_uri_naming_only_a_bucket_says_so():
    # `s3://odd` was read as the local file `s3:/odd`: "No such file or directory", exit 4.
    import pytest

    from job.errors import ConfigError
    from job.predict import read_image

    for uri in ("s3://odd", "s3://odd/"):
        with pytest.raises(ConfigError, match=f"^{uri}: names a bucket, not an image"):
            read_image(uri)


def test_a_run_refused_by_a_live_attempts_lease_reports_no_failure_to_its_group(tmp_path, monkeypatch):
    # The refused attempt pushed "failed" into the live attempt's Pushgateway group (the same job and run_id): the
    # failure alert fired for a healthy run.
    import pytest
    import typer

    from job import cli, logs, metrics, pipeline
    from job.errors import LeaseHeld, StorageError

    finished = []
    # (logs.setup would bind structlog to this test's captured stdout, and later tests of the worker print nowhere)
    monkeypatch.setattr(logs, "setup", lambda *a, **kw: None)
    monkeypatch.setattr(metrics, "start", lambda **kw: None)
    monkeypatch.setattr(metrics, "finish", lambda success, **kw: finished.append((success, kw)))
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{uri: {tmp_path}/d}}\noutput: {{uri: {tmp_path}/o}}\nrun_id: r1\n")
    monkeypatch.setattr(metrics, "is_owned", lambda: False)  # (failed before taking the lease)
    for error, push in ((LeaseHeld("run r1 is being written by another run"), False),
                        (StorageError("storage unreachable"), True)):
        def train(cfg, error=error):
            raise error

        monkeypatch.setattr(pipeline, "train", train)
        with pytest.raises(typer.Exit) as e:
            cli.train(config, None)
        assert e.value.exit_code == 4 and finished[-1] == (False, {"preempted": False, "push": push})
    # Failed before it took the lease (its dataset listing, exit 3) while a live attempt holds it: it pushed
    # "failed" into that attempt's group, FinetuneJobFailed fired on a healthy run and its counters went to 0.
    from job.errors import DataError

    monkeypatch.setattr(pipeline, "train", lambda cfg: (_ for _ in ()).throw(DataError("no train/ folder")))
    (tmp_path / "o" / "r1").mkdir(parents=True)
    (tmp_path / "o" / "r1" / "_LEASE").write_text("{}")  # renewed just now
    with pytest.raises(typer.Exit) as e:
        cli.train(config, None)
    assert e.value.exit_code == 3 and finished[-1] == (False, {"preempted": False, "push": False})
    # A dead attempt's lease (not renewed for a renewal interval, 30 s of the default 180) is no live attempt's: the
    # failure is pushed (the group kept the dead pod's "running", and FinetuneJobFailed never fired).
    import os
    import time

    os.utime(tmp_path / "o" / "r1" / "_LEASE", (time.time() - 100, time.time() - 100))
    with pytest.raises(typer.Exit):
        cli.train(config, None)
    assert finished[-1] == (False, {"preempted": False, "push": True})
    os.utime(tmp_path / "o" / "r1" / "_LEASE")
    monkeypatch.setattr(metrics, "is_owned", lambda: True)  # its own lease: its failure is the run's
    with pytest.raises(typer.Exit):
        cli.train(config, None)
    assert finished[-1] == (False, {"preempted": False, "push": True})


def test_an_expected_error_inside_a_tf_data_generator_keeps_its_exit_code_and_line(tmp_path, monkeypatch, capsys):
    # A streamed shard that cannot be read (connection lost 5 times, rewritten, cut) raised its StorageError or
    # DataError inside tf.data's generator; TensorFlow passed it on as an UnknownError: exit 1, "unexpected error"
    # with the generator's traceback in the message.
    import pytest
    import tensorflow as tf
    import typer

    from job import cli, errors, logs, metrics, pipeline
    from job.errors import StorageError

    monkeypatch.setattr(logs, "setup", lambda *a, **kw: None)
    monkeypatch.setattr(metrics, "start", lambda **kw: None)
    monkeypatch.setattr(metrics, "finish", lambda success, **kw: None)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{uri: {tmp_path}/d}}\noutput: {{uri: {tmp_path}/o}}\nrun_id: r1\n")

    def shard():
        e = StorageError("reading s3://b/d/shard-000003.tar: connection lost 5 times, last at byte 9")
        errors.carry(e)
        raise e
        yield

    def train(cfg):
        for _ in tf.data.Dataset.from_generator(shard, output_signature=tf.TensorSpec([], tf.int32)):
            pass

    monkeypatch.setattr(pipeline, "train", train)
    capsys.readouterr()
    with pytest.raises(typer.Exit) as e:
        cli.train(config, None)
    err = capsys.readouterr().err
    assert e.value.exit_code == 4
    assert err == "finetune-job: error: reading s3://b/d/shard-000003.tar: connection lost 5 times, last at byte 9\n"
    # Shards are read several at a time: another's error carried after it is not the one TensorFlow reports.
    errors.carry(StorageError("reading s3://b/d/shard-000004.tar: rewritten during the run"))
    reported = tf.errors.UnknownError(None, None, "StorageError: reading s3://b/d/shard-000003.tar: connection lost "
                                                  "5 times, last at byte 9\nTraceback ...")
    assert str(errors.carried(reported)).startswith("reading s3://b/d/shard-000003.tar")
    assert errors.carried(ValueError("reading s3://b/d/shard-000003.tar")).__class__ is ValueError  # not TensorFlow's


NAME = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@given(NAME)
def test_predicts_line_names_an_image_so_that_it_reads_back(image):
    # A file named `new<LF>line.png` printed over two lines; `colon: x.png` read as the image `colon`.
    from job.cli import _name

    shown = _name(image)
    assert "\n" not in shown and "\r" not in shown and ": " not in (shown if not shown.startswith('"') else "")
    assert (json.loads(shown) if shown.startswith('"') else shown) == image


def test_an_s3_prefix_or_pattern_given_as_an_image_says_so(s3):
    # Both were "NoSuchKey: The specified key does not exist", exit 4, once the model had loaded.
    import pytest

    from job.errors import ConfigError
    from job.predict import check_images, read_image

    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="imgs/a.png", Body=b"x")
    with pytest.raises(ConfigError, match=f"^s3://{bucket}/imgs/: cannot read image \\(a prefix: name its image "):
        check_images([f"s3://{bucket}/imgs/"])  # before TensorFlow loads
    said = {}
    for name in ("imgs", "imgs/*.png", "imgs/b.png"):
        with pytest.raises(ConfigError) as e:
            read_image(f"s3://{bucket}/{name}", s3.endpoint)
        said[name] = str(e.value).removeprefix(f"s3://{bucket}/{name}: cannot read image (")
    assert said == {"imgs": f"a prefix: name its image objects, e.g. s3://{bucket}/imgs/x.jpg)",
                    "imgs/*.png": "no such object; s3:// URIs are not patterns: name each object)",
                    "imgs/b.png": "no such object)"}
    assert read_image(f"s3://{bucket}/imgs/a.png", s3.endpoint) == b"x"


def test_log_lines_on_a_file_or_a_pipe_carry_no_colour_codes(tmp_path):
    # predict's records on stderr (its console renderer without --json) were coloured in a file: ESC[2m...
    import io

    import structlog

    from job import logs

    stream, was = io.StringIO(), structlog.get_config()
    try:
        logs.setup(json=False, stream=stream)
        structlog.get_logger().warning("a record")
    finally:  # as it was: set up again, structlog would print to this test's captured stdout in later tests
        structlog.configure(**was)
    assert "a record" in stream.getvalue() and "\x1b[" not in stream.getvalue()


def test_predict_checks_the_side_files_it_reads_against_the_manifest(tmp_path):
    # A stray thresholds.json in a single-label run made predict read it as multi-label (KeyError 'scores', exit 1);
    # a manifest edited to drop labels.txt had a reordered labels.txt read unchecked (a circle printed "triangle").
    import hashlib

    import pytest

    from job.errors import StorageError
    from job.predict import fetched_run

    run = tmp_path / "r1"
    (run / "saved_model").mkdir(parents=True)
    (run / "saved_model" / "saved_model.pb").write_bytes(b"pb")
    (run / "labels.txt").write_text("a\nb\n")
    (run / "_SUCCESS").write_text("")

    def listed(*rels: str) -> None:
        files = {r: {"sha256": hashlib.sha256((run / r).read_bytes()).hexdigest()} for r in rels}
        (run / "manifest.json").write_text(json.dumps({"files": files, "formats": {"saved_model": {}}}))

    listed("saved_model/saved_model.pb", "labels.txt")
    with fetched_run(str(run)) as folder:
        assert folder == run
    (run / "thresholds.json").write_text("{}")
    with pytest.raises(StorageError, match="thresholds.json: not in the manifest"), fetched_run(str(run)):
        pass
    (run / "thresholds.json").unlink()
    listed("saved_model/saved_model.pb")
    with pytest.raises(StorageError, match="does not list labels.txt"), fetched_run(str(run)):
        pass


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(capsys):
    # pack and predict install no handler: Ctrl-C was "unexpected error: KeyboardInterrupt", a traceback, exit 1.
    import pytest
    import typer

    from job.cli import _fail

    with pytest.raises(typer.Exit) as e:
        _fail(KeyboardInterrupt())
    assert e.value.exit_code == 130 and capsys.readouterr().err == "finetune-job: interrupted\n"


def test_pack_and_predict_stop_on_sigterm_and_ctrl_c_through_their_cleanup(tmp_path):
    # A SIGTERM left pack's partial shard (up to 256 MB) or predict's model copy in /tmp, without a word; Ctrl-C was
    # a traceback. Both now raise Preempted where the command runs: its `with` blocks clean up, and _fail says one line.
    import os
    import signal
    import tempfile

    import pytest
    import typer

    from job.cli import _fail, _stop_on_signals
    from job.errors import Preempted

    saved = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    try:
        _stop_on_signals()
        for number, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            with pytest.raises(Preempted) as e, tempfile.TemporaryDirectory(dir=tmp_path, prefix="finetune-job-"):
                os.kill(os.getpid(), number)  # (Python runs the handler before the next line)
                pytest.fail("not stopped")
            assert e.value.exit_code == code and not list(tmp_path.iterdir())  # its temporary folder removed
            with pytest.raises(typer.Exit) as done:
                _fail(e.value)
            assert done.value.exit_code == code
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_a_stop_is_a_warning_record_and_an_unexpected_error_one_line():
    # A preemption is not a failure (run_status "preempted"), but its record was level=error: an alert on errors paged
    # for every preemption and node drain. An unexpected error's message of two lines printed two lines.
    code = """
import sys, typer
from job import cli, logs
from job.errors import Preempted
logs.setup(json=True)
for exc in (Preempted("stopped by SIGTERM in finetune epoch 1"), ValueError("boom\\nsecond line")):
    try:
        cli._fail(exc)
    except typer.Exit as e:
        print("exit", e.exit_code)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["level"], r["exit_code"]) for r in records] == [("warning", 143), ("error", 1)]
    assert "exit 143" in result.stdout and "exit 1" in result.stdout
    assert result.stderr.splitlines() == ["finetune-job: error: stopped by SIGTERM in finetune epoch 1",
                                          "finetune-job: unexpected error: ValueError: boom second line"]


def test_a_signal_after_pack_or_predict_is_done_changes_nothing():
    # A SIGTERM just after `pack` had written everything raised from the handler in the closing line or at shutdown:
    # a traceback (exit 1), or exit 0 with "Exception ignored".
    # The command ends at once with the exit code it would have had (not ignored: a hung shutdown stays stoppable).
    code = """
import os, signal, sys
from job import cli
cli._stop_on_signals()
cli._done(int(sys.argv[1]))
print("packed 3 images")
os.kill(os.getpid(), signal.SIG{})
print("not reached")
"""
    for name in ("TERM", "INT"):
        for done in (0, 3):  # (predict: 3 where an image was not decodable)
            result = subprocess.run([sys.executable, "-c", code.format(name), str(done)], capture_output=True,
                                    text=True, timeout=60)
            assert (result.returncode, result.stdout, result.stderr) == (done, "packed 3 images\n", "")
    # pack and predict call it once their work is done, before their closing lines
    import inspect

    from job import cli

    assert all("_done(" in inspect.getsource(command) for command in (cli.pack, cli.predict))
