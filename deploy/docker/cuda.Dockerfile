# CRSM serve, CUDA image: torch's CUDA build and the mamba-ssm / causal-conv1d kernels, compiled here.
#
#   DOCKER_BUILDKIT=1 docker build -f deploy/docker/cuda.Dockerfile -t crsm-serve:cuda .   # or docker buildx build
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 crsm-serve:cuda
#
# A file of its own (the CPU image is ../../Dockerfile): a builder without
# BuildKit builds every stage of a file up to its target, so a plain
# `docker build .` would build these stages too. This one needs BuildKit (the
# pip.conf secret below); it has not been built here (no GPU, no registry).
#
# The pairing: torch 2.13.0 from PyPI is its CUDA 13.0 build (its metadata
# requires cuda-toolkit==13.0.3, nvidia-cudnn-cu13), so the kernels are built
# by nvcc 13.0 from the CUDA 13.0 devel image, and mamba-ssm 2.3.2.post1 /
# causal-conv1d 1.7.0 are the releases whose setup.py knows CUDA 13 (no
# sm_53..sm_72, which nvcc 13 dropped). install.sh stops the build when
# torch.version.cuda and nvcc's release differ. Another torch means another
# base image: e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 with
# CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04 (and its runtime).
#
# pip's settings: build arguments as in ../../Dockerfile, or a whole pip.conf
# as a BuildKit secret, which never lands in a layer:
#   --secret id=pip.conf,src=$HOME/.config/pip/pip.conf

ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------- dependencies and kernels
FROM ${CUDA_DEVEL_IMAGE} AS cuda-deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL
ARG CUDA_PINS="mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0"
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT_PEM
ARG PIP_DEFAULT_TIMEOUT=60
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# The kernels are compiled from source against this torch, not fetched as prebuilt wheels from GitHub.
ENV PYTHON=/opt/venv/bin/python CRSM_SITE=/opt/crsm/site \
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=4
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/install.sh deploy/docker/install.sh
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf sh deploy/docker/install.sh deps cuda /src

# ---------------------------------------------------------------- the project
FROM cuda-deps AS cuda-build
COPY README.md ./
COPY engine engine
COPY planner planner
COPY server server
RUN sh deploy/docker/install.sh project /src

# ---------------------------------------------------------------- CUDA runtime
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin crsm \
 && mkdir -p /models /var/lib/crsm/sessions \
 && chown -R 10001:10001 /models /var/lib/crsm
COPY --from=cuda-deps /opt/venv /opt/venv
COPY checkpoints/default /opt/crsm/checkpoints/default
COPY --from=cuda-build /opt/crsm/site /opt/crsm/site
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRSM_CHECKPOINT=/opt/crsm/checkpoints/default \
    CRSM_HOST=0.0.0.0 \
    CRSM_PORT=8000 \
    CRSM_DRAIN_TIMEOUT=8 \
    CRSM_SESSION_STORE=/var/lib/crsm/sessions
VOLUME ["/var/lib/crsm/sessions"]
USER 10001:10001
WORKDIR /home/crsm
EXPOSE 8000
HEALTHCHECK --interval=3s --timeout=3s --start-period=120s --retries=3 CMD ["python", "-m", "server.healthcheck"]
CMD ["python", "-m", "server"]
