# syntax=docker/dockerfile:1
# CRSM serve image.
#
#   docker build -t crsm-serve .                          # CPU (default target)
#   docker build --target cuda -t crsm-serve:cuda .       # CUDA + mamba-ssm kernels
#   docker run -p 8000:8000 crsm-serve
#
# Both targets install through deploy/docker/install.sh, the script that
# tests/test_deploy.py also runs in a fresh venv. Options are CRSM_*
# environment variables (README, "Options"); another checkpoint is mounted
# and named: -v /path/model:/models/mine:ro -e CRSM_CHECKPOINT=/models/mine

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------- CUDA build
FROM ${CUDA_DEVEL_IMAGE} AS cuda-build
ARG TORCH_VERSION=2.13.0
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHON=/opt/venv/bin/python TORCH_VERSION=${TORCH_VERSION}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY planner planner
COPY server server
COPY deploy/docker/install.sh deploy/docker/install.sh
RUN sh deploy/docker/install.sh cuda /src

# ---------------------------------------------------------------- CUDA runtime
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin crsm \
 && mkdir -p /models && chown crsm:crsm /models
COPY --from=cuda-build /opt/venv /opt/venv
COPY checkpoints/default /opt/crsm/checkpoints/default
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CRSM_CHECKPOINT=/opt/crsm/checkpoints/default \
    CRSM_HOST=0.0.0.0 \
    CRSM_PORT=8000
USER 10001:10001
WORKDIR /home/crsm
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-m", "server.healthcheck"]
CMD ["python", "-m", "server"]

# ---------------------------------------------------------------- CPU build
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION=2.13.0
# Only torch comes from this index (its CPU wheels); everything else from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHON=/opt/venv/bin/python TORCH_VERSION=${TORCH_VERSION} TORCH_INDEX_URL=${TORCH_INDEX_URL}
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY planner planner
COPY server server
COPY deploy/docker/install.sh deploy/docker/install.sh
RUN sh deploy/docker/install.sh cpu /src

# ---------------------------------------------------------------- CPU runtime (default)
FROM ${PYTHON_IMAGE} AS cpu
# A real user with a writable HOME: torch calls getpass.getuser().
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin crsm \
 && mkdir -p /models && chown crsm:crsm /models
COPY --from=cpu-build /opt/venv /opt/venv
COPY checkpoints/default /opt/crsm/checkpoints/default
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRSM_CHECKPOINT=/opt/crsm/checkpoints/default \
    CRSM_HOST=0.0.0.0 \
    CRSM_PORT=8000
USER 10001:10001
WORKDIR /home/crsm
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "server.healthcheck"]
CMD ["python", "-m", "server"]
