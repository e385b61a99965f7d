#!/bin/sh
# Install CRSM serve in two steps, so that an image rebuilds only the second after a source edit.
#
#   deploy/docker/install.sh deps cpu|cuda [PROJECT_DIR]   torch + the dependencies in PROJECT_DIR/pyproject.toml
#   deploy/docker/install.sh project [SOURCE_DIR]          the project alone (--no-deps) into $CRSM_SITE
#
# The Dockerfiles run both steps, and tests/test_deploy.py runs them in a fresh
# venv, so the image's recipe is exercised even where no container engine runs.
#   deps cpu    torch (a CPU build: checked, so pip can never slip a multi-GB
#               CUDA build in), then the project's dependencies, read from
#               pyproject.toml alone: no source is needed for this step.
#   deps cuda   torch's CUDA wheel, checked against this machine's nvcc (the
#               kernels below are compiled by that nvcc against that torch),
#               then the dependencies and the `cuda` extra (mamba-ssm,
#               causal-conv1d; --no-build-isolation: built against this torch).
#   project     the project into $CRSM_SITE (pip --target, offline: the deps
#               step installed its build requirements), made importable by a
#               .pth file the deps step wrote: one small folder per edit.
# Environment: PYTHON (default python3), TORCH_VERSION (default 2.13.0),
# TORCH_INDEX_URL (the index torch comes from; empty or unset: pip's own
# configuration decides), CUDA_PINS (requirements added for cuda, e.g. the
# kernels' versions), CRSM_SITE (default /opt/crsm/site), PIP_CERT_PEM (PEM
# text of CA certificates pip trusts besides its own bundle, for the deps step).
# pip reads its other settings from PIP_* variables or a pip.conf.
set -eu

python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
site=${CRSM_SITE:-/opt/crsm/site}

pip() { "$python" -m pip install --no-cache-dir --disable-pip-version-check --quiet "$@"; }
usage() { echo "usage: $0 deps cpu|cuda [PROJECT_DIR] | $0 project [SOURCE_DIR]" >&2; exit 2; }

# What pyproject.toml needs, one per line: its build requirements (the project step then builds offline), its
# dependencies and the extras named.
requirements() {
  "$python" - "$1" "${2:-}" <<'EOF'
import sys, tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))
project, build = meta["project"], meta["build-system"]["requires"]
extras = [e for e in sys.argv[2].split(",") if e]
print("\n".join(build + project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]))
EOF
}

# torch must be the build the variant needs: a CPU build, or a CUDA build whose CUDA is this nvcc's.
check_torch() {
  "$python" - "$1" <<'EOF'
import re, shutil, subprocess, sys, torch
variant, cuda = sys.argv[1], torch.version.cuda
if variant == "cpu" and cuda is not None:
    sys.exit(f"torch {torch.__version__} is a CUDA {cuda} build: give pip a CPU wheel "
             "(TORCH_INDEX_URL, or PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL holding torch-*+cpu)")
if variant == "cuda":
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    found = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                            text=True).stdout)
    if cuda is None or found is None or found.group(1) != ".".join(cuda.split(".")[:2]):
        sys.exit(f"torch {torch.__version__} (CUDA {cuda}) does not match nvcc "
                 f"{found.group(1) if found else 'missing'}: the kernels would not build against it")
print(f"torch {torch.__version__} (CUDA {cuda}) for {variant}")
EOF
}

deps() {
  variant=$1 dir=$2
  if [ -n "${PIP_CERT_PEM:-}" ]; then  # extra CA certificates (a TLS-inspecting proxy's): pip trusts them too
    bundle=$(mktemp)
    "$python" -c 'from pip._vendor import certifi; print(open(certifi.where()).read())' > "$bundle"
    printf '%s\n' "$PIP_CERT_PEM" >> "$bundle"
    export PIP_CERT="$bundle"
  fi
  case "$variant" in
    cpu)
      if [ -n "${TORCH_INDEX_URL:-}" ]; then
        pip --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
      else
        pip "torch==$torch_version"
      fi
      check_torch cpu
      requirements "$dir/pyproject.toml" > /tmp/crsm-requirements.txt
      isolation=""
      ;;
    cuda)
      if [ -n "${TORCH_INDEX_URL:-}" ]; then
        pip --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
      else
        pip "torch==$torch_version"
      fi
      pip packaging ninja wheel "setuptools>=68"
      check_torch cuda
      requirements "$dir/pyproject.toml" cuda > /tmp/crsm-requirements.txt
      for pin in ${CUDA_PINS:-}; do echo "$pin" >> /tmp/crsm-requirements.txt; done
      isolation="--no-build-isolation"
      ;;
    *) usage ;;
  esac
  # shellcheck disable=SC2086
  pip $isolation -r /tmp/crsm-requirements.txt
  rm -f /tmp/crsm-requirements.txt "${bundle:-}"
  purelib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$purelib/crsm-site.pth"
  echo "installed the dependencies ($variant) into $("$python" -c 'import sys; print(sys.prefix)')"
}

project() {
  src=$1
  pip --no-deps --no-build-isolation --no-index --target "$site" "$src"
  # The server must import with what was installed (no test or dev packages),
  # from outside the source tree so that the installed copy is the one found.
  (cd / && "$python" -c "import server.cli, server.healthcheck, engine.loop.scheduler, planner.pool")
  echo "installed crsm-serve into $site"
}

here=$(cd "$(dirname "$0")/../.." && pwd)
case "${1:-}" in
  deps) [ $# -ge 2 ] || usage; deps "$2" "${3:-$here}" ;;
  project) project "${2:-$here}" ;;
  *) usage ;;
esac
