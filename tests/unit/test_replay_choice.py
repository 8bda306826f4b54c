"""bench/replay_choice.py: the replayed choice between two recorded rows keeps, per seed, the lower validation loss."""

import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import replay_choice  # noqa: E402

losses = st.floats(0.0, 5.0, allow_nan=False)


def runs(seeds_losses: dict[int, float], tag: str) -> list[dict]:
    return [{"seed": s, "tag": tag, "validation": {"loss": v}, "test": {"accuracy": 0.5}}
            for s, v in seeds_losses.items()]


@given(st.dictionaries(st.integers(1, 9), losses, max_size=6), st.dictionaries(st.integers(1, 9), losses, max_size=6))
def test_each_common_seed_keeps_the_lower_validation_loss_the_first_row_on_a_tie(a, b):
    picked = replay_choice.choose(runs(a, "a"), runs(b, "b"))
    assert [r["seed"] for r in picked] == sorted(set(a) & set(b))
    for r in picked:
        assert r["tag"] == ("a" if a[r["seed"]] <= b[r["seed"]] else "b")
        assert r["validation"]["loss"] == min(a[r["seed"]], b[r["seed"]])
