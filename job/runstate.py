"""The run state that checkpoints carry: where training is, what it has seen, and for which config.

Pure logic (no TensorFlow): the training loop changes it through its methods, the checkpoints store
it as JSON next to the weights, and a resumed run reads it back and checks that its config still
fits the one the checkpoint was trained with (`config_changes`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from job import recipe

PHASES = ("head", "finetune")

# Keys that may change between attempts of one run: where things go and how they are watched, the
# hardware (a retried pod may land on another node), and the epoch budgets upwards (epochs added).
SAFE_TO_CHANGE = ("run_id", "output.", "checkpoint.", "metrics.", "s3.", "distribution.", "data.cache_dir",
                  "data.max_bad_fraction", "data.max_image_pixels", "export.")
MAY_GROW = ("train.head.epochs", "train.finetune.epochs")


class NewerState(ValueError):
    """A checkpoint's run state written by a newer version of the job (fields this one does not know)."""


@dataclass
class RunState:
    phase: str = "head"  # head | finetune | refit_head | refit | trained
    epoch: int = 0  # epochs done in `phase`
    step: int = 0  # steps done in the current epoch
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0])  # loss and correct of the partial epoch
    best: list[float] | None = None  # (val_loss, val_accuracy) of the best epoch so far
    best_epoch: int = 0
    patience_used: int = 0
    history: dict[str, list[dict]] = field(default_factory=lambda: {p: [] for p in PHASES})
    # train.search: each fine-tuning trial at its pause (rate, best epoch and its scores, chosen; job/search.py)
    search: list[dict] = field(default_factory=list)
    # train.refit (job/refit.py): the chosen epochs and rate, and the validation report of the model they were
    # chosen with; {} before the refit starts or without one
    refit: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the training-relevant config, flattened
    # the dataset's classes (labels) in output order; [] in checkpoints written before it was kept
    classes: list[str] = field(default_factory=list)
    # what the dataset's listing said (sources.Source.fingerprint); "" in checkpoints written before it was kept
    dataset: str = ""
    # sha256 of the base's weights as built from model.weights (export.weights_fingerprint): a file replaced at the
    # same path between attempts resumed a head trained on the old base's features over the new base, without a word
    base: str = ""
    # a digest of the images of each split with their labels once staged (bad images out, validation carved): ""
    # in checkpoints written before it was kept
    splits: str = ""

    # ------------------------------------------------------------ JSON

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunState:
        """ValueError for a state this version cannot read (a newer version's fields, not an object): a TypeError
        from the constructor was exit 1 with a traceback."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError("the run state is not a JSON object")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise NewerState(f"its run state has fields this version of the job does not know: {', '.join(unknown)}: "
                             "written by a newer version; resume it with that version's image")
        return cls(**values)

    # ------------------------------------------------------------ transitions

    def resumes(self, phase: str) -> bool:
        """This state is partway through `phase` (a checkpoint of it was restored)."""
        return self.phase == phase and (self.epoch > 0 or self.step > 0)

    def start(self, phase: str) -> None:
        """Begin `phase` from its first epoch; the history of earlier phases stays."""
        self.phase, self.epoch, self.step, self.sums = phase, 0, 0, [0.0, 0.0]
        self.best, self.best_epoch, self.patience_used = None, 0, 0
        self.history.setdefault(phase, [])  # the refit's phases are added when they start

    def add_step(self, loss_sum: float, correct: float) -> None:
        self.sums[0] += loss_sum
        self.sums[1] += correct
        self.step += 1

    def end_epoch(self, record: dict, monitored: tuple[float, float], metric: str, patience: int,
                  epochs: int) -> bool:
        """Record a finished epoch; True when it is the best so far. Early stopping ends the phase's
        epochs when `patience` epochs in a row were not better."""
        self.history[self.phase].append(record)
        self.epoch, self.step, self.sums = record["epoch"], 0, [0.0, 0.0]
        if recipe.is_better(metric, monitored, self.best):
            self.best, self.best_epoch, self.patience_used = list(monitored), self.epoch, 0
            return True
        self.patience_used += 1
        if patience and self.patience_used >= patience:
            self.epoch = epochs
        return False

    def finish(self) -> None:
        """Training is over: evaluation and export can be redone from here without training again."""
        self.phase, self.epoch, self.step = "trained", 0, 0


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix + key).startswith("train.class_weight"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def training_config(config: dict) -> dict[str, Any]:
    """The flattened config minus the keys that are safe to change between attempts, and train.search's other keys
    when it searches nothing (one rate or none): they train nothing then, and a version that kept `search.epochs` as
    written beside a set rate refused to resume a run the one before had begun ("train.search.epochs: 3 -> 1")."""
    flat = {k: v for k, v in flatten(config).items() if not k.startswith(SAFE_TO_CHANGE)}
    if len(flat.get("train.search.learning_rates") or []) <= 1:
        flat = {k: v for k, v in flat.items() if not k.startswith("train.search.") or k.endswith(".learning_rates")}
    return flat


def config_changes(stored: dict[str, Any], current: dict[str, Any], grow: bool = True) -> list[str]:
    """`key: old -> new` for each training-relevant key that differs; epochs may only grow (`grow`: they may at all;
    not for a complete run, which nothing trains again)."""
    changes = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        grown = grow and key in MAY_GROW and isinstance(old, int) and isinstance(new, int) and new > old
        if old == new or grown or key in SAME_WITHOUT_A_LAST_SLASH and _unslashed(old) == _unslashed(new):
            continue
        changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


# Locations that name the same folder with or without a last `/` (`s3://b/data/` was refused as another dataset).
SAME_WITHOUT_A_LAST_SLASH = ("data.uri",)


def _unslashed(value: Any) -> Any:
    return value.rstrip("/") if isinstance(value, str) and value.rstrip("/") else value


ORDER = ("head", "finetune", "refit_head", "refit", "trained")


def grown_after_done(state: RunState, current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each epoch budget grown (MAY_GROW) whose phase the checkpoint has finished: nothing
    trains it again, so the run would end with the old epochs while its config.yaml and card said the new. From
    scratch (`model.weights: none`) the one fine-tuning phase trains the head's epochs too."""
    scratch = current.get("model.weights") == "none"
    done = {"train.head.epochs": "finetune" if scratch else "head", "train.finetune.epochs": "finetune"}
    return [f"{key}: {state.config[key]!r} -> {current[key]!r}" for key, phase in done.items()
            if key in state.config and current.get(key, 0) > state.config[key]
            and ORDER.index(state.phase) > ORDER.index(phase)]


def class_changes(stored: list[str], current: list[str]) -> str:
    """What differs between the classes a checkpoint was trained on and the dataset's now, in output order: ""
    when nothing does (or the checkpoint kept none). A renamed, added or reordered class moves the outputs' names."""
    if not stored or stored == current:
        return ""
    gone, new = [c for c in stored if c not in current], [c for c in current if c not in stored]
    said = ([f"gone: {', '.join(gone)}"] if gone else []) + ([f"new: {', '.join(new)}"] if new else [])
    return "; ".join(said) or f"another order: {', '.join(stored)} -> {', '.join(current)}"
