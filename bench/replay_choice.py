"""Replay a validation-driven choice between two recorded rows of the quality bench, without training anything.

    .venv/bin/python bench/replay_choice.py [--at-rung] A B FILE [FILE ...]

For every task and seed that both rows A and B ran, keep the run with the lower validation loss (as the job's own
search chooses), and print per task the test accuracy of that choice next to A's, B's and the best plain-Keras script
of the same files (issue 20's bar). It answers "what would choosing between A and B inside the run be worth" before
anything is built: the choice's cost is A's plus B's training, which the table's seconds show.

With --at-rung, the choice is made as one more trial of the job's search would make it, at the rung: A's chosen
trial against B's trial at the same rate, on their validation loss after `train.search.epochs` epochs (both rows
record every trial's scores); the run kept is then A's or B's whole run. Exact where B's own search chose that rate
too (the run B's trial would continue into); the other seeds are counted in the last column.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SCRIPTS = ("keras_job_recipe", "keras_job_recipe_batch_16")


def rows(files: list[Path]) -> dict[str, dict[str, list[dict]]]:
    """task -> recipe -> runs, over all the files (a later file's runs of a recipe add to an earlier one's)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for f in files:
        for task, t in json.loads(f.read_text())["tasks"].items():
            for name, r in t["recipes"].items():
                out.setdefault(task, {}).setdefault(name, []).extend(r["runs"])
    return out


def choose(a: list[dict], b: list[dict]) -> list[dict]:
    """Per seed both ran, the run with the lower validation loss (a on a tie: the first row is the default)."""
    by_seed = {r["seed"]: r for r in b}
    return [ra if ra["validation"]["loss"] <= by_seed[ra["seed"]]["validation"]["loss"] else by_seed[ra["seed"]]
            for ra in sorted(a, key=lambda r: r["seed"]) if ra["seed"] in by_seed]


def choose_at_rung(a: list[dict], b: list[dict]) -> tuple[list[dict], int]:
    """Per seed both ran, A's run, or B's where B's trial at the rate A's search chose scored a lower validation
    loss at the rung than A's chosen trial; and how many of B's picks continued at another rate in B's run."""
    by_seed, picked, inexact = {r["seed"]: r for r in b}, [], 0
    for ra in sorted(a, key=lambda r: r["seed"]):
        rb = by_seed.get(ra["seed"])
        if rb is None:
            continue
        won = next(t for t in ra["search"] if t["chosen"])
        rival = next(t for t in rb["search"] if t["learning_rate"] == won["learning_rate"])
        if rival["val_loss"] < won["val_loss"]:
            picked.append(rb)
            inexact += next(t for t in rb["search"] if t["chosen"])["learning_rate"] != won["learning_rate"]
        else:
            picked.append(ra)
    return picked, inexact


def test_mean(runs: list[dict]) -> float:
    return statistics.mean(r["test"]["accuracy"] for r in runs) * 100


def main(argv: list[str]) -> int:
    at_rung = bool(argv) and argv[0] == "--at-rung"
    argv = argv[1:] if at_rung else argv
    if len(argv) < 3:
        raise SystemExit(__doc__.splitlines()[2].strip())
    a, b, files = argv[0], argv[1], [Path(f) for f in argv[2:]]
    how = "at the rung" if at_rung else "on validation loss"
    print(f"| task | seeds | {a} | {b} | chosen {how} | {b} chosen | best script | chosen − best script |"
          + (" at another rate in B |" if at_rung else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if at_rung else ""))
    for task, recipes in rows(files).items():
        if a not in recipes or b not in recipes:
            continue
        picked, inexact = choose_at_rung(recipes[a], recipes[b]) if at_rung else (choose(recipes[a], recipes[b]), 0)
        seeds = {r["seed"] for r in picked}
        scripts = [test_mean([r for r in recipes[s] if r["seed"] in seeds]) for s in SCRIPTS if s in recipes]
        best = f"{max(scripts):.1f}" if scripts else ""
        margin = f"{test_mean(picked) - max(scripts):+.1f}" if scripts else ""
        in_b = sum(r in recipes[b] for r in picked)
        print(f"| {task} | {len(seeds)} | {test_mean([r for r in recipes[a] if r['seed'] in seeds]):.1f} | "
              f"{test_mean([r for r in recipes[b] if r['seed'] in seeds]):.1f} | {test_mean(picked):.1f} | "
              f"{in_b} of {len(picked)} | {best} | {margin} |" + (f" {inexact} |" if at_rung else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
