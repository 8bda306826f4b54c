"""Exit-code mapping of the contract (section 7)."""

import pytest

from job.errors import ConfigError, DataError, Preempted, StorageError, exit_code_for


@pytest.mark.parametrize("exc, code", [(ConfigError("x"), 2), (DataError("x"), 3), (StorageError("x"), 4),
                                       (Preempted("x"), 143), (RuntimeError("x"), 1), (KeyboardInterrupt(), 1)])
def test_exit_codes(exc, code):
    assert exit_code_for(exc) == code
