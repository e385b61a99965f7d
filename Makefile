# Set-up and everyday commands. Each target creates or reuses .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: serve test typecheck reliability loadtool bench bench-130m bench-mamba2 bench-planner bench-kernels bench-contention bench-resume bench-replicas loadtest train eval dashboard docker docker-cuda docker-test compose venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# On a machine without CUDA install the CPU wheel of torch first, so that the
# project's torch range is already satisfied and no CUDA build is pulled.
$(STAMP): $(PY) pyproject.toml
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Sessions survive restarts: kept in .crsm/sessions unless CRSM_SESSION_STORE or --session-store says otherwise.
serve: $(STAMP)
	CRSM_SESSION_STORE="$${CRSM_SESSION_STORE:-.crsm/sessions}" $(PY) -m server $(SERVE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# The type gate alone (tests/test_types.py runs it inside `make test`): mypy as configured in pyproject.toml.
typecheck: $(STAMP)
	$(PY) -m mypy

# The longer reliability run (generated requests over the document, minutes of mixed load, a storm of hang-ups).
reliability: $(STAMP)
	$(PY) -m loadtest.reliability --out loadtest/results/reliability.json

# aiperf for tests/test_loadtool.py, in a venv of its own: it pins dependencies the project's venv must not get.
LOADTOOL := .venv-loadtool
$(LOADTOOL)/bin/aiperf:
	$(PYTHON) -m venv $(LOADTOOL)
	$(LOADTOOL)/bin/python -m pip install --quiet "aiperf==0.13.0"

loadtool: $(LOADTOOL)/bin/aiperf

bench: $(STAMP)
	$(PY) -m loadtest.bench_engine --out loadtest/results/bench_engine.json

bench-130m: $(STAMP)
	$(PY) -m loadtest.bench_engine --shape 130m --repeats 3 --decode-tokens 32 --out loadtest/results/bench_engine_130m.json

# Mamba-2 of state-spaces/mamba2-130m's shape against transformers and, where found, llama.cpp (docs/performance.md).
bench-mamba2: $(STAMP)
	$(PY) -m loadtest.bench_engine --arch mamba2 --shape 130m --repeats 5 --decode-tokens 64 --out loadtest/results/bench_engine_mamba2_130m.json

bench-planner: $(STAMP)
	$(PY) -m loadtest.bench_planner --out loadtest/results/bench_planner.json

# Fused CPU kernels against eager; the engine beside a busy co-tenant; resumed sessions per store; drain and replicas.
bench-kernels: $(STAMP)
	$(PY) -m loadtest.bench_kernels --out loadtest/results/bench_kernels.json

bench-contention: $(STAMP)
	$(PY) -m loadtest.bench_contention --out loadtest/results/bench_contention.json

bench-resume: $(STAMP)
	$(PY) -m loadtest.bench_resume --out loadtest/results/bench_resume.json

bench-replicas: $(STAMP)
	$(PY) -m loadtest.bench_replicas --out loadtest/results/bench_replicas.json

loadtest: $(STAMP)
	$(PY) -m loadtest.bench_serving --out loadtest/results/bench_serving.json

# The default checkpoint's recipe: data, then stages 1-4 (resumable); then `make eval`, the planner-in-the-loop
# evaluation (a separate command: it runs the planner, which engine.train never imports; see checkpoints/README.md).
TRAIN_CONFIG ?= configs/default.json
data/pydoc/train.bin: | $(STAMP)
	$(PY) -m engine.train data --out data/pydoc

train: $(STAMP) data/pydoc/train.bin
	$(PY) -m engine.train pipeline --config $(TRAIN_CONFIG)

eval: $(STAMP)
	$(PY) -m planner.offline.evaluate --config $(TRAIN_CONFIG)

# Dashboard PNG from a live server + local Prometheus (needs the prometheus binary).
dashboard: $(STAMP)
	$(PY) -m loadtest.dashboard_png --live --out deploy/dashboard.png

# Where a container engine runs (docs/sessions-and-deploy.md, "Run with Docker"). pip's settings go in as build arguments:
#   make docker DOCKER_BUILD_ARGS="--build-arg PIP_INDEX_URL=https://mirror.example/simple"
docker:
	docker build $(DOCKER_BUILD_ARGS) -t crsm-serve:cpu .

# Needs BuildKit (DOCKER_BUILDKIT=1 with a 20.10 CLI, or buildx); a pip.conf can go in as a secret:
#   make docker-cuda DOCKER_BUILD_ARGS="--secret id=pip.conf,src=$$HOME/.config/pip/pip.conf"
docker-cuda:
	DOCKER_BUILDKIT=1 docker build $(DOCKER_BUILD_ARGS) -f deploy/docker/cuda.Dockerfile -t crsm-serve:cuda .

# The image built and run for real, as `make test` does (tests/test_docker.py), its figures written down.
docker-test: $(STAMP)
	CRSM_DOCKER_RESULTS=loadtest/results/docker_build.json $(PY) -m pytest -q tests/test_docker.py

# Compose v2 (`docker compose`); Grafana's admin password has no default.
compose:
	docker compose -f deploy/compose.yaml up --build

clean:
	rm -rf $(VENV) $(LOADTOOL) .pytest_cache .hypothesis
