"""Multi-label data: manifests of label lists (CSV and JSON lines), the stratified carve of a validation split,
`pack` into shards with `<key>.json`, copied and streamed readers that agree, the task checks, and positive
weights. Generated inputs (hypothesis) besides the cases written by hand; local folders, no TensorFlow."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from conftest import tar_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job import layout, manifest, readers, recipe, sources
from job.config import Config
from job.errors import ConfigError, DataError
from job.pack import pack

NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="|"), min_size=1,
                max_size=8).filter(lambda s: s.strip() == s and s.strip())
LABEL_SETS = st.lists(st.lists(NAMES, unique=True, max_size=4), min_size=1, max_size=20)


def csv_text(rows: list[tuple[str, list[str], str | None]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "labels", "split"])
    for path, labels, split in rows:
        writer.writerow([path, manifest.SEPARATOR.join(labels), split or ""])
    return out.getvalue()


def jsonl_text(rows: list[tuple[str, list[str], str | None]]) -> str:
    return "".join(json.dumps({"path": p, "labels": ls, **({"split": s} if s else {})}) + "\n" for p, ls, s in rows)


@given(LABEL_SETS, st.sampled_from(["csv", "jsonl"]))
def test_label_lists_read_back_as_written(sets, kind):
    rows = [(f"img/{i}.png", labels, None) for i, labels in enumerate(sets)]
    text = csv_text(rows) if kind == "csv" else jsonl_text(rows)
    parsed = manifest.parse(text.encode(), f"m.{kind}")
    assert manifest.is_multi_label(parsed)
    assert [(r.path, list(r.labels)) for r in parsed] == [(p, ls) for p, ls, _ in rows]


@given(LABEL_SETS)
def test_the_classes_are_the_union_and_every_image_keeps_its_set(sets):
    rows = manifest.parse(jsonl_text([(f"{i}.png", ls, None) for i, ls in enumerate(sets)]).encode(), "m.jsonl")
    if not any(sets):
        with pytest.raises(DataError, match="no labels at all"):
            manifest.to_multi_layout(rows, "m.jsonl", "/d", {f"{i}.png" for i in range(len(sets))})
        return
    built = manifest.to_multi_layout(rows, "m.jsonl", "/d", {f"{i}.png" for i in range(len(sets))})
    assert built.classes == sorted({x for ls in sets for x in ls})
    keys, labels = built.items("train")
    got = {k: {built.classes[i] for i in y} for k, y in zip(keys, labels)}
    assert got == {f"{i}.png": set(ls) for i, ls in enumerate(sets)}
    assert built.counts()["train"] == {c: sum(c in ls for ls in sets) for c in built.classes}
    assert built.unlabelled("train") == sum(not ls for ls in sets)


@pytest.mark.parametrize("text, message", [
    ('{"path": "a.png", "labels": "cat"}\n', 'm.jsonl line 1: "labels" must be a list of label names'),
    ('{"path": "a.png", "labels": [1]}\n', 'm.jsonl line 1: "labels" must be a list of label names'),
    ('{"path": "a.png", "labels": null}\n', 'm.jsonl line 1: "labels" must be a list of label names'),
    ('{"path": "a.png", "labels": ["cat", " "]}\n', "m.jsonl line 1: a label with an empty name"),
    ('{"path": "a.png", "labels": ["cat", "cat"]}\n', "m.jsonl line 1: label 'cat' listed twice"),
    ('{"path": "a.png", "labels": ["cat"]}\n{"path": "b.png", "label": "cat"}\n',
     'm.jsonl line 2: "label" and "labels" mixed in one manifest'),
    ('{"path": "a.png", "label": "cat", "labels": ["cat"]}\n', 'm.jsonl line 1: expected an object with "path"'),
    ("path,labels\na.png,cat||dog\n", "m.csv line 2: a label with an empty name"),
    ("path,labels\na.png,cat|\n", "m.csv line 2: a label with an empty name"),
    ("path,labels\na.png,dog|cat|dog\n", "m.csv line 2: label 'dog' listed twice"),
    ("path,labels,split\na.png,cat,\nb.png,dog,test\n", "m.csv line 3: label 'dog' has no training image"),
])
def test_bad_label_lists_name_the_line(text, message):
    name = "m.csv" if text.startswith("path") else "m.jsonl"
    with pytest.raises(DataError) as e:
        rows = manifest.parse(text.encode(), name)
        manifest.to_multi_layout(rows, name, "/d", {"a.png", "b.png"})
    assert str(e.value).startswith(message)


def test_classes_txt_fixes_the_labels_and_their_order():
    rows = manifest.parse(b'{"path": "a.png", "labels": ["dog"]}\n{"path": "b.png", "labels": ["cat"]}\n', "m.jsonl")
    built = manifest.to_multi_layout(rows, "m.jsonl", "/d", {"a.png", "b.png"}, ["dog", "cat"], "classes.txt")
    assert built.classes == ["dog", "cat"] and built.items("train") == (["a.png", "b.png"], [(0,), (1,)])
    with pytest.raises(DataError, match="^m.jsonl line 2: label 'cat' is not in classes.txt$"):
        manifest.to_multi_layout(rows, "m.jsonl", "/d", {"a.png", "b.png"}, ["dog"], "classes.txt")
    # classes.txt's `cat ` (a trailing space, or `Cat`) beside a manifest's `cat`: nothing showed the difference.
    for written in ("cat ", "Cat"):
        with pytest.raises(DataError, match=f"^m.jsonl line 2: label 'cat' is not in classes.txt; 'cat' is "
                                            f"{re.escape(layout.shown(written))} in another case, Unicode form or "
                                            "spacing$"):
            manifest.to_multi_layout(rows, "m.jsonl", "/d", {"a.png", "b.png"}, ["dog", written], "classes.txt")
    with pytest.raises(DataError, match="^classes.txt: label 'bird' has no training image in m.jsonl"):
        manifest.to_multi_layout(rows, "m.jsonl", "/d", {"a.png", "b.png"}, ["dog", "cat", "bird"], "classes.txt")


# ---------------------------------------------------------------- the carve


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, 4), unique=True, max_size=3), min_size=2, max_size=60),
       st.floats(0.05, 0.5), st.integers(0, 5), st.randoms())
def test_the_carve_is_seeded_keeps_every_label_in_train_and_loses_no_image(sets, fraction, seed, rnd):
    keys = [f"k{i:03d}" for i in range(len(sets))]
    train = {k: tuple(sorted(s)) for k, s in zip(keys, sets)}
    listed = layout.MultiLayout([f"l{i}" for i in range(5)], {"train": train})
    carved = listed.carve(fraction, seed)
    shuffled = list(train.items())
    rnd.shuffle(shuffled)
    assert carved == layout.MultiLayout(listed.classes, {"train": dict(shuffled)}).carve(fraction, seed)  # any order
    val = carved.sets["validation"]
    assert set(val).isdisjoint(carved.sets["train"]) and {**val, **carved.sets["train"]} == train
    before, after = listed.counts()["train"], carved.counts()["train"]
    assert all(after[c] >= 1 for c, n in before.items() if n)  # no label loses its last training image
    groups = [sum(1 for y in train.values() if c in y) for c in range(5)] + [sum(1 for y in train.values() if not y)]
    wanted = [min(max(round(n * fraction), 1 if n >= 2 else 0), max(n - 1, 0)) for n in groups]
    assert len(val) <= sum(wanted)  # each move is one a label (or the unlabelled) still wanted


def test_the_carve_gives_each_label_a_share_of_validation():
    train = {f"k{i:03d}": ((i % 3,) if i % 10 else ()) for i in range(100)}
    carved = layout.MultiLayout(["a", "b", "c"], {"train": train}).carve(0.2, 7)
    assert 18 <= carved.count("validation") <= 22
    assert all(5 <= n <= 8 for n in carved.counts()["validation"].values())
    assert carved.unlabelled("validation") == 2


def test_the_carve_keeps_each_labels_share_near_the_fraction_when_images_carry_several():
    # Rarest label first, each taking the first images of its order whatever else they carried: at a fraction of
    # 0.2 a common label had 30 to 40% of its images in validation (a probe's pack: 10 of 30, 16 of 55).
    import random

    worst = []
    for seed in range(40):
        r = random.Random(seed)
        train = {f"k{i:03d}": tuple(sorted(r.sample(range(8), r.choice([0, 1, 1, 2, 2, 3])))) for i in range(150)}
        listed = layout.MultiLayout([f"l{j}" for j in range(8)], {"train": train})
        carved, total = listed.carve(0.2, 1).counts()["validation"], listed.counts()["train"]
        worst.append(max(abs(carved[c] / n - 0.2) for c, n in total.items() if n >= 5))
    assert max(worst) <= 0.05, max(worst)  # it was 0.223 (42% of a label's images), 0.090 on average


def test_pick_spreads_over_labels_and_the_unlabelled():
    listed = layout.MultiLayout(["a", "b"], {"train": {"1": (0,), "2": (0,), "3": (0,), "4": (1,), "5": ()}})
    assert set(listed.pick("train", 3)) == {"1", "4", "5"}


# ---------------------------------------------------------------- shards, readers, tasks


def labelled_manifest(root: Path, n: int = 12) -> Path:
    from job.sample_data import write_multilabel_dataset

    return write_multilabel_dataset(root, ("circle", "square"), train=n, test=4, size=16, seed=1)


def config(uri, task="multi_label", **data) -> Config:
    return Config.model_validate({"task": task, "data": {"uri": str(uri), **data}, "output": {"uri": "/tmp/unused"},
                                  "model": {"weights": "none"}})


def test_packed_label_lists_read_back_the_same_copied_and_streamed(tmp_path):
    listed = labelled_manifest(tmp_path / "d")
    pack(str(listed), str(tmp_path / "shards"), 4000)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["task"] == "multi_label" and index["images"] == {"train": 12, "test": 4}
    members = {m for shard in (tmp_path / "shards").rglob("*.tar") for m in _members(shard)}
    assert members and all(m.endswith((".png", ".json")) for m in members)
    expected = {}
    for row in map(json.loads, listed.read_text().splitlines()):
        expected.setdefault(row["split"], []).append(((tmp_path / "d" / row["path"]).read_bytes(), row["labels"]))
    for mode in ("copy", "stream"):
        cfg = config(tmp_path / "shards")
        cache = tmp_path / f"cache-{mode}"
        reader = readers.create(sources.open_source(cfg), mode, readers.Staging(cache, cache / "i", (8, 8)))
        assert reader.multi
        got = {split: sorted((image, sorted(reader.layout.classes[i] for i in y))
                             for _, image, y in reader.samples(split)) for split in reader.layout.splits}
        assert got == {s: sorted((b, sorted(ls)) for b, ls in v) for s, v in expected.items()}
        settled = reader.settle(0.25, seed=3)
        assert settled.count("validation") > 0 and settled.targets(settled.items("train")[1]).shape == (
            settled.count("train"), 2)


def _members(shard: Path) -> list[str]:
    import tarfile

    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_a_label_list_is_a_multilabel_dataset_and_one_label_is_not(tmp_path):
    listed = labelled_manifest(tmp_path / "d")
    with pytest.raises(ConfigError, match="a multi-label dataset .label lists. but task is single_label"):
        sources.open_source(config(tmp_path / "d", task="single_label", manifest=str(listed)))
    single = tmp_path / "d" / "single.csv"
    single.write_text("path,label\nimages/train_0000.png,circle\nimages/train_0001.png,square\n")
    with pytest.raises(ConfigError, match="one label per image but task is multi_label"):
        sources.open_source(config(tmp_path / "d", manifest=str(single)))
    (tmp_path / "f" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="task: multi_label needs label lists"):
        sources.open_source(config(tmp_path / "f"))


@pytest.mark.parametrize("task, member, message", [
    ("single_label", ("0.json", b'{"labels": ["cat"]}'), "has a label list .0.json.: a multi-label dataset"),
    ("multi_label", ("0.cls", b"0"), "has one label .0.cls or .txt., but task is multi_label"),
])
def test_a_shard_sample_labelled_for_the_other_task_is_exit_2(tmp_path, task, member, message):
    (tmp_path / "s" / "train").mkdir(parents=True)
    (tmp_path / "s" / "train" / "shard-000000.tar").write_bytes(tar_bytes([("0.png", b"x"), member]))
    (tmp_path / "s" / "classes.txt").write_text("cat\ndog\n")
    cfg = config(tmp_path / "s", task=task)
    with pytest.raises(ConfigError, match=message):
        readers.create(sources.open_source(cfg), "stream", readers.Staging(tmp_path, tmp_path, (8, 8)))


@pytest.mark.parametrize("body, message", [
    (b'{"labels": "cat"}', 'is not {"labels": \\[label names\\]}'),
    (b"not json", 'is not {"labels": \\[label names\\]}'),
    (b'{"labels": ["cat", "cat"]}', "lists a label twice"),
    (b'{"labels": ["bird"]}', "names label 'bird', which classes.txt does not list"),
])
def test_bad_label_members_are_data_errors(tmp_path, body, message):
    (tmp_path / "s" / "train").mkdir(parents=True)
    (tmp_path / "s" / "train" / "shard-000000.tar").write_bytes(tar_bytes([("0.png", b"x"), ("0.json", body)]))
    (tmp_path / "s" / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=message):
        cfg = config(tmp_path / "s")
        readers.create(sources.open_source(cfg), "stream", readers.Staging(tmp_path, tmp_path, (8, 8)))


def test_positive_weights():
    assert recipe.positive_weights("auto", ["a", "b", "c"], {"a": 10, "b": 50, "c": 1}, 100) == [9.0, 1.0, 10.0]
    assert recipe.positive_weights("none", ["a"], {"a": 1}, 2) is None
    assert recipe.positive_weights({"b": 3.0}, ["a", "b"], {"a": 1, "b": 1}, 2) == [1.0, 3.0]
    with pytest.raises(ValueError, match="classes the dataset does not have: z"):
        recipe.positive_weights({"z": 3.0}, ["a"], {"a": 1}, 2)


def test_the_metric_must_fit_the_task():
    with pytest.raises(ValueError, match="val_map does not apply to task single_label"):
        Config.model_validate({"data": {"uri": "/d"}, "output": {"uri": "/o"},
                               "train": {"early_stopping_metric": "val_map"}})
    with pytest.raises(ValueError, match="val_accuracy does not apply to task multi_label"):
        Config.model_validate({"task": "multi_label", "data": {"uri": "/d"}, "output": {"uri": "/o"},
                               "train": {"early_stopping_metric": "val_accuracy"}})


def test_validate_prints_images_per_label_and_warns_about_rare_ones(tmp_path):
    from conftest import run_cli

    listed = labelled_manifest(tmp_path / "d", n=16)
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    rows[0]["labels"] = [*rows[0]["labels"], "rare"]  # one training image carries it
    listed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: multi_label\ndata: {{uri: {tmp_path / 'd'}, manifest: {listed}, validation_split: 0}}\n"
                   f"output: {{uri: {tmp_path / 'out'}}}\nmodel: {{weights: none}}\n")
    out = run_cli("validate", "--config", str(cfg))  # the console script: its own process, its own logging
    assert out.returncode == 0, out.stderr
    lines = [line.rsplit(None, 2) for line in out.stdout.splitlines()[1:]]
    table = {name: [int(a), int(b)] for name, a, b in lines}
    train = [r for r in rows if r["split"] == "train"]
    assert table["rare"] == [1, 0] and table["images"] == [16, 4]
    assert table["circle"][0] == sum("circle" in r["labels"] for r in train)
    unlabelled = [sum(not r["labels"] for r in rows if r["split"] == split) for split in ("train", "test")]
    assert table["(no label)"] == unlabelled
    few = [line for line in out.stderr.splitlines() if "fewer than 5 training images" in line]
    assert len(few) == 1 and few[0].endswith(": rare")


def test_multilabel_finetunes_at_its_own_rate_unless_one_is_set():
    def rate(task, **finetune):
        return Config.model_validate({"task": task, "data": {"uri": "/d"}, "output": {"uri": "/o"},
                                      "train": {"finetune": finetune}}).train.finetune.learning_rate

    assert rate("multi_label") == recipe.MULTI_LABEL_FINETUNE_RATE and rate("single_label") == 1.0e-4
    assert rate("multi_label", learning_rate=1.0e-4) == 1.0e-4 and rate("single_label", learning_rate=3e-5) == 3e-5


def test_labels_joined_the_wrong_way_are_found():
    def joined(lines: list[str], header: str = "path,labels") -> dict[str, str]:
        text = header + "\n" + "".join(f"{i}.png,{line}\n" for i, line in enumerate(lines))
        return manifest.joined_labels(manifest.parse(text.encode(), "m.csv"))

    assert joined(["shoe", "red shoe", "haze primary", "haze", "primary"]) == {"haze primary": " "}
    assert joined(["shoe|red", "red shoe"]) == {"red shoe": " "}  # both are labels of their own
    assert joined(['"shoe,red"', "a;b", "blue"]) == {"a;b": ";", "shoe,red": ","}  # never label names
    assert joined(["red shoe", "shoe"]) == {}  # "red" is no label of its own: a name with a space
    assert joined(["shoe|red", "shoe"], header="path,label") == {"shoe|red": "|"}  # single-label: one class
    assert joined(["shoe", "red"], header="path,label") == {}
    # In a JSON list, the CSV's separator stays inside a name: "r|g" trained as one label, without the warning
    # that "r,g" got.
    rows = manifest.parse(b'{"path": "a.png", "labels": ["r|g", "b"]}\n{"path": "b.png", "labels": ["r"]}\n',
                          "m.jsonl")
    assert manifest.joined_labels(rows) == {"r|g": "|"}


@given(LABEL_SETS)
def test_labels_written_with_the_separator_are_never_joined(sets):
    # What a user writes the documented way (names without , ; or spaces between labels) is never flagged.
    sets = [[x for x in labels if not any(c in x for c in ",; ")] for labels in sets]
    rows = [(f"img/{i}.png", labels, None) for i, labels in enumerate(sets)]
    assert manifest.joined_labels(manifest.parse(csv_text(rows).encode(), "m.csv")) == {}


def test_joined_labels_are_warned_about_when_listed(tmp_path, capsys):
    listed = labelled_manifest(tmp_path / "d")
    sources.open_source(config(tmp_path / "d", manifest=str(listed)))
    assert "joined into one" not in capsys.readouterr().out
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    rows[0]["labels"] = ["circle,square"]  # as a user might write both
    listed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources.open_source(config(tmp_path / "d", manifest=str(listed)))
    out = capsys.readouterr().out
    assert "1 label(s) look like several joined into one" in out and "circle,square" in out
    # Packed, the label is classes.txt's: the warning was the manifest's only.
    pack(str(listed), str(tmp_path / "shards"), 4000)
    capsys.readouterr()
    sources.open_source(config(tmp_path / "shards"))
    out = capsys.readouterr().out
    assert "1 label(s) look like several joined into one" in out and "circle,square" in out and "classes.txt" in out


def test_a_split_whose_images_carry_no_label_is_unmeasured_and_val_map_on_it_is_refused(tmp_path):
    # Test images carrying no label at all: validate gave no warning (the split's label counts sum to 0), and with
    # early_stopping_metric val_map every epoch's val_map was NaN, so the first epoch was kept without a word.
    from job import pipeline

    listed = labelled_manifest(tmp_path / "d", n=16)
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    for r in rows:
        if r["split"] == "test":
            r["labels"], r["split"] = [], "validation"
    listed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validated = pipeline.validate(config(tmp_path / "d", manifest=str(listed)))
    assert validated.count("validation") == 4
    ((message, split, missing),) = pipeline.unmeasured(validated)
    assert split == "validation" and missing == ["circle", "square"] and "nor early stopping" in message
    cfg = config(tmp_path / "d", manifest=str(listed))
    cfg.train.early_stopping_metric = "val_map"
    with pytest.raises(DataError, match=r"^the 4 validation image\(s\) carry no label, so val_map "
                                        r"\(train\.early_stopping_metric\) is undefined: use val_loss"):
        pipeline.validate(cfg)


def test_pack_counts_a_multilabel_manifests_labels_as_labels(tmp_path):
    # "packed 16 images of 2 classes": they are labels, as validate and the card call them.
    from conftest import run_cli

    listed = labelled_manifest(tmp_path / "d")
    out = run_cli("pack", "--from", str(listed), "--to", str(tmp_path / "shards"))  # its own process and logging
    assert out.returncode == 0, out.stderr
    assert "packed 16 images of 2 labels into 2 shards under" in out.stdout


@pytest.mark.parametrize(("carried", "limit", "refused"), [
    (lambda i: (0,) if i < 6 else (), 0.05, None),  # 1 of 40 images (2.5%): it was "1 of 6 images are bad" (16.7%)
    (lambda i: (0, 1, 2), 0.02, "1 of 40 images are bad (2.5% > data.max_bad_fraction 2.0%)"),  # it was 1 of 120
])
def test_the_bad_share_of_a_multilabel_dataset_is_of_its_images_not_of_its_labels(carried, limit, refused):
    from job import pipeline

    listed = layout.MultiLayout(["a", "b", "c"], {"train": {f"{i}.png": carried(i) for i in range(32)},
                                                  "test": {f"t{i}.png": carried(i) for i in range(8)}})
    staged = readers.Reader(listed, {"0.png": "cannot be decoded"}, "/d", (8, 8))
    cfg = config("/d", max_bad_fraction=limit)
    if refused is None:
        pipeline._too_many_bad(cfg, staged)
    else:
        with pytest.raises(DataError, match=re.escape(refused)):
            pipeline._too_many_bad(cfg, staged)
