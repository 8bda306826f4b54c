# syntax=docker/dockerfile:1.7
# finetune-job image: GPU-capable TensorFlow (CUDA libraries from pip, the `gpu` extra of
# pyproject.toml) and the job installed from its wheel. Build:
#   docker build -t finetune-job:dev --build-arg BAKE_WEIGHTS="mobilenet_v2 resnet50" .
# The same Python image is used for both stages so the virtual environment copied from the
# build stage finds its interpreter at the same path.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY job ./job
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && /opt/venv/bin/pip install --no-cache-dir "$(find /dist -name 'finetune_job-*.whl')[gpu]"

# Air-gapped clusters: bake the ImageNet weights of the named backbones (lower_snake_case
# keras.applications names, space separated) into /opt/finetune-job/weights/<name>.h5 and point
# `model.weights` at that file. Each file is the one Keras itself downloads for include_top=False;
# names are those of job/backbones.py.
ARG BAKE_WEIGHTS=""
COPY <<'PY' /usr/local/bin/bake-weights
"""bake-weights DEST NAME...: download keras.applications ImageNet weights (no top) into DEST."""
import os
import shutil
import sys
from pathlib import Path

import keras

from job import backbones

dest = Path(sys.argv[1])
cache = Path(os.environ["KERAS_HOME"]) / "models"
for name in sys.argv[2:]:
    try:
        constructor = getattr(keras.applications, backbones.get(name).constructor)
    except KeyError as e:
        sys.exit(f"bake-weights: {e.args[0]}")
    before = set(cache.glob("*.h5"))
    constructor(include_top=False, weights="imagenet")
    (downloaded,) = set(cache.glob("*.h5")) - before
    shutil.copyfile(downloaded, dest / f"{name}.h5")
    print(f"bake-weights: {name} -> {dest / name}.h5")
PY

RUN mkdir -p /opt/finetune-job/weights \
 && KERAS_HOME=/tmp/keras-bake /opt/venv/bin/python /usr/local/bin/bake-weights \
      /opt/finetune-job/weights ${BAKE_WEIGHTS} \
 && rm -rf /tmp/keras-bake

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.2.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG BAKE_WEIGHTS=""
LABEL org.opencontainers.image.title="finetune-job" \
      org.opencontainers.image.description="Fine-tunes keras.applications image classifiers from S3 and exports a TensorFlow SavedModel" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/finetune-job/finetune-job" \
      io.finetune-job.baked-weights="${BAKE_WEIGHTS}"

# A passwd entry for the numeric user: some libraries look the user up by uid.
RUN useradd --no-log-init --uid 10001 --user-group --no-create-home \
      --home-dir /tmp --shell /usr/sbin/nologin finetune

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/finetune-job/weights /opt/finetune-job/weights

# HOME and KERAS_HOME under /tmp: the root filesystem is read-only in the cluster and Keras
# writes ~/.keras. NVIDIA_* let the NVIDIA container runtime mount the driver into this
# non-CUDA base image. TF_CPP_MIN_LOG_LEVEL=2, the job's own default (README): TensorFlow's native
# lines below errors stay out of the pod's log unless set lower (1 had them shown in the cluster only).
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    KERAS_HOME=/tmp/.keras \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["finetune-job"]
CMD ["--help"]
