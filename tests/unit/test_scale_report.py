"""bench/scale.py's report: with every way it is the bench's full report; with the ways `--ways` picked, each target
whose runs are there and no other (it used to raise KeyError unless the pick was exactly shards,shards_stream)."""

import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import scale  # noqa: E402

TARGET_RUNS = {"shards_stage_vs_objects": {"objects", "shards"}, "peak_rss_all_vs_tenth": {"objects", "objects_tenth"},
               "validate_objects_seconds": {"objects"}, "validate_vs_bare_listing": {"objects"},
               "stream_vs_copy_training_images_per_s": {"shards", "shards_stream"}}


def a_run(seconds: float) -> dict:
    return {"stage_seconds": {"download_seconds": seconds}, "peak_rss_mib": 100.0 * seconds,
            "validate_seconds": seconds, "finetune_images_per_s": [10.0, 20.0 * seconds]}


@given(st.sets(st.sampled_from(scale.WAYS), min_size=1), st.floats(0.5, 4.0), st.booleans())
def test_the_report_has_each_target_whose_runs_are_there(ways, seconds, quick):
    runs = {w: a_run(seconds if w == "objects" else 1.0) for w in ways}
    report = scale.build_report(quick, {"train": 600, "test": 100}, {}, 2.0, runs)
    assert set(report["targets"]) == {key for key, needs in TARGET_RUNS.items() if needs <= ways}
    assert report["mode"] == ("quick" if quick else "full" if ways == set(scale.WAYS) else "partial")
    assert report["runs"] is runs
    if "validate_objects_seconds" in report["targets"]:
        assert report["targets"]["validate_objects_seconds"]["value"] == round(seconds, 4)
        assert report["targets"]["validate_vs_bare_listing"]["value"] == round(seconds / 2.0, 4)
    if "stream_vs_copy_training_images_per_s" in report["targets"]:
        assert report["targets"]["stream_vs_copy_training_images_per_s"]["value"] == 1.0
