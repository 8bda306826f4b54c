"""Summarise the last `make mutation` run: mutants killed, surviving and timed out per module (`other`: no
tests, suspicious, segfault, not checked), then every mutant that was not killed (`.venv/bin/mutmut show NAME`
prints its diff). Reads ./mutants/**/*.py.meta; run from the repository root."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code


def main() -> int:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutation results in ./mutants: run `make mutation` first", file=sys.stderr)
        return 1
    others = []
    print(f"{'module':<24} {'mutants':>7} {'killed':>7} {'survived':>8} {'timeout':>7} {'other':>6}")
    for meta in metas:
        module = meta.relative_to("mutants").as_posix().removesuffix(".meta")
        statuses = {name: status_by_exit_code[code]
                    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items()}
        if not statuses:
            continue
        counts = Counter(statuses.values())
        other = len(statuses) - counts["killed"] - counts["survived"] - counts["timeout"]
        print(f"{module:<24} {len(statuses):>7} {counts['killed']:>7} {counts['survived']:>8} {counts['timeout']:>7} "
              f"{other:>6}")
        others += [(name, status) for name, status in sorted(statuses.items()) if status != "killed"]
    if others:
        print("\nnot killed:")
        for name, status in others:
            print(f"  {status:<12} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
