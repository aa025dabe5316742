# Two entry points that work on a fresh machine with Python >= 3.10: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-all demo clean

$(BIN)/kps-bench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

install: $(BIN)/kps-bench

test: install
	$(BIN)/python -m pytest -m "not slow"

test-all: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/kps-bench demo

clean:
	rm -rf $(VENV) .pytest_cache kps-bench-demo
