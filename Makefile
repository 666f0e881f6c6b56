# Each command sets up what it needs on a fresh machine: `make demo`, `make test` (and `make ui` to click through).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
export UV_COMPILE_BYTECODE := 1
export AIRFLOW__CORE__PARALLELISM ?= 4
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 3

.PHONY: install test demo ui bench soak lint lock emulator clean

install: $(VENV)/.installed

.tools/bin/uv:
	$(PY) -m venv .tools
	.tools/bin/pip install -q uv

$(VENV)/.installed: requirements.txt pyproject.toml | $(UV)
	$(UV) venv --allow-existing --python $(PY) $(VENV)
	$(UV) pip sync --python $(BIN)/python requirements.txt
	$(UV) pip install --python $(BIN)/python --no-deps -e .
	touch $@

# mypy reads its configuration (files, strictness) from pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m claude_batch.demo

# A local Airflow on 127.0.0.1 to click through (the demo's data, the emulator, moto); Ctrl-C stops it.
ui: install
	$(BIN)/python -m claude_batch.devstack $(if $(PORT),--port $(PORT))

bench: install
	$(BIN)/python -m bench.run_all

soak: install
	BENCH_SCALE=full $(BIN)/python -m bench.run_all

emulator: install
	$(BIN)/claude-batch-emulator --host 127.0.0.1 --port 0 --api-key sk-emulator

lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev --extra celery --python-version 3.11 \
		--no-header --no-annotate -o requirements.txt.new
	(echo "# Pinned dependency set for claude-batch (Python 3.11). Regenerate with: make lock"; \
		cat requirements.txt.new) > requirements.txt && rm requirements.txt.new

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache
