"""The package's layers, pinned: the data modules never import the training loop or the export, and the
modules documented as TensorFlow-free import no TensorFlow. Each import runs in a fresh interpreter, so
what one module pulls in is what is seen."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DATA = ["job.layout", "job.headers", "job.manifest", "job.shards", "job.sources", "job.readers", "job.pack",
        "job.dataset", "job.stream"]
TENSORFLOW_FREE = ["job.layout", "job.headers", "job.manifest", "job.shards", "job.sources", "job.readers", "job.pack",
                   "job.model_card", "job.runstate", "job.recipe", "job.config", "job.cli", "job.pipeline"]
TRAINING_AND_EXPORT = ("job.loop", "job.export", "job.formats", "job.model", "job.checkpoint", "job.pipeline")


def imported_by(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(set(DATA) | set(TENSORFLOW_FREE)))
def test_layers(module):
    imported = imported_by(module)
    if module in DATA:  # the data modules never import training or export
        assert not imported & set(TRAINING_AND_EXPORT) - {module}
    if module in TENSORFLOW_FREE:
        assert not {m for m in imported if m == "tensorflow" or m.startswith(("tensorflow.", "keras"))}
