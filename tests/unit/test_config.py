"""Config resolution: file < env < --set, validation with one-line errors. No TensorFlow."""

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from job import config
from job.errors import ConfigError

BASE = "data: {uri: s3://b/data, image_size: [64, 64]}\noutput: {uri: s3://b/out}\n"


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(BASE + "train: {batch_size: 8, head: {epochs: 4}}\n")
    return p


def test_defaults_and_file(cfg_file):
    cfg = config.load(cfg_file, environ={})
    assert cfg.train.batch_size == 8 and cfg.train.head.epochs == 4
    assert cfg.train.finetune.learning_rate == 1e-4 and cfg.model.backbone == "mobilenet_v2"
    assert cfg.train.finetune.unfreeze == "all" and cfg.train.finetune.augment is False
    assert cfg.data.image_size == (64, 64)
    assert len(cfg.run_id) > 16 and cfg.run_id[:8].isdigit()


def test_precedence_set_over_env_over_file(cfg_file):
    env = {"FINETUNE_TRAIN__BATCH_SIZE": "16", "FINETUNE_TRAIN__HEAD__EPOCHS": "2"}
    cfg = config.load(cfg_file, ["train.batch_size=64"], environ=env)
    assert cfg.train.batch_size == 64  # --set beats env
    assert cfg.train.head.epochs == 2  # env beats file


def test_local_paths_written_from_home_are_expanded(cfg_file, monkeypatch, tmp_path):
    """`~/...` in data.cache_dir, a local data.manifest and metrics.file means the home folder, as it already did
    in data.uri, output.uri and model.weights: it made a folder named `~` in the working directory (image cache,
    Katib's file), and a manifest there was "no such file". Set in the file, by --set and from the environment."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    cfg = config.load(cfg_file, ["data.cache_dir=~/cache", "metrics.file=~/katib.txt"],
                      environ={"FINETUNE_DATA__MANIFEST": "~/labels.csv"})
    assert (cfg.data.cache_dir, cfg.data.manifest, cfg.metrics.file) == (
        str(home / "cache"), str(home / "labels.csv"), str(home / "katib.txt"))
    cfg = config.load(cfg_file, ["data.manifest=s3://b/~/labels.csv", "data.cache_dir=rel/~x"], environ={})
    assert (cfg.data.manifest, cfg.data.cache_dir, cfg.metrics.file) == ("s3://b/~/labels.csv", "rel/~x", "")


@pytest.mark.parametrize("text, line, key, first", [
    # A section written twice (copied below another): PyYAML kept the second, and batch_size 16 was lost unsaid.
    (BASE + "train:\n  batch_size: 16\nmodel: {weights: none}\ntrain:\n  head: {epochs: 1}\n", 6, "train", 3),
    ("data: {uri: s3://b/d, uri: s3://b/e}\noutput: {uri: s3://b/out}\n", 1, "uri", 1),
])
def test_a_key_written_twice_is_refused_with_both_lines(tmp_path, text, line, key, first):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path, environ={})
    assert str(e.value) == (f"config file {path} line {line}: not valid YAML ({key!r} written twice in one mapping "
                            f"(first on line {first}); the second would replace the first)")


def test_yaml_merge_keys_still_read():
    # A merge key's keys may be overridden by the mapping that merges them: not "written twice".
    loaded = config.yaml.load("base: &b {x: 1, y: 1}\na:\n  <<: *b\n  y: 2\n", Loader=config._UniqueKeys)
    assert loaded["a"] == {"x": 1, "y": 2}


def test_class_weights_of_classes_named_as_yaml_booleans_or_numbers_when_quoted_or_numeric(cfg_file):
    cfg = config.load(cfg_file, ["train.class_weight={'yes': 2.0, 'no': 1.0}"], environ={})
    assert cfg.train.class_weight == {"yes": 2.0, "no": 1.0}
    assert config.load(cfg_file, ["train.class_weight={0: 1.0, 1: 5.0}"], environ={}).train.class_weight == {
        "0": 1.0, "1": 5.0}  # folders 0 and 1


def test_values_are_yaml_typed(cfg_file):
    cfg = config.load(cfg_file, ["data.image_size=[96, 128]", "output.overwrite=true",
                                 "train.finetune.unfreeze=block_16_expand", "run_id=abc"], environ={})
    assert cfg.data.image_size == (96, 128) and cfg.output.overwrite is True
    assert cfg.train.finetune.unfreeze == "block_16_expand" and cfg.run_id == "abc"


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
@example("2024-01-01")
@example("007")
@example("0x1F")
@example("1.50")
@example("true")
def test_a_string_key_set_from_the_environment_or_set_is_the_text_as_written(text):
    # `FINETUNE_RUN_ID=2024-01-01` was refused as a date, and `007` became the run id "7".
    where = ["data.uri=s3://b/data", "output.uri=s3://b/out"]
    assert config.load(None, where, environ={"FINETUNE_RUN_ID": text}).run_id == text
    assert config.load(None, [*where, f"run_id={text}"], environ={}).run_id == text
    assert config.load(None, [*where, f"data.uri=s3://b/{text}"], environ={}).data.uri == f"s3://b/{text}"


def test_yaml_1_1_integers_other_than_decimal_are_kept_as_written(tmp_path):
    # YAML 1.1 reads 007 and 010 as octal: `run_id: 007` was the run "7", and a class weight for the class "010"
    # went to a class "8" (accepted without a word where one existed).
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "run_id: 007\ntrain: {batch_size: 010, class_weight: {010: 5.0, 8: 1.0}}\n")
    cfg = config.load(path, environ={})
    assert cfg.run_id == "007" and cfg.train.batch_size == 10 and cfg.train.class_weight == {"010": 5.0, "8": 1.0}
    assert config.load(path, ["train.class_weight={0x1F: 2.0}"], environ={}).train.class_weight == {"0x1F": 2.0}
    with pytest.raises(ConfigError, match=r"^config: train.batch_size: .* \(got '0x20'\)$"):
        config.load(path, ["train.batch_size=0x20"], environ={})
    path.write_text(BASE + "run_id: 1.10\n")  # the run "1.1": a float's text is lost, so it is refused
    with pytest.raises(ConfigError, match=r"^config: run_id: YAML read it as the number 1.1; quote it"):
        config.load(path, environ={})
    assert config.load(path, ["run_id=1.10"], environ={}).run_id == "1.10"  # --set takes the text


@pytest.mark.parametrize(("value", "read_as"), [("2024-01-01", "datetime.date(2024, 1, 1) as a date"),
                                                ("yes", "True as a boolean")])
def test_a_yaml_typed_value_for_a_string_key_says_to_quote_it(cfg_file, value, read_as):
    cfg_file.write_text(BASE + f"run_id: {value}\n")
    with pytest.raises(ConfigError, match=rf"^config: run_id: .*: YAML read {re.escape(read_as)}; quote it"):
        config.load(cfg_file, environ={})


def test_recipe_keys_take_their_documented_forms(cfg_file):
    cfg = config.load(cfg_file, ["train.finetune.augment=[flip, {rotation: 0.1}]", "train.head.augment=true",
                                 "train.finetune.unfreeze=all", "train.early_stopping_metric=val_accuracy",
                                 "train.class_weight={cat: 2.5}", "train.lr_schedule=cosine",
                                 "train.weight_decay=0.01", "train.label_smoothing=0.1"], environ={})
    t = cfg.train
    assert t.finetune.augment == ["flip", {"rotation": 0.1}] and t.head.augment is True
    assert t.finetune.unfreeze == "all" and t.early_stopping_metric == "val_accuracy"
    assert t.class_weight == {"cat": 2.5} and t.lr_schedule == "cosine"
    assert (t.weight_decay, t.label_smoothing) == (0.01, 0.1)
    assert config.load(cfg_file, ["train.finetune.unfreeze=30"], environ={}).train.finetune.unfreeze == 30


def test_unrelated_finetune_env_vars_are_ignored(cfg_file):
    # Kubernetes injects these for a Service called finetune-job.
    cfg = config.load(cfg_file, environ={"FINETUNE_JOB_SERVICE_HOST": "10.0.0.1", "FINETUNE_JOB_PORT": "tcp://x"})
    assert cfg.train.batch_size == 8


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.batch_sise=3", "unknown key 'train.batch_sise' (did you mean 'train.batch_size'?)"),
        ("trian.batch_size=3", "unknown key 'trian' (did you mean 'train'?)"),
        ("train.batch_size=abc", "train.batch_size:"),
        ("train.batch_size=0", "train.batch_size:"),
        ("data.image_size=[16, 16]", "data.image_size [16, 16] is outside what mobilenet_v2 accepts"),
        ("data.image_size=224", "data.image_size: [height, width], e.g. [224, 224] (got 224)"),
        ("data.image_size=[224, 224, 3]", "data.image_size: [height, width], e.g. [224, 224]"),
        ("model.backbone=resnet51", "did you mean 'resnet50'"),
        ("model.backbone=MobileNetV2", "did you mean 'mobilenet_v2'"),  # Keras' class name
        ("model.backbone=efficientnet-b0", "did you mean 'efficientnet_b0'"),
        ("train.head.mode=fast", "train.head.mode:"),
        ("train.finetune.unfreeze=-2", "train.finetune.unfreeze:"),
        ("train.finetune.augment=[flip, spin]", "unknown augmentation op 'spin' (one of: flip,"),
        ("train.head.augment=[{rotation: 1.5}]", "train.head.augment: augmentation op 'rotation': factor must be"),
        # pydantic's union error was "Input should be a valid boolean or Input should be a valid string or ..."
        ("train.finetune.augment=[{rotation: abc}]", "train.finetune.augment: augmentation op 'rotation': factor "
                                                     "must be a number in (0, 1], got 'abc'"),
        ("train.finetune.augment=[flip,{rotation:0.1}]", "unknown augmentation op 'rotation:0.1' (one of: "),
        ("train.finetune.augment=[flip,{rotation:0.1}]", "written {rotation: 0.1}, with a space after the colon"),
        # Nothing trains: a random head was exported as a complete run, exit 0.
        ("train={head: {epochs: 0}, finetune: {epochs: 0}}", "train: head.epochs and finetune.epochs are both 0: "
                                                             "nothing would train"),
        ("train.finetune.augment=sometimes", "train.finetune.augment:"),
        ("train.early_stopping_metric=accuracy", "'val_loss', 'val_accuracy' or 'val_map'"),
        ("train.lr_schedule=step", "train.lr_schedule:"),
        ("train.label_smoothing=1.5", "train.label_smoothing:"),
        ("train.weight_decay=-1", "train.weight_decay:"),
        ("train.finetune.layer_decay=0", "train.finetune.layer_decay:"),
        ("train.finetune.layer_decay=1.5", "train.finetune.layer_decay:"),
        ("train.class_weight=balanced", "train.class_weight:"),
        ("train.class_weight={cat: 0}", "class weights must be > 0"),
        # A binary yes/no task: YAML reads those keys as booleans (the error said "a valid string").
        ("train.class_weight={yes: 2.0, no: 1.0}", "train.class_weight: YAML read a class name as True: quote class "
                                                   "names such as yes, no, on, off, true, false, null ('yes': 2.0)"),
        # NumPy's seed range: -1 failed after TensorFlow had loaded, exit 1 with a traceback.
        ("train.seed=-1", "train.seed: Input should be greater than or equal to 0 (got -1)"),
        ("train.seed=4294967296", "train.seed: Input should be less than or equal to 4294967295"),
        ("train.search.learning_rates=[1e-4, 0]", "train.search.learning_rates: each learning rate must be > 0"),
        ("train.search.learning_rates=[1e-4, 1e-4]", "the learning rates must be distinct"),
        ("train.search.rates=[1e-4]", "unknown key 'train.search.rates'"),
        ("run_id=../escape", "run_id:"),
        # Longer than a folder name holds: a traceback (OSError: File name too long), exit 1.
        ("run_id=" + "a" * 300, "run_id: at most 128 bytes of UTF-8, not 300 (it becomes a folder name)"),
        ("run_id=" + "a" * 129, "run_id: at most 128 bytes of UTF-8, not 129"),
        # NaN and infinity (YAML's .nan, .inf): a NaN class weight trained a model of NaNs to exit 0.
        ("train.class_weight={cat: .nan, dog: 1}", "train.class_weight: Input should be 'none' or 'auto' or Input "
                                                   "should be a finite number"),
        ("train.head.learning_rate=.inf", "train.head.learning_rate: Input should be a finite number (got inf)"),
        ("train.search.learning_rates=[.nan]", "train.search.learning_rates: Input should be a finite number"),
        ("data.max_bad_fraction=-.inf", "data.max_bad_fraction: Input should be a finite number"),
        # `s3:/bucket/models` and `s3://` were local folders named `s3:` in the working directory.
        ("output.uri=s3:/bucket/models", "output.uri: expected s3://bucket/prefix (two slashes, then the bucket) "
                                         "(got 's3:/bucket/models')"),
        ("output.uri=s3://", "output.uri: expected s3://bucket/prefix"),
        ("data.uri=S3:bucket/data", "data.uri: expected s3://bucket/prefix"),
        ("data.manifest=s3:///labels.csv", "data.manifest: expected s3://bucket/prefix"),
        ("model.weights=s3:/b/base.weights.h5", "model.weights: expected s3://bucket/prefix"),
        # boto3 refused them: exit 4 "storage unreachable" over three lines, and exit 1 "unexpected error".
        ("data.uri=s3://my bucket/data", "data.uri: bucket name 'my bucket': letters, digits, '.', '-' and '_' only"),
        ("output.uri=s3://b\u00fcck/x", "output.uri: bucket name"),
        ("s3.endpoint_url=127.0.0.1:9000", "s3.endpoint_url: expected a URL such as http://127.0.0.1:9000 (got "
                                           "'127.0.0.1:9000')"),
        # YAML booleans where a number or a name goes: 1 and 0 without a word (`unfreeze: no` skipped fine-tuning).
        ("train.finetune.unfreeze=yes", "train.finetune.unfreeze: YAML read a boolean (true/yes/on, false/no/off), "
                                        "which this key does not take: give a number or a name (got True)"),
        ("train.finetune.unfreeze='20'", "train.finetune.unfreeze: a layer count is a number: write 20 unquoted"),
        ("train.finetune.unfreeze=false", "train.finetune.unfreeze: YAML read a boolean"),
        # Quoted, these were layer names the job looked for only once the model was built (after staging).
        ("train.finetune.unfreeze='-1'", "train.finetune.unfreeze: must be all, a layer count >= 1 or a layer name"),
        ("train.finetune.unfreeze='1.5'", "a layer name (a name starts with a letter)"),
        ("train.finetune.unfreeze=' '", "train.finetune.unfreeze: must be all, a layer count >= 1 or a layer name"),
        ("train.batch_size=true", "train.batch_size: YAML read a boolean"),
        ("model.head_units=off", "model.head_units: YAML read a boolean"),
        ("train.early_stopping_patience=false", "train.early_stopping_patience: YAML read a boolean"),
        ("train.finetune.unfreeze=0", "train.finetune.unfreeze: 0 unfreezes no layer: fine-tuning would train "
                                      "nothing of the base; to skip it, set train.finetune.epochs: 0"),
        ("metrics.host=not a host!!", "metrics.host: expected an address or host name to bind"),
        ("batch_size", "expected KEY=VALUE"),
        ("train.batch_size.x=1", "not a section"),
            # Each was exit 1 with a traceback: int() past 4,300 digits, checks that recursed into a list holding
        # itself, a home folder of a user this machine does not know.
        ("train.batch_size=" + "1" * 4301, "train.batch_size: Unable to parse input string as an integer"),
        ("train.batch_size=" + "1" * 4301, "1111... (4303 characters))"),
        ("train.search.learning_rates=&a [*a]", "train.search.learning_rates: Input should be a valid list"),
        ("train.class_weight=&a {a: *a}", "train.class_weight: Input should be"),
        ("data.uri=~nosuchuser-here/data", "data.uri: ~nosuchuser-here: no such user here, so no home folder"),
        ("output.uri=file://~nosuchuser-here/o", "output.uri: ~nosuchuser-here: no such user here"),
        ("model.weights=~nosuchuser-here/w.h5", "model.weights: ~nosuchuser-here: no such user here"),
        ("data.cache_dir=~nosuchuser-here/c", "data.cache_dir: ~nosuchuser-here: no such user here"),
        ("train.bad\nkey=1", "unknown key 'train.bad\\nkey'"),  # (a line break in a key printed two lines)
    ],
)
def test_bad_values_name_the_key_on_one_line(cfg_file, override, expected):
    with pytest.raises(ConfigError) as e:
        config.load(cfg_file, [override], environ={})
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_the_search_is_on_by_default_and_off_when_the_rate_alone_is_set(cfg_file):
    assert config.load(cfg_file, [], environ={}).train.search.learning_rates == [1.0e-4, 3.0e-4]
    chosen = config.load(cfg_file, ["train.finetune.learning_rate=5e-5"], environ={})
    assert chosen.train.search.learning_rates == [] and chosen.train.finetune.learning_rate == 5e-5
    both = config.load(cfg_file, ["train.finetune.learning_rate=5e-5", "train.search.learning_rates=[1e-5, 1e-3]"],
                       environ={})
    assert both.train.search.learning_rates == [1e-5, 1e-3]
    assert config.load(cfg_file, ["train.search.learning_rates=[]"], environ={}).train.search.learning_rates == []


def test_xception_minimum_size(cfg_file):
    with pytest.raises(ConfigError, match="each side 71"):
        config.load(cfg_file, ["model.backbone=xception"], environ={})
    assert config.load(cfg_file, ["model.backbone=xception", "data.image_size=[71, 80]"], environ={})


def test_env_typo_is_caught(cfg_file):
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        config.load(cfg_file, environ={"FINETUNE_TRAIN__BATCHSIZE": "4"})
    # A mistyped section: `__` is written for the job alone; ignored, the run trained at the file's batch size.
    with pytest.raises(ConfigError, match="^environment variable FINETUNE_TRIAN__BATCH_SIZE: no config section "
                                          "'trian' \\(did you mean 'train'\\?\\)"):
        config.load(cfg_file, environ={"FINETUNE_TRIAN__BATCH_SIZE": "4"})


def test_a_section_set_as_a_mapping_sets_its_keys_and_keeps_the_others(cfg_file):
    # `--set 'train={batch_size: 8}'` replaced the file's whole train section: its epochs and search went back to
    # the defaults without a word. Sections merge, as Helm's values do; a key that holds a mapping is replaced.
    file = config.load(cfg_file, ["train.class_weight={a: 1, b: 2}"], environ={})
    cfg = config.load(cfg_file, ["train.class_weight={a: 1, b: 2}",
                                 "train={batch_size: 4, head: {learning_rate: 0.01}}", "train.class_weight={a: 3}"],
                      environ={"FINETUNE_TRAIN": "{seed: 7}"})
    assert (cfg.train.batch_size, cfg.train.head.learning_rate, cfg.train.seed) == (4, 0.01, 7)
    assert cfg.train.head.epochs == file.train.head.epochs == 4 and cfg.train.finetune == file.train.finetune
    assert cfg.train.class_weight == {"a": 3.0}  # a value, not a section: replaced whole


@pytest.mark.parametrize(("name", "meant"), [("FINETUNE_TRAIN_BATCH_SIZE", "FINETUNE_TRAIN__BATCH_SIZE"),
                                             ("FINETUNE_OUTPUT_URI", "FINETUNE_OUTPUT__URI"),
                                             ("FINETUNE_TRAIN_HEAD__EPOCHS", "FINETUNE_TRAIN__HEAD__EPOCHS"),
                                             ("FINETUNE_EXPORT_FORMATS", "FINETUNE_EXPORT__FORMATS")])
def test_an_env_var_with_one_underscore_after_its_section_names_the_one_meant(cfg_file, name, meant):
    # One `_` where `__` parts the section from its key: ignored, the run trained at the file's values without a word.
    with pytest.raises(ConfigError, match=f"^environment variable {name} is not read: did you mean {meant}\\? "):
        config.load(cfg_file, environ={name: "4"})


def test_a_kubernetes_service_link_named_like_a_key_is_ignored(cfg_file):
    # A Service `finetune-metrics` in the namespace injects FINETUNE_METRICS_PORT=tcp://...: not the job's.
    env = {"FINETUNE_METRICS_PORT": "tcp://10.0.0.7:8000", "FINETUNE_METRICS_SERVICE_HOST": "10.0.0.7"}
    assert config.load(cfg_file, environ=env).metrics.port == config.load(cfg_file, environ={}).metrics.port


def test_a_config_file_that_cannot_be_read_as_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  class_weight: &a {a: *a}\n")  # (checks recursed without end: exit 1)
    with pytest.raises(ConfigError, match=r"not valid YAML \(an alias \(\*name\) names a list or mapping that "
                                          r"holds it\)$"):
        config.load(bad, environ={})
    bad.write_text("run_id: r1\x07\n")  # a reader's error: two lines
    with pytest.raises(ConfigError, match=r"not valid YAML \(unacceptable character #x0007: special characters are "
                                          r"not allowed in \"<unicode string>\", position 10\)$"):
        config.load(bad, environ={})
    bad.write_text("data: {uri: /d}\noutput: {uri: /o}\ntrain:\n  batch_size: " + "1" * 4301 + "\n")
    with pytest.raises(ConfigError, match="train.batch_size: Unable to parse input string as an integer"):
        config.load(bad, environ={})
    bad.write_text("data: {uri: /d}\noutput: {uri: /o}\nx: " + "[" * 600 + "]" * 600 + "\n")  # PyYAML's recursion
    with pytest.raises(ConfigError, match="bad.yaml: lists or mappings nested too deeply to read$"):
        config.load(bad, environ={})
    # Aliases shared nine times a level, ten levels (no loop): each use was walked, minutes; looked into once now.
    levels = ["  a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]"
                                                           for i in range(1, 11)]
    bad.write_text("data: {uri: /d}\noutput: {uri: /o}\nx:\n" + "\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match="unknown key 'x'"):
        config.load(bad, environ={})
    shared = tmp_path / "shared.yaml"  # an alias used twice is no loop
    shared.write_text("data: {uri: /d, image_size: &s [64, 64]}\noutput: {uri: /o}\nx: *s\n")
    with pytest.raises(ConfigError, match="unknown key 'x'"):
        config.load(shared, environ={})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad, environ={})
    # Found at the end of the file ("line 3" of two): the line where the `[` began is named too.
    bad.write_text("data:\n  uri: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line 3: not valid YAML \(expected ',' or '\]', but got '<stream end>'; "
                                          r"while parsing a flow sequence begun on line 2\)$"):
        config.load(bad, environ={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="'data' is required"):
        config.load(empty, environ={})


def test_redaction_masks_credentials_in_urls(cfg_file):
    cfg = config.load(cfg_file, ["s3.endpoint_url=http://key:secret@minio:9000",
                                 "metrics.pushgateway=http://u:p@pgw:9091"], environ={})
    text = config.to_yaml(cfg)
    assert "secret" not in text and ":p@" not in text
    assert "http://***@minio:9000" in text
    # A URL parser's ValueError (a "host" of `[d]`): validate passed, train failed after it with a traceback.
    odd = config.load(cfg_file, ["data.uri=file://[d]/data", "output.uri=file://u:p@[o/out"], environ={})
    assert config.redacted(odd)["data"]["uri"] == "file://[d]/data"
    assert config.redacted(odd)["output"]["uri"] == "file://***@[o/out"


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "efficientnet_v2_b0", "convnext_tiny"])
def test_onnx_for_a_backbone_it_does_not_convert_is_a_config_error(cfg_file, backbone):
    """Refused before any work (exit 2), not after training (exit 1): bench/formats.py, docs/BENCHMARKS.md."""
    with pytest.raises(ConfigError) as e:
        config.load(cfg_file, [f"model.backbone={backbone}", "export.formats=[saved_model, onnx]"], environ={})
    assert e.value.exit_code == 2
    assert str(e.value).startswith(f"config: export.formats: onnx does not convert for model.backbone {backbone} ")
    assert "\n" not in str(e.value)
    # The same backbone without onnx, and onnx with a backbone that converts, are fine.
    assert config.load(cfg_file, [f"model.backbone={backbone}", "export.formats=[tflite, tflite_int8]"], environ={})
    assert config.load(cfg_file, [f"model.backbone={backbone}"], environ={}).export.formats is None
    assert config.load(cfg_file, ["model.backbone=efficientnet_v2_s", "export.formats=[onnx]"], environ={})


def test_onnx_for_a_backbone_it_does_not_convert_exits_2(cfg_file):
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "finetune-job"
    p = subprocess.run([str(cli), "validate", "--config", str(cfg_file), "--set", "model.backbone=efficientnet_b0",
                        "--set", "export.formats=[onnx]"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "onnx does not convert for model.backbone efficientnet_b0" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("key, value, refused", [
    ("data.uri", "s3://b/out/r1/data", True),  # an overwrite deleted all 48 images, then exit 3 "48 bad images"
    ("data.uri", "s3://b/out/r1", True),
    ("data.uri", "s3://b/out/r10/data", False),  # another run's folder that only starts like this one's
    ("data.uri", "s3://b/out", False),  # the output root itself: the run's folder is left out of its listing
    ("data.manifest", "s3://b/out/r1/labels.csv", True),
    ("model.weights", "s3://b/out/r1/base.weights.h5", True),  # an overwrite deleted it: the next run exit 2
    ("model.weights", "s3://b/out/base.weights.h5", False),
])
def test_inputs_inside_the_runs_own_folder_are_refused(cfg_file, key, value, refused):
    sets = ["output.uri=s3://b/out/", "run_id=r1", f"{key}={value}"]
    if key == "data.manifest":
        sets.append("data.uri=s3://b/data")
    if refused:
        with pytest.raises(ConfigError, match=f"config: {key}: .* lies inside the run's own folder \\(s3://b/out/r1\\)"):
            config.load(cfg_file, sets)
    else:
        assert config.load(cfg_file, sets).run_id == "r1"


@pytest.mark.parametrize("data, output, run_id, refused", [
    ("s3://b/flowers", "s3://b/flowers/train/roses", "r1", "train/"),  # artifacts among the roses
    ("s3://b/flowers/", "s3://b/flowers//validation", "r1", "validation/"),
    ("s3://b/flowers", "s3://b/flowers", "test", "test/"),  # the run's own folder is the split
    ("s3://b/flowers", "s3://b/flowers", "r1", None),  # beside the splits: never read as images
    ("s3://b/flowers", "s3://b/flowers/trainings", "r1", None),  # a sibling that only starts like a split
    ("s3://b/flowers", "s3://c/flowers/train", "r1", None),  # another bucket
    ("/data/flowers", "/data/flowers/train/../models", "r1", None),  # resolved: outside
    ("/data/flowers", "/data/flowers/models/../train/x", "r1", "train/"),
])
def test_an_output_inside_a_split_folder_is_refused(cfg_file, data, output, run_id, refused):
    sets = [f"data.uri={data}", f"output.uri={output}", f"run_id={run_id}"]
    if refused is None:
        assert config.load(cfg_file, sets).output.uri == output
    else:
        with pytest.raises(ConfigError, match=f"inside the dataset's {refused} folder"):
            config.load(cfg_file, sets)
    # A manifest names its files: its dataset's folders are never listed, so any output is fine.
    assert config.load(cfg_file, [*sets, f"data.manifest={data}/labels.csv"]).run_id == run_id


@pytest.mark.parametrize("key, value", [("output.uri", "gs://b/p"), ("data.uri", "http://x/y"),
                                        ("data.manifest", "gs://x/m.csv"), ("model.weights", "https://h/w.h5")])
def test_a_storage_scheme_the_job_does_not_read_is_a_config_error(cfg_file, key, value):
    # gs:// or http:// was exit 4 ("unsupported scheme", output.uri) or exit 3 ("no such file", data.manifest).
    with pytest.raises(ConfigError, match=f"config: {key}: .*is not storage the job reads"):
        config.load(cfg_file, [f"{key}={value}"], environ={})


def test_spaces_around_a_text_value_of_set_or_the_environment_go_as_in_yaml(cfg_file):
    # `--set 'output.uri= /tmp/out'` wrote the run into a folder named " " below the working directory, exit 0.
    cfg = config.load(cfg_file, ["output.uri= /tmp/out ", "run_id=  r9"], environ={"FINETUNE_DATA__URI": "/data "})
    assert (cfg.output.uri, cfg.run_id, cfg.data.uri) == ("/tmp/out", "r9", "/data")


def test_an_explicit_finetune_rate_turns_the_search_off_unless_its_rates_are_given(cfg_file):
    # `train: {search: {epochs: 2}}` beside an explicit rate searched the default rates: the rate was never used.
    cfg = config.load(cfg_file, ["train.search.epochs=2", "train.finetune.learning_rate=1e-3"], environ={})
    assert cfg.train.search.learning_rates == [] and cfg.train.finetune.learning_rate == 1e-3
    assert cfg.train.search.epochs == 2  # as written: the resolved config.yaml said 3
    both = config.load(cfg_file, ["train.search.learning_rates=[1e-4, 1e-3]", "train.finetune.learning_rate=1e-3"],
                       environ={})
    assert both.train.search.learning_rates == [1e-4, 1e-3]


@pytest.mark.parametrize("sets, key", [
    (["train.search.learning_rates=[yes, 1e-4]"], "train.search.learning_rates"),  # a trial at rate 1.0
    (["train.class_weight={a: on, b: 2}"], "train.class_weight"),
])
def test_a_yaml_boolean_inside_a_list_or_mapping_is_refused(cfg_file, sets, key):
    with pytest.raises(ConfigError, match=f"{key}: YAML read a boolean"):
        config.load(cfg_file, sets, environ={})


@pytest.mark.parametrize("text", ["data:\n  ? [a]\n  : 1\n", "train:\n  class_weight: {? {a: 1} : 2}\n"])
def test_a_list_or_mapping_as_a_yaml_key_is_a_config_error(tmp_path, text):
    # `if key in first` raised TypeError (unhashable): exit 1 with a traceback.
    path = tmp_path / "c.yaml"
    path.write_text("output: {uri: /o}\n" + text)
    with pytest.raises(ConfigError, match="unhashable"):
        config.load(path, [], environ={})


@pytest.mark.parametrize("key", ["metrics.linger_seconds", "checkpoint.lease_seconds", "checkpoint.every_seconds",
                                 "distribution.connect_timeout_seconds"])
def test_waits_are_at_most_a_day(cfg_file, key):
    # metrics.linger_seconds=1e10 overflowed time.sleep after the run was complete: exit 1 with a traceback.
    assert config.load(cfg_file, [f"{key}=86400"], environ={})
    with pytest.raises(ConfigError, match=f"{key}: Input should be less than or equal to 86400"):
        config.load(cfg_file, [f"{key}=1e10"], environ={})


@pytest.mark.parametrize("sets, complaint", [
    (["run_id=caf\u00e9"], "run_id: only ASCII letters"),  # the chart's schema refused it; this did not
    (["run_id=\uff21\uff22"], "run_id: only ASCII letters"),
    (["data.cache_dir="], "data.cache_dir: String should have at least 1 character"),
    (["metrics.pushgateway=ftp://x"], "metrics.pushgateway: expected http://host:port or host:port, not ftp://"),
])
def test_what_the_chart_refuses_the_config_refuses(cfg_file, sets, complaint):
    with pytest.raises(ConfigError, match=complaint):
        config.load(cfg_file, sets, environ={})


def test_a_pushgateway_without_a_scheme_is_taken_as_prometheus_client_takes_it(cfg_file):
    assert config.load(cfg_file, ["metrics.pushgateway=pg.monitoring:9091"], environ={}).metrics.pushgateway == \
        "pg.monitoring:9091"
    # A password is masked in config.yaml only in a URL with its scheme: without one, it would be kept as written.
    with pytest.raises(ConfigError, match="a user:password@ needs the scheme"):
        config.load(cfg_file, ["metrics.pushgateway=user:s3cret@pg:9091"], environ={})
    kept = config.load(cfg_file, ["metrics.pushgateway=http://user:s3cret@pg:9091"], environ={})
    assert "s3cret" not in config.redacted(kept)["metrics"]["pushgateway"]


@pytest.mark.parametrize("key", ["data.cache_dir", "metrics.file"])
@pytest.mark.parametrize("value", ["s3://out/cache", "gs://b/c", "file:///tmp/x"])
def test_local_paths_are_no_uris(cfg_file, key, value):
    # They made folders named `s3:` or `gs:` in the working directory (exit 0); file:///tmp/x was never written.
    with pytest.raises(ConfigError, match=f"config: {key}: a local path .this machine's disk., not"):
        config.load(cfg_file, [f"{key}={value}"], environ={})


def test_an_output_prefix_too_long_for_s3_keys_is_a_config_error(cfg_file):
    # A 968-byte prefix took the lease, then failed on an event file's key (KeyTooLongError, exit 4, retried in vain).
    assert config.load(cfg_file, ["output.uri=s3://b/" + "p" * 800, "run_id=r1"], environ={})
    with pytest.raises(ConfigError, match="output.uri: the run's folder .* leaves too little of S3's 1024-byte key"):
        config.load(cfg_file, ["output.uri=s3://b/" + "p" * 968, "run_id=r1"], environ={})
    assert config.load(cfg_file, ["output.uri=/tmp/" + "p" * 200, "run_id=r1"], environ={})  # local: not S3's rule
