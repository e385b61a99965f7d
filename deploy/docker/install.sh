#!/bin/sh
# Install CRSM serve and its runtime dependencies into the Python environment of $PYTHON.
#
#   deploy/docker/install.sh cpu|cuda [SOURCE_DIR]
#
# The Dockerfile runs this script, and tests/test_deploy.py runs it in a fresh
# venv, so the image's recipe is exercised by CI even where no container
# engine runs. Variants:
#   cpu   torch (CPU build) first, so that the project's torch range is
#         already satisfied and pip never pulls a multi-GB CUDA build; then
#         the project.
#   cuda  torch's default (CUDA) wheel, then the project with the `cuda`
#         extra: mamba-ssm and causal-conv1d kernels, built against that
#         torch (hence --no-build-isolation; needs nvcc, as in a CUDA devel
#         image).
# Environment: PYTHON (default python3), TORCH_VERSION (default 2.13.0),
# TORCH_INDEX_URL (an index holding CPU torch wheels; unset: pip's own
# configuration decides, as on a machine whose wheel cache has the CPU build).
set -eu

variant=${1:-}
src=${2:-$(cd "$(dirname "$0")/../.." && pwd)}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}

pip() { "$python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "$@"; }

case "$variant" in
  cpu)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      pip --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
    else
      pip "torch==$torch_version"
    fi
    pip "$src"
    ;;
  cuda)
    pip "torch==$torch_version" packaging ninja wheel "setuptools>=68"
    pip --no-build-isolation "$src[cuda]"
    ;;
  *)
    echo "usage: $0 cpu|cuda [SOURCE_DIR]" >&2
    exit 2
    ;;
esac

# The server must import with what was installed (no test or dev packages),
# from outside the source tree so that the installed copy is the one found.
(cd / && "$python" -c "import server.cli, server.healthcheck, engine.scheduler, planner.pool")
echo "installed crsm-serve ($variant) into $("$python" -c 'import sys; print(sys.prefix)')"
