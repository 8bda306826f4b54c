"""The job's configuration (CONTRACT section 4): pydantic models and file + env + --set resolution.

Precedence: --set > FINETUNE_* environment > YAML file > defaults. Everything is validated before
any work; problems become one ConfigError line that names the key.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import secrets
import typing
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from job import backbones, recipe
from job.errors import ConfigError, did_you_mean
from job.uris import credentials_parse, expanded, is_s3, masked, s3_form, split_s3, within

ENV_PREFIX = "FINETUNE_"
RUN_ID_MAX = 128  # as the chart's values.schema.json
# The longest wait a key may ask for: 1e10 s overflowed time.sleep after a complete run (exit 1, a traceback).
DAY = 86400.0


class _Section(BaseModel):
    # The file's values are YAML-typed, so `run_id: 20240101` arrives as a number: strings accept numbers. No
    # number may be NaN or infinite (`.nan`, `.inf` in YAML): a class weight of NaN trained a NaN model to exit 0.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info) -> Any:
        """A YAML boolean (`true`, `yes`, `on`, `no`) where a key takes none: pydantic made it 1 or 0, so
        `unfreeze: yes` unfroze one layer and `unfreeze: no` skipped the fine-tuning, without a word. (A text key
        says to quote it: one_line.)"""
        annotation = cls.model_fields[info.field_name].annotation
        section = isinstance(annotation, type) and issubclass(annotation, BaseModel)  # its own keys say
        if not section and _holds_bool(value) and annotation is not str and not _takes_bool(annotation):  # in lists:
            raise ValueError("YAML read a boolean (true/yes/on, false/no/off), which this key does not take: give "
                             "a number or a name")  # `learning_rates: [yes, 1e-4]` tried a rate of 1.0
        return value


def _holds_bool(value: Any) -> bool:
    if isinstance(value, dict):
        return any(map(_holds_bool, value.values()))
    if isinstance(value, (list, tuple)):
        return any(map(_holds_bool, value))
    return isinstance(value, bool)


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or any(_takes_bool(a) for a in typing.get_args(annotation))


def http_url(v: str) -> str:
    """An http(s) URL, or "" (none): boto3's ValueError was exit 1, "unexpected"."""
    if v and "://" in v and not v.lower().startswith(("http://", "https://")):
        raise ValueError(f"expected http:// or https://, not {v.split('://')[0]}://")
    if v and not v.lower().startswith(("http://", "https://")):
        raise ValueError(f"expected a URL such as http://{masked(v)}")
    if v:
        credentials_parse(v)
    return v


def local_path(v: str) -> str:
    """A path on this machine's disk (data.cache_dir, metrics.file): `s3://out/cache` or `gs://b/c` made folders
    named `s3:` and `gs:` in the working directory, exit 0."""
    if "://" in v:
        raise ValueError(f"a local path (this machine's disk), not {v.split('://')[0]}://")
    return v


def home_path(v: str) -> str:
    """A local path written `~/...`, expanded as data.uri, output.uri and model.weights expand it (`pack --from`
    too): left as it was, it made a folder named `~` in the working directory (the image cache, Katib's file) or
    was "no such file"."""
    return os.path.expanduser(known_home(v)) if v.startswith("~") else v


def known_home(v: str) -> str:
    """ValueError for `~user/...` of a user this machine does not know: a traceback (exit 1) where a path was
    expanded, or a folder named `~user` in the working directory."""
    expanded(v)  # (the ValueError names the user)
    return v


class DataConfig(_Section):
    uri: str = Field(min_length=1)
    image_size: tuple[int, int] = (180, 180)
    validation_split: float = Field(0.2, ge=0.0, lt=1.0)
    cache_dir: str = Field("/tmp/finetune-job/cache", min_length=1)  # "" was the working directory
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    # Larger images are skipped as bad, judged from the header before decoding (Pillow's own bomb limit).
    max_image_pixels: int = Field(90_000_000, ge=1)
    manifest: str = ""  # CSV (path,label[,split]) or JSON lines, local or s3://; paths relative to uri or full URIs
    staging: Literal["auto", "copy", "stream"] = "auto"  # stream: shards read from storage every epoch

    _expand_home = field_validator("cache_dir", "manifest")(home_path)
    _a_local_path = field_validator("cache_dir")(local_path)
    _s3_form = field_validator("uri", "manifest")(s3_form)
    _known_home = field_validator("uri")(known_home)

    @field_validator("image_size", mode="before")
    @classmethod
    def _height_and_width(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError("[height, width], e.g. [224, 224]")
        return v


class ModelConfig(_Section):
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    head_units: int = Field(256, ge=0)
    head_dropout: float = Field(0.5, ge=0.0, lt=1.0)

    _s3_form = field_validator("weights")(s3_form)
    _known_home = field_validator("weights")(known_home)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        try:
            backbones.get(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v


Augment = bool | list[str | dict[str, float]]


def _check_augment(v: Augment) -> Augment:
    recipe.augment_ops(v)  # ValueError -> a one-line config error naming the key
    return v


def _check_augment_list(v):
    """A list is checked as written, before its type: `[{rotation: abc}]` was pydantic's "Input should be a valid
    boolean or Input should be a valid string or ... unable to parse string as a number"."""
    if isinstance(v, list):
        recipe.augment_ops(v)
    return v


class HeadConfig(_Section):
    epochs: int = Field(10, ge=0)
    learning_rate: float = Field(1.0e-3, gt=0.0)
    mode: Literal["cached_features", "end_to_end"] = "cached_features"
    # Applies when the head sees images (end_to_end); cached features are computed once, un-augmented.
    augment: Augment = False

    _augment = field_validator("augment")(_check_augment)
    _augment_list = field_validator("augment", mode="before")(_check_augment_list)


class FinetuneConfig(_Section):
    epochs: int = Field(10, ge=0)
    learning_rate: float = Field(1.0e-4, gt=0.0)
    # "all" (every layer but BatchNormalization), the top N layers of the base, or the name of the
    # first layer to unfreeze.
    unfreeze: int | str = "all"
    augment: Augment = False
    # > 0: validate, keep and export an exponential moving average of the weights over about this many epochs
    # (job.recipe.average_momentum) instead of the weights themselves; 0 = off
    average_epochs: float = Field(0.0, ge=0.0, le=100.0)
    # < 1: layer-wise rate decay: the base's first layer trains at this fraction of the rate, the layers above at
    # fractions growing geometrically to 1 at its last layer, the head at the full rate (job.recipe.layer_rates)
    layer_decay: float = Field(1.0, gt=0.0, le=1.0)

    _augment = field_validator("augment")(_check_augment)
    _augment_list = field_validator("augment", mode="before")(_check_augment_list)

    @field_validator("unfreeze")
    @classmethod
    def _sane_unfreeze(cls, v: int | str) -> int | str:
        if v == 0:  # the fine-tuning was skipped without a word
            raise ValueError("0 unfreezes no layer: fine-tuning would train nothing of the base; to skip it, set "
                             "train.finetune.epochs: 0")
        if isinstance(v, int) and v < 0:
            raise ValueError("must be all, a layer count >= 1 or a layer name")
        if isinstance(v, str) and v.strip().isdigit():  # (YAML keeps `00` as text) taken for a layer's name
            raise ValueError(f"a layer count is a number: write {v.strip()} unquoted")
        if isinstance(v, str) and not v.strip()[:1].isalpha() and not v.strip().startswith("_"):
            # (`"-1"`, `"1.5"`: no layer of the job's backbones is named so; it failed only once the model was built)
            raise ValueError("must be all, a layer count >= 1 or a layer name (a name starts with a letter)")
        return v


class SearchConfig(_Section):
    # Fine-tuning learning rates tried by successive halving (job/search.py): each starts the fine-tuning phase from
    # the head's weights (same data order, same dropout draws) for `epochs` epochs; the one with the best validation
    # score so far (early_stopping_metric) continues. [] or one rate = no search: finetune.learning_rate. Setting
    # finetune.learning_rate alone turns it off.
    learning_rates: list[float] = [1.0e-4, 3.0e-4]
    epochs: int = Field(3, ge=1)

    @field_validator("learning_rates")
    @classmethod
    def _distinct_positive(cls, v: list[float]) -> list[float]:
        if any(r <= 0 for r in v):
            raise ValueError("each learning rate must be > 0")
        if len(set(v)) != len(v):
            raise ValueError("the learning rates must be distinct")
        return v


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1)
    seed: int = Field(1337, ge=0, le=2**32 - 1)  # NumPy's range: -1 failed after TensorFlow loaded, exit 1
    mixed_precision: Literal["auto"] | bool = "auto"
    head: HeadConfig = HeadConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    search: SearchConfig = SearchConfig()
    early_stopping_patience: int = Field(3, ge=0)  # 0 = no early stopping
    # val_accuracy: single_label only; val_map (validation mean average precision): multi_label only
    early_stopping_metric: Literal["val_loss", "val_accuracy", "val_map"] = "val_loss"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)  # > 0: AdamW (decoupled weight decay)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    class_weight: Literal["none", "auto"] | dict[str, float] = "auto"
    # true: once validation has chosen the epochs of each phase (and the search the rate), train again from the
    # pre-trained base on training + validation images for those epochs, and export that model (job/refit.py).
    # single_label with a validation split, pre-trained weights only; the validation scores reported stay those
    # of the model the choices were made with.
    refit: bool = False

    @field_validator("class_weight", mode="before")
    @classmethod
    def _names_not_yaml_booleans(cls, v):
        """Classes named yes/no (a binary task) or on/off: YAML reads those keys as booleans, and the error was
        "Input should be 'none' or 'auto' or Input should be a valid string"."""
        odd = [k for k in v if isinstance(k, bool) or k is None] if isinstance(v, dict) else []
        if odd:
            raise ValueError(f"YAML read a class name as {odd[0]!r}: quote class names such as yes, no, on, off, "
                             "true, false, null ('yes': 2.0)")
        return v

    @field_validator("class_weight")
    @classmethod
    def _positive_weights(cls, v):
        if isinstance(v, dict) and any(w <= 0 for w in v.values()):
            raise ValueError("class weights must be > 0")
        return v

    @model_validator(mode="after")
    def _something_trains(self) -> TrainConfig:
        if not self.head.epochs and not self.finetune.epochs:  # a random head was exported as a complete run, exit 0
            raise ValueError("head.epochs and finetune.epochs are both 0: nothing would train (the head is new); give "
                             "one of them epochs")
        return self


class DistributionConfig(_Section):
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    cpu_replicas: int = Field(0, ge=0, le=64)
    # Multi-worker: how long a worker waits for the others (start-up, then each collective) before it
    # fails with a clear message instead of hanging.
    connect_timeout_seconds: float = Field(300.0, gt=0.0, le=DAY)


class OutputConfig(_Section):
    uri: str = Field(min_length=1)
    overwrite: bool = False

    _s3_form = field_validator("uri")(s3_form)
    _known_home = field_validator("uri")(known_home)


class ExportConfig(_Section):
    # Formats besides saved_model (always written). None: job.formats.DEFAULT_FORMATS, where a format that
    # fails to convert is a warning; a format listed here that fails is an error (exit 1).
    formats: list[Literal["saved_model", "tf_serving", "tflite", "tflite_int8", "onnx"]] | None = None
    max_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0)  # int8 and other formats against the SavedModel
    fail_on_accuracy_drop: bool = False


class CheckpointConfig(_Section):
    # At the first epoch or step boundary this long after the last checkpoint (0: every epoch end); always at
    # a phase's end and on SIGTERM. every_steps adds one every N steps inside an epoch.
    every_seconds: float = Field(300.0, ge=0.0, le=DAY)
    every_steps: int = Field(0, ge=0)
    keep: int = Field(3, ge=1)
    # The run's lease on its output prefix (job/lease.py) is renewed every lease_seconds / 6; one not renewed
    # for lease_seconds is taken over by the next attempt.
    lease_seconds: float = Field(180.0, ge=3.0, le=DAY)


class MetricsConfig(_Section):
    port: int = Field(8000, ge=0, le=65535)
    host: str = "0.0.0.0"  # address the /metrics server binds; 127.0.0.1 keeps it local
    pushgateway: str = ""
    linger_seconds: float = Field(15.0, ge=0.0, le=DAY)
    # A local path: the chief appends one line per epoch and one at the end in Katib's TEXT format (job/katib.py)
    file: str = ""

    _expand_home = field_validator("file")(home_path)
    _a_local_path = field_validator("file")(local_path)

    @field_validator("pushgateway")
    @classmethod
    def _a_gateway(cls, v: str) -> str:
        """An http(s) URL, or host:port as prometheus_client takes it (it adds http://); `ftp://x` only warned at
        each push."""
        if "://" in v and not v.lower().startswith(("http://", "https://")):
            raise ValueError(f"expected http://host:port or host:port, not {v.split('://')[0]}://")
        if "://" not in v and "@" in v.split("/")[0]:  # masked in config.yaml only with a scheme
            raise ValueError("a user:password@ needs the scheme: http://user:password@host:port")
        if "://" in v:
            credentials_parse(v)
        return v

    @field_validator("host")
    @classmethod
    def _an_address(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._:%-]+", v):  # `not a host!!` only warned, and the run served no /metrics
            raise ValueError("expected an address or host name to bind (0.0.0.0, 127.0.0.1, ::)")
        return v


class S3Config(_Section):
    endpoint_url: str = ""

    _a_url = field_validator("endpoint_url")(http_url)


class Config(_Section):
    run_id: str = ""
    # single_label: softmax, one class per image. multi_label: one sigmoid per label, any number per image
    # (a manifest with label lists, or shards packed from one), a decision threshold per label.
    task: Literal["single_label", "multi_label"] = "single_label"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    distribution: DistributionConfig = DistributionConfig()
    output: OutputConfig
    export: ExportConfig = ExportConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    s3: S3Config = S3Config()

    @field_validator("run_id", mode="before")
    @classmethod
    def _run_id_as_written(cls, v: Any) -> Any:
        """`run_id: 1.10` was the run `1.1`: YAML reads it as a number, whose text is lost. (Integers keep theirs:
        `_UniqueKeys`.)"""
        if isinstance(v, float):
            raise ValueError(f"YAML read it as the number {v!r}; quote it (run_id: \"...\")")
        return v

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str) -> str:
        if v and (not all(c.isascii() and c.isalnum() or c in "._-" for c in v) or v.startswith(".")):
            raise ValueError("only ASCII letters, digits, '.', '_' and '-' (it becomes a storage prefix and a "
                             "Kubernetes label, as the chart's schema says)")
        if len(v.encode()) > RUN_ID_MAX:  # a folder name holds 255 bytes: 300 characters failed with a traceback
            raise ValueError(f"at most {RUN_ID_MAX} bytes of UTF-8, not {len(v.encode())} (it becomes a folder name)")
        return v

    @model_validator(mode="after")
    def _image_size_fits_backbone(self) -> Config:
        minimum = backbones.get(self.model.backbone).min_size
        if min(self.data.image_size) < minimum or max(self.data.image_size) > 4096:
            raise ValueError(
                f"data.image_size {list(self.data.image_size)} is outside what {self.model.backbone} "
                f"accepts (each side {minimum}..4096)"
            )
        return self

    @model_validator(mode="after")
    def _metric_fits_task(self) -> Config:
        metric, multi = self.train.early_stopping_metric, self.task == "multi_label"
        if metric == "val_map" and not multi or metric == "val_accuracy" and multi:
            fits = "val_loss or val_map" if multi else "val_loss or val_accuracy"
            raise ValueError(f"train.early_stopping_metric: {metric} does not apply to task {self.task} ({fits})")
        if multi and self.train.label_smoothing:
            raise ValueError("train.label_smoothing: applies to single_label only")
        if "learning_rate" in self.train.finetune.model_fields_set and \
                "learning_rates" not in self.train.search.model_fields_set:
            # The user chose the rate: no search unless its rates are asked for too (a `search: {epochs: 2}` beside
            # the rate searched the default rates, the chosen one never used).
            given = self.train.search.model_dump(include=self.train.search.model_fields_set)  # config.yaml keeps them
            self.train.search = SearchConfig(**{**given, "learning_rates": []})
        if multi and "learning_rate" not in self.train.finetune.model_fields_set:
            # The task's own default (job.recipe.MULTI_LABEL_FINETUNE_RATE); an explicit value is kept.
            self.train.finetune = self.train.finetune.model_copy(
                update={"learning_rate": recipe.MULTI_LABEL_FINETUNE_RATE})
        return self

    @model_validator(mode="after")
    def _formats_convert_for_backbone(self) -> Config:
        if "onnx" in (self.export.formats or ()) and not backbones.get(self.model.backbone).onnx:
            raise ValueError(f"export.formats: onnx does not convert for model.backbone {self.model.backbone} "
                             "(docs/BENCHMARKS.md, which formats convert); remove onnx or choose another backbone")
        return self


def default_run_id() -> str:
    """UTC timestamp plus a short random suffix: sortable and unique enough for concurrent runs."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


# ---------------------------------------------------------------- resolution


def _set_path(tree: dict, path: list[str], value: Any, source: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(path)}' goes below '{part}', which is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(path[-1]), dict) and _is_section(path):
        for key, inner in value.items():  # `--set 'train={batch_size: 8}'` reset every other key of train
            _set_path(tree, [*path, str(key)], inner, source)
        return
    node[path[-1]] = value


def _is_section(path: list[str]) -> bool:
    """Whether `path` names a section of the config (train, train.head), whose keys a mapping sets one by one."""
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = getattr(field, "annotation", None)
    return isinstance(model, type) and issubclass(model, BaseModel)


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping: PyYAML keeps the last one silently, so a section
    written twice (`train:` copied below another) lost every key of the first. And that keeps YAML 1.1's other
    integers as written (`007` octal, `0x1F`, `1_000`, `1:30`): `run_id: 007` became the run `7`, and
    `class_weight: {010: 5.0}` weighed a class `8`; a number key reads them as decimal, as YAML 1.2 does."""

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        # (past 4,300 digits int() raises ValueError, exit 1 with a traceback; as text the key refuses it)
        return int(text) if re.fullmatch(r"[-+]?(0|[1-9][0-9]{0,99})", text) else text

    def get_single_data(self):
        data = super().get_single_data()
        _acyclic(data)
        return data

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key: PyYAML's own check below says so (this raised TypeError)
                continue
            if key in first:
                raise yaml.MarkedYAMLError(problem=f"{key!r} written twice in one mapping (first on line "
                                                   f"{first[key] + 1}); the second would replace the first",
                                           problem_mark=key_node.start_mark)
            if isinstance(key, (str, int, float, bool)) or key is None:
                first.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor("tag:yaml.org,2002:int", _UniqueKeys.construct_yaml_int)


def _acyclic(value: Any, inside: tuple[int, ...] = (), done: set[int] | None = None) -> None:
    """yaml.YAMLError for a list or mapping that holds itself (`&a [*a]`): the checks recursed without end (exit 1).
    Each list or mapping is looked into once (`done`): aliases shared many times over are no loop, and walking each
    use took minutes for ten lines of nine aliases a level."""
    done = set() if done is None else done
    if isinstance(value, (dict, list)):
        if id(value) in inside:
            raise yaml.constructor.ConstructorError(problem="an alias (*name) names a list or mapping that holds it")
        if id(value) in done:
            return
        done.add(id(value))
        for item in value.values() if isinstance(value, dict) else value:
            _acyclic(item, (*inside, id(value)), done)


def _parse_value(raw: str, path: list[str] = ()) -> Any:
    """YAML-typed value: `64` -> int, `true` -> bool, `[64, 64]` -> list, else the string. A key that holds a
    string takes the text as it is: `FINETUNE_RUN_ID=2024-01-01` is that run id, not a date (nor `007` the int 7)."""
    if _annotation_at(path) is str:
        return raw.strip()  # as YAML reads the file's: `output.uri= /tmp/out` wrote into a folder named " "
    try:
        return yaml.load(raw, Loader=_UniqueKeys) if raw != "" else ""  # a SafeLoader
    except (yaml.YAMLError, RecursionError):
        return raw


def _annotation_at(path: list[str]) -> Any:
    """The type a config key is declared with, or None for a key that is not one."""
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model if path else None


def _env_overrides(environ: dict[str, str]) -> list[tuple[list[str], Any, str]]:
    """FINETUNE_TRAIN__BATCH_SIZE=64 -> (["train", "batch_size"], 64).

    Variables whose first part is not a config section are ignored: Kubernetes injects
    FINETUNE_JOB_SERVICE_HOST and friends for a Service called finetune-job.
    """
    sections = set(Config.model_fields)
    found = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if path[0] in sections:
            found.append((path, _parse_value(environ[name], path), f"environment variable {name}"))
        elif not _SERVICE_LINK.match(environ[name]) and (meant := _key_paths().get("_".join(path))):
            # FINETUNE_TRAIN_BATCH_SIZE: one `_` where `__` parts the section from its key; ignored, it trained at
            # the file's batch size without a word.
            raise ConfigError(f"environment variable {name} is not read: did you mean "
                              f"{ENV_PREFIX}{'__'.join(meant).upper()}? (`__` between a section and its key)")
        elif len(path) > 1 and not _SERVICE_LINK.match(environ[name]):
            # FINETUNE_TRIAN__BATCH_SIZE: `__` is written for the job alone; ignored, it trained without a word
            raise ConfigError(f"environment variable {name}: no config section '{path[0]}'"
                              f"{did_you_mean(path[0], sections)} (FINETUNE_<SECTION>__<KEY>)")
    return found


# What Kubernetes injects for a Service named like a section (`finetune-metrics`: FINETUNE_METRICS_PORT=tcp://...).
_SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://")


@functools.cache
def _key_paths(model: Any = None, above: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """{"train_batch_size": ("train", "batch_size"), ...}: every key below a section, joined with single `_`."""
    found = {}
    for name, field in (model or Config).model_fields.items():
        path = (*above, name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found |= _key_paths(ann, path)
        elif above:
            found["_".join(path)] = path
    return found


def _set_overrides(assignments: list[str]) -> list[tuple[list[str], Any, str]]:
    found = []
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.batch_size=64")
        path = key.strip().split(".")
        found.append((path, _parse_value(raw, path), f"--set {key.strip()}"))
    return found


def _describe(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _field_names_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return list(model.model_fields)
        model = ann
    return list(model.model_fields)


def _field_path(loc: tuple) -> tuple:
    """The config key of an error location, without pydantic's union-member tags ('int', "literal['auto']")."""
    path, model = [], Config
    for part in loc:
        fields = model.model_fields if model else {}
        if str(part) not in fields:
            if not path or model is not None:
                path.append(part)  # an unknown key: keep it, it is what the user wrote
            break
        path.append(part)
        ann = fields[str(part)].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return tuple(path)


def _cut(text: str, most: int = 120) -> str:
    """`text` up to `most` characters, the rest counted (a number of 4,301 digits was quoted whole)."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def one_line(err: ValidationError) -> str:
    """The first pydantic error, as `key: problem` on one line, with a did-you-mean for typos.

    A value that fits none of a union's forms gets all of them: "Input should be 'auto' or ... boolean".
    """
    errors = err.errors()
    e = errors[0]
    loc = _field_path(e["loc"]) if e["type"] != "extra_forbidden" else tuple(e["loc"])
    key = _describe(loc)
    same_key = [x for x in errors if x["type"] != "extra_forbidden" and _field_path(x["loc"]) == loc]
    if len(same_key) > 1:
        msgs = list(dict.fromkeys(x["msg"].removeprefix("Value error, ") for x in same_key))
        e = {**e, "msg": " or ".join(msgs)}
    if e["type"] == "extra_forbidden":
        parent = _describe(loc[:-1])
        hint = did_you_mean(str(loc[-1]), _field_names_at(loc[:-1]), prefix=f"{parent}." if parent else "")
        return f"config: unknown key {key!r}{hint}"  # (repr: a line break in it printed two lines)
    if e["type"] == "missing":
        return f"config: '{key}' is required"
    msg = e["msg"].removeprefix("Value error, ")
    if key:
        given = e.get("input")
        shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {_cut(masked(repr(given)))})"
        if e["type"] == "string_type" and isinstance(given, (bool, int, float, dt.date)):  # YAML typed the text
            kind = {bool: "a boolean", int: "a number", float: "a number"}.get(type(given), "a date")
            shown = f": YAML read {given!r} as {kind}; quote it ({loc[-1]}: \"...\")"
        return _on_one_line(f"config: {key}: {msg}{shown}")  # (the value: a URL's user:password@ as config.yaml
    return _on_one_line(f"config: {msg}")  # shows it)


# What str.splitlines breaks at: a value quoted raw in a validator's message (a backbone "0\r0") printed two lines.
_LINE_BREAKS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
                for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def _on_one_line(message: str) -> str:
    return message.translate(_LINE_BREAKS)


def load(path: str | os.PathLike | None, assignments: list[str] = (), environ: dict | None = None) -> Config:
    """Resolve defaults < file < environment < --set into a validated Config, or raise ConfigError."""
    environ = dict(os.environ if environ is None else environ)
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # a SafeLoader
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} cannot be read: {e}") from None
        except RecursionError:  # (PyYAML's parser, some 490 levels deep: exit 1, a traceback)
            raise ConfigError(f"config file {p}: lists or mappings nested too deeply to read") from None
        except yaml.YAMLError as e:
            mark, begun = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            # An unclosed `[` is found at the end of the file: the line where it began is the one to look at.
            context = f"; {e.context} begun on line {begun.line + 1}" if begun and getattr(e, "context", None) and \
                (not mark or begun.line != mark.line) else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())  # (a ReaderError's is two lines)
            raise ConfigError(f"config file {p}{where}: not valid YAML ({problem}{context})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping of keys at the top level")
        tree = loaded or {}
    for keys, value, source in _env_overrides(environ) + _set_overrides(list(assignments)):
        _set_path(tree, keys, value, source)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None
    if not cfg.run_id:
        from job.distribute import tf_config_workers

        if tf_config_workers(environ)[1] > 1:
            raise ConfigError("config: run_id: required when TF_CONFIG lists several workers (all must share it)")
        cfg.run_id = default_run_id()
    _check_output_outside_splits(cfg)
    _check_inputs_outside_the_run(cfg)
    _check_key_length(cfg)
    return cfg


# S3 keys hold at most 1,024 bytes; the longest the job writes below a run's folder is a TensorBoard event file's
# (`tensorboard/events.out.tfevents.<time>.<host, up to 63>.<pid>.<n>.v2`, about 130 bytes): room left for it.
S3_KEY_BYTES, LONGEST_ARTIFACT = 1024, 200


def _check_key_length(cfg: Config) -> None:
    """ConfigError when the run's S3 keys would pass S3's limit: a 968-byte output prefix took the lease and failed
    3 s later on an event file's key (KeyTooLongError, exit 4, which the chart retries in vain)."""
    if not is_s3(cfg.output.uri):
        return
    prefix = "/".join(p for p in (split_s3(cfg.output.uri)[1], cfg.run_id) if p)
    if len(prefix.encode()) + 1 + LONGEST_ARTIFACT > S3_KEY_BYTES:
        raise ConfigError(f"config: output.uri: the run's folder ({len(prefix.encode())} bytes of key with run_id) "
                          f"leaves too little of S3's {S3_KEY_BYTES}-byte key for the files it holds (up to "
                          f"{LONGEST_ARTIFACT} more); choose a shorter prefix")


def _check_output_outside_splits(cfg: Config) -> None:
    """ConfigError when the run's artifacts would land in a split folder of the dataset: the next run would read
    their PNGs (curves, confusion matrix) as images of a class. A manifest names its files, so it is exempt."""
    if cfg.data.manifest:
        return

    run_folder = f"{cfg.output.uri.rstrip('/')}/{cfg.run_id}"
    for split in ("train", "validation", "test"):
        if within(run_folder, f"{cfg.data.uri.rstrip('/')}/{split}"):
            raise ConfigError(f"config: output.uri: the run's artifacts ({run_folder}) would go inside the dataset's "
                              f"{split}/ folder, where the next run would read them as images; choose an output "
                              "outside data.uri's train/, validation/ and test/")


def _check_inputs_outside_the_run(cfg: Config) -> None:
    """ConfigError when the dataset, its manifest or the weights file lie in the run's own folder: an overwrite
    (`output.overwrite`) deletes that folder's files, and took the user's images or base weights with them."""
    run_folder = f"{cfg.output.uri.rstrip('/')}/{cfg.run_id}"
    inputs = {"data.uri": cfg.data.uri, "data.manifest": cfg.data.manifest,
              "model.weights": "" if cfg.model.weights in ("imagenet", "none") else cfg.model.weights}
    for key, uri in inputs.items():
        if uri and within(uri, run_folder):
            raise ConfigError(f"config: {key}: {uri} lies inside the run's own folder ({run_folder}), whose files "
                              "an overwrite deletes and the run writes over; keep inputs outside output.uri's run")


def _redact_url(url: str) -> str:
    """`url` with its user:password@ as ***@ (the host as written: an IPv6 host kept its brackets, a port that is no
    number failed here with a traceback)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # `file://[d]/data`: "'d' does not appear to be an IPv4 or IPv6 address", exit 1 at training
        return masked(url)
    if "@" in parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return masked(url)


def redacted(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, with credentials embedded in URLs masked."""
    data = cfg.model_dump(mode="json")
    data["s3"]["endpoint_url"] = _redact_url(data["s3"]["endpoint_url"])
    data["metrics"]["pushgateway"] = _redact_url(data["metrics"]["pushgateway"])
    data["data"]["uri"] = _redact_url(data["data"]["uri"])
    data["output"]["uri"] = _redact_url(data["output"]["uri"])
    return data


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(redacted(cfg), sort_keys=False)
