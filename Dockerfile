# syntax=docker/dockerfile:1
#
# factorizer-cli on a CUDA GPU (falls back to the CPU where none is visible).
#
#   docker build -t factorizer-cli:0.1.0 --build-arg MODELS="isles22-swin-factorizer" .
#   docker run --rm --gpus all -v "$PWD/in:/input:ro" -v "$PWD/out:/output" \
#       factorizer-cli:0.1.0 segment /input -o /output --model isles22-swin-factorizer
#
# Needs BuildKit (the default builder since Docker 23) for the RUN --mount lines.
# The PyPI builds of torch 2.13 and onnxruntime-gpu 1.31 are CUDA 13 builds: the host needs an
# NVIDIA driver >= 580 and the NVIDIA Container Toolkit (`--gpus all`; Apptainer: `--nv`).
#
# Models: FACTORIZER_HOME=/models (the hub cache in /models/huggingface) belongs to the non-root user.
# Bake zoo models in with --build-arg MODELS="NAME ...", or mount a volume at /models to keep
# downloads across runs (a new named volume starts with the baked models; a host folder hides them).

FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive

# Python 3.12, Ubuntu 24.04's own. The version is pinned to the upstream release (3.12.3) and the
# Ubuntu revision left open: noble-updates keeps only the latest security revision, so an exact pin
# would stop building at the next update.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12=3.12.3-1ubuntu0.* \
        python3.12-venv=3.12.3-1ubuntu0.* \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The heavy, CUDA-specific layer first: it changes only with these two versions. onnxruntime-gpu is
# the package of the `gpu` extra (`pip install factorizer-cli[gpu]`), pinned here.
ARG TORCH_VERSION=2.13.0
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"

# The other dependencies and the `gpu` and `atlas` extras, read from pyproject.toml (rebuilt only when it
# changes): what `pip install factorizer-cli[gpu,atlas]` installs (atlas: the MNI152 template that SPiN
# cards register to). torch and onnxruntime-gpu are already here, and the
# CPU package onnxruntime is left out: onnxruntime-gpu provides the same module, and the CPU package
# would overwrite it.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    python -c 'import re, tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; deps = p["dependencies"] + p["optional-dependencies"]["gpu"] + p["optional-dependencies"]["atlas"]; print("\n".join(d for d in deps if re.match(r"[A-Za-z0-9._-]+", d).group().lower() not in ("torch", "onnxruntime")))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# A non-root user (numeric in USER below, so Kubernetes' runAsNonRoot can check it). Ubuntu 24.04
# images ship a user "ubuntu" with uid 1000: it makes way for ours.
ARG UID=1000
ARG GID=1000
RUN if id ubuntu > /dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid "${GID}" factorizer \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash factorizer \
    && mkdir -p /models /input /output \
    && chown "${UID}:${GID}" /models /output

# The package itself, from the build context (see .dockerignore). --no-deps: the dependencies are
# in place, with onnxruntime-gpu standing in for onnxruntime.
RUN --mount=type=bind,target=/tmp/factorizer-cli,rw \
    pip install --no-cache-dir --no-deps /tmp/factorizer-cli \
    && factorizer --version

ENV FACTORIZER_HOME=/models \
    HF_HOME=/models/huggingface

USER ${UID}:${GID}

# Zoo models baked into the image, as the non-root user (who owns them). Each is downloaded and
# checked, then converted once to our format, so that containers start ready, even read-only ones
# (Apptainer) and ones run with another --user.
ARG MODELS=""
# A model whose licence is not permissive (atlas-spin: non-commercial) is baked only with
# --build-arg FACTORIZER_ACCEPT_LICENSE=1; containers then still need the variable (or --accept-license).
ARG FACTORIZER_ACCEPT_LICENSE=""
RUN set -eu; \
    for name in ${MODELS}; do \
        factorizer models download "${name}"; \
        python -c 'import sys; from factorizer_cli.zoo.resolve import resolve_model; resolve_model(sys.argv[1])' "${name}"; \
    done

VOLUME ["/input", "/output"]
ENTRYPOINT ["factorizer"]
CMD ["--help"]
