# Two commands do all the set-up on a fresh machine:
#   make serve   installs the serving runtime (no torch) and serves the shipped DE->EN model
#   make test    installs everything (torch CPU build, dev tools) and runs lint + the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test install-serve install-dev lint typecheck pytest protos clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install-serve: $(BIN)/python
	$(BIN)/pip install --quiet .

# torch first, pinned, so no dependency resolution can pull a CUDA build.
install-dev: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[train,dev]"

serve: install-serve
	$(BIN)/rosetta serve

test: install-dev lint pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy model export service

pytest:
	$(BIN)/python -m pytest -q

protos:
	$(BIN)/python -m service.proto.generate

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
