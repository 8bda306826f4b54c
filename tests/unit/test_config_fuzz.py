"""The config's readers with generated input (hypothesis): any file text, `--set` or FINETUNE_* environment gives
a Config or a one-line ConfigError (exit 2), never another exception (exit 1, a traceback); a Config written as
config.yaml reads back the same. Each of the example inputs below was a traceback once."""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from job import config
from job.errors import ConfigError

# What users' files hold at the edges: line ends, a BOM, YAML's own words and anchors, unicode look-alikes.
ODD = st.sampled_from(["", " ", "\t", "\r\n", "\n", "\r", "\ufeff", "\u2028", "\x85", "\x00", "\x07", "..", "%", "+",
                       "@", ":", "/", "#", "?", "~", "é", "e\u0301", "\u200b", "猫", "\\", "'", '"', ",", "|", "&a",
                       "*a", "!!", "- ", "{", "[", "yes", "null", ".nan", ".inf", "1e400", "0x1F", "007", "-1",
                       "1" * 30, "<<: *a"])
TEXT = st.one_of(st.text(max_size=20), st.lists(ODD, max_size=5).map("".join),
                 st.text(string.ascii_letters + string.digits + "._-/:@%+ ", max_size=30))
VALUE_TEXT = st.one_of(TEXT, st.sampled_from(["[1, 2]", "[64, 64]", "{a: 1}", "&a [*a]", "&a {a: *a}", "1e-3",
                                              "~nobody-here/x", "file://[d]/x", "http://u:p@h:1"]))
KEYS = [".".join(path) for path in sorted(config._key_paths().values())] + ["run_id", "task"]


def _base(tmp_path) -> dict:
    return {"data": {"uri": str(tmp_path / "data")}, "output": {"uri": str(tmp_path / "out")}, "run_id": "r1"}


def _config_or_one_line(load):
    """The Config `load` makes, or None when it refuses in one line; any other exception fails the test."""
    try:
        return load()
    except ConfigError as e:
        assert str(e) and "\n" not in str(e) and "\r" not in str(e), repr(str(e))
        return None


def _reads_back(cfg: config.Config, tmp_path) -> None:
    written = tmp_path / "written.yaml"
    written.write_text(config.to_yaml(cfg), encoding="utf-8")
    assert config.redacted(config.load(written, environ={})) == config.redacted(cfg)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@given(st.one_of(st.text(max_size=300), st.lists(ODD | st.text(max_size=5), max_size=40).map("".join)))
@example("train:\n  class_weight: &a {a: *a}\n")
@example("run_id: r1\x07\n")
def test_any_file_text_is_a_config_or_one_line(folder, text):
    path = folder / "c.yaml"
    path.write_text(text, encoding="utf-8", newline="")
    _config_or_one_line(lambda: config.load(path, environ={}))


@given(st.lists(st.tuples(st.sampled_from(KEYS) | TEXT, VALUE_TEXT), max_size=4))
@example([("train.batch_size", "1" * 4301)])
@example([("train.search.learning_rates", "&a [*a]")])
@example([("data.uri", "~nobody-here/data")])
@example([("data.uri", "file://[d]/data")])
@example([("train.bad\nkey", "1")])
def test_any_set_is_a_config_or_one_line_and_reads_back(folder, assignments):
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(_base(folder)), encoding="utf-8")
    cfg = _config_or_one_line(lambda: config.load(path, [f"{k}={v}" for k, v in assignments], environ={}))
    if cfg is not None:
        _reads_back(cfg, folder)


@given(st.dictionaries(st.sampled_from(KEYS).map(lambda k: "FINETUNE_" + k.replace(".", "__").upper()),
                       VALUE_TEXT.filter(lambda v: "\x00" not in v), max_size=4))
@example({"FINETUNE_TRAIN__BATCH_SIZE": "1" * 4301})
@example({"FINETUNE_MODEL__BACKBONE": "0\r0"})  # (a backbone's name was quoted raw: two lines)
@example({"FINETUNE_MODEL__BACKBONE": "mobilenet\u2028v2"})
def test_any_environment_is_a_config_or_one_line_and_reads_back(folder, environ):
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(_base(folder)), encoding="utf-8")
    cfg = _config_or_one_line(lambda: config.load(path, environ=environ))
    if cfg is not None:
        _reads_back(cfg, folder)
