# Two entry points that work on a fresh machine with Python >= 3.10: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-all demo leaderboard clean

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

# The committed leaderboard/shapes-world/: the demo with 3 training seeds per method and subject.
leaderboard: install
	$(BIN)/kps-bench demo --seed 0 --seed 1 --seed 2 --out kps-bench-leaderboard

clean:
	rm -rf $(VENV) .pytest_cache kps-bench-demo kps-bench-leaderboard
