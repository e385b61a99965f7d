# Set-up and everyday commands. Each target creates or reuses .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: serve test reliability loadtool bench bench-planner loadtest train eval dashboard docker compose venv clean

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

bench-planner: $(STAMP)
	$(PY) -m loadtest.bench_planner --out loadtest/results/bench_planner.json

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
	$(PY) -m planner.evaluate --config $(TRAIN_CONFIG)

# Dashboard PNG from a live server + local Prometheus (needs the prometheus binary).
dashboard: $(STAMP)
	$(PY) -m loadtest.dashboard_png --live --out deploy/dashboard.png

# Where a container engine runs.
docker:
	docker build -t crsm-serve:cpu .

compose:
	docker compose -f deploy/compose.yaml up --build

clean:
	rm -rf $(VENV) $(LOADTOOL) .pytest_cache .hypothesis
