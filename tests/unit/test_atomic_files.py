"""job/files.py's atomic writes: a reader never sees a half-written file, and writers of one file never share a
temporary. No TensorFlow."""

from __future__ import annotations

from job.files import atomic_path


def test_interleaved_writers_of_one_file_on_one_thread_each_complete(tmp_path):
    # Two tf.data generators streaming one shard run interleaved on one thread: their temporaries had one name, the
    # first rename took the second's file, and training failed (FileNotFoundError, exit 1) about 1 run in 2.
    dest = tmp_path / "shard.rows"
    with atomic_path(dest) as first:
        first.write_text("first")
        with atomic_path(dest) as second:
            assert second != first
            second.write_text("second")
        assert dest.read_text() == "second"
    assert dest.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.rows"]


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    dest = tmp_path / "x.json"
    try:
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk gone")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
