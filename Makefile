# finetune-job developer commands. Everything runs from ./.venv, which `make install` creates.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# tensorflow-cpu here and in CI; the Docker image installs the `gpu` extra instead.
EXTRAS ?= cpu,test
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= finetune-job:$(VERSION)
# BAKE_WEIGHTS="mobilenet_v2 resnet50" bakes those ImageNet weights into the image (air-gapped clusters).
BAKE_WEIGHTS ?=

.PHONY: install test test-fast run-local bench bench-quality bench-scale mutation lint helm-lint docker-build clean

install: $(VENV)/.installed

# -qq: errors only (setuptools' editable-install notice and pip's index warnings are not the user's business).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e ".[$(EXTRAS)]"
	touch $@

# Tests by tier: tests/unit (no TensorFlow, or tiny models on one CPU device; under 2 minutes),
# tests/e2e (real training, real S3 server, Prometheus), tests/deploy (chart, Dockerfile, alerts).
# Three workers on the 2-core machines, each taking whole files (module fixtures such as a shared training run
# stay shared): the suite waits on subprocesses, servers and timeouts as well as computing, and a third worker fills
# that (2026-12-06, one tree, quiet: 2 workers 19 min 35 s, 3 17 min 29 s, 4 17 min 47 s; the unit tier 76, 65-72
# and 62-65 s). --no-loadscope-reorder keeps the order tests/conftest.py gives (the longest files first); xdist's
# default puts the files with the most tests first, so the benchmarks' one-test files, the longest, came last and
# one worker ran them while the others idled.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: install
	$(PY) -m pytest tests $(XDIST)

test-fast: install
	$(PY) -m pytest tests/unit $(XDIST)

run-local: install
	$(PY) scripts/run_local.py

bench: install
	$(PY) bench/run.py

# Transfer tasks (Fashion-MNIST: apt-get install dataset-fashion-mnist): the job's defaults against
# plain-Keras scripts on two backbones, 3 seeds; several hours on 2 cores. ABLATION=1 runs instead one row
# per recipe choice on MobileNetV2, two runs at a time (about 2 hours on 2 cores).
bench-quality: install
	$(PY) bench/quality.py $(if $(ABLATION),--ablation --jobs 2)

# 70,000 Fashion-MNIST images through one run as objects, a manifest and shards (about an hour on 2 cores).
bench-scale: install
	$(PY) bench/scale.py

# Mutation testing ([tool.mutmut] in pyproject.toml: which modules, against tests/unit). Slow (10-30
# minutes on 2 cores); not part of `make test` nor CI. Results are kept in ./mutants and reused by the
# next run for unchanged code; `.venv/bin/mutmut show NAME` prints one mutant's diff.
MUTATION_JOBS ?= 2
mutation: install
	$(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS)
	$(PY) scripts/mutation_summary.py

lint: install
	$(VENV)/bin/ruff check job tests scripts bench

helm-lint: install
	$(PY) scripts/helm_lint.py

docker-build:
	docker build -t $(IMAGE) \
		--build-arg BAKE_WEIGHTS="$(BAKE_WEIGHTS)" \
		--build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
		--build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
		.

clean:
	rm -rf $(VENV) run-local bench/results bench/cache .pytest_cache mutants
