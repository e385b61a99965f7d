# CRSM serve, CPU image. Any builder builds it: the legacy builder and BuildKit.
#
#   docker build -t crsm-serve .
#   docker run --rm -p 127.0.0.1:8000:8000 crsm-serve
#
# The CUDA image has a file of its own, deploy/docker/cuda.Dockerfile: a
# builder without BuildKit builds every stage of a file up to its target, so
# CUDA stages in this file would be built for a plain `docker build .`.
#
# pip's settings are build arguments (pip reads them as PIP_* variables); they
# exist only in the build stages, never in the image that ships:
#   --build-arg PIP_INDEX_URL=https://mirror.example/simple
#   --build-arg PIP_EXTRA_INDEX_URL=... PIP_FIND_LINKS=... PIP_TRUSTED_HOST=...
#   --build-arg PIP_CERT_PEM="$(cat proxy-ca.pem)"   # CA certificates pip trusts too
#   --build-arg TORCH_INDEX_URL=        # empty: torch from pip's settings too
# No secret belongs in a build argument (docs/sessions-and-deploy.md, "Run with Docker", says how
# to build behind a mirror that needs credentials).
#
# Layers: the dependencies are installed from pyproject.toml alone, before
# the source is copied, so a source edit rebuilds one small layer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- dependencies
FROM ${PYTHON_IMAGE} AS cpu-deps
ARG TORCH_VERSION=2.13.0
# Only torch comes from this index (its CPU wheels); everything else from pip's settings (PyPI by default).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
# PEM text of CA certificates to trust besides pip's own (a proxy's); public, not secret.
ARG PIP_CERT_PEM
ARG PIP_DEFAULT_TIMEOUT=60
ENV PYTHON=/opt/venv/bin/python CRSM_SITE=/opt/crsm/site
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/install.sh deploy/docker/install.sh
RUN sh deploy/docker/install.sh deps cpu /src

# ---------------------------------------------------------------- the project
FROM cpu-deps AS cpu-build
COPY README.md ./
COPY engine engine
COPY planner planner
COPY server server
RUN sh deploy/docker/install.sh project /src

# ---------------------------------------------------------------- CPU runtime (the default: last stage)
FROM ${PYTHON_IMAGE} AS cpu
# A real user with a writable HOME: torch calls getpass.getuser(). The session store's folder is a volume.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin crsm \
 && mkdir -p /models /var/lib/crsm/sessions \
 && chown -R 10001:10001 /models /var/lib/crsm
COPY --from=cpu-deps /opt/venv /opt/venv
COPY checkpoints/default /opt/crsm/checkpoints/default
COPY --from=cpu-build /opt/crsm/site /opt/crsm/site
# CRSM_DRAIN_TIMEOUT: SIGTERM lets streams finish this long, under `docker stop`'s 10 s grace.
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
# Probes /ready every 3 s (Docker 20.10 has no --start-interval): healthy within 3 s of readiness.
HEALTHCHECK --interval=3s --timeout=3s --start-period=60s --retries=3 CMD ["python", "-m", "server.healthcheck"]
CMD ["python", "-m", "server"]
