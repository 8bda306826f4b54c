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

    from job.cli import _disk_full, _fail

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
    assert _disk_full(OSError(errno.ENOSPC, "x")) and _disk_full(tf_like) and _disk_full(chained)
    assert not _disk_full(OSError(errno.EACCES, "Permission denied")) and not _disk_full(ValueError("full"))
    with pytest.raises(typer.Exit) as e:
        _fail(tf_like)
    assert e.value.exit_code == 4
    err = capsys.readouterr().err
    assert err.startswith("finetune-job: error: no space left on the local disk (ResourceExhaustedError); "
                          "data.cache_dir holds") and err.count("\n") == 1
