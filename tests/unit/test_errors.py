"""Exit-code mapping of the contract (section 7)."""

import pytest

from job.errors import ConfigError, DataError, Preempted, StorageError, exit_code_for


@pytest.mark.parametrize("exc, code", [(ConfigError("x"), 2), (DataError("x"), 3), (StorageError("x"), 4),
                                       (Preempted("x"), 143), (RuntimeError("x"), 1), (KeyboardInterrupt(), 1)])
def test_exit_codes(exc, code):
    assert exit_code_for(exc) == code


def test_a_full_local_disk_is_exit_4_with_one_line(capsys):
    import errno

    import typer

    from job.cli import _fail
    from job.errors import disk_full

    class ResourceExhaustedError(Exception):  # TensorFlow's, as it says a failed checkpoint write
        pass

    tf_like = ResourceExhaustedError("{{function_node SaveV2}} /cache/ckpt-1_temp/part-0; No space left on device")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("writing the image cache") from e
    except RuntimeError as e:
        chained = e
    assert disk_full(OSError(errno.ENOSPC, "x", "/cache/x")) == "/cache/x"  # the file it was writing, when known
    assert disk_full(tf_like) == disk_full(chained) == ""
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None and disk_full(ValueError("full")) is None
    with pytest.raises(typer.Exit) as e:
        _fail(tf_like, "train")
    assert e.value.exit_code == 4
    err = capsys.readouterr().err
    assert err.startswith("finetune-job: error: no space left on the local disk (ResourceExhaustedError); "
                          "data.cache_dir holds") and err.count("\n") == 1
    # Another command: its own remedy (pack, predict, tensorboard have no data.cache_dir nor run_id to rerun).
    with pytest.raises(typer.Exit):
        _fail(OSError(errno.ENOSPC, "No space left on device", "/tmp/x/shard-000001.tar"))
    assert capsys.readouterr().err == ("finetune-job: error: no space left on the local disk "
                                       "(/tmp/x/shard-000001.tar); free space there (or set TMPDIR to a larger "
                                       "folder) and run it again\n")
