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


RATES = (1e-4, 3e-4)


def searched(seed: int, tag: str, trial_losses: tuple[float, float], chosen: int) -> dict:
    return {"seed": seed, "tag": tag, "search": [{"learning_rate": r, "val_loss": v, "chosen": i == chosen}
                                                 for i, (r, v) in enumerate(zip(RATES, trial_losses))]}


trials = st.tuples(losses, losses)


@given(st.dictionaries(st.integers(1, 9), st.tuples(trials, st.integers(0, 1), trials, st.integers(0, 1)),
                       max_size=6), st.sets(st.integers(1, 9)))
def test_at_the_rung_b_is_kept_only_where_its_trial_at_as_rate_scored_lower(spec, b_missing):
    """--at-rung: B's trial at the rate A's search chose, against A's chosen trial; A on a tie; B's picks whose own
    search continued another rate are counted."""
    a = [searched(s, "a", la, ca) for s, (la, ca, _, _) in spec.items()]
    b = [searched(s, "b", lb, cb) for s, (_, _, lb, cb) in spec.items() if s not in b_missing]
    picked, inexact = replay_choice.choose_at_rung(a, b)
    assert [r["seed"] for r in picked] == sorted(set(spec) - b_missing)
    expected_inexact = 0
    for r in picked:
        la, ca, lb, cb = spec[r["seed"]]
        b_wins = lb[ca] < la[ca]
        assert r["tag"] == ("b" if b_wins else "a")
        expected_inexact += b_wins and cb != ca
    assert inexact == expected_inexact
