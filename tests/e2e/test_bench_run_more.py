"""`make bench` quick, the second half of its sections (test_bench_run.py has the first and the checks)."""

from __future__ import annotations

import pytest
from test_bench_run import SECTIONS, check_quick_bench


@pytest.mark.slow
def test_quick_bench_second_half_writes_well_formed_results(tmp_path):
    from test_bench_run import FIRST_HALF

    check_quick_bench(tmp_path, tuple(s for s in SECTIONS if s not in FIRST_HALF))
