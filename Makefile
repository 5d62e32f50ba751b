# Fresh machine: `make demo` runs the main job, `make test` passes the tests.
# Both create .venv, install meal-ray with its pinned dependency set, and fetch Fashion-MNIST.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup data lint test test-fast test-faults demo demo-quick clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

data: $(VENV)/.installed
	bash scripts/get-fashion-mnist.sh $(BIN)/python

lint: $(VENV)/.installed
	$(BIN)/ruff check meal_ray tests bench scripts
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest -q --durations=15 -m "not faults" $(PYTEST_ARGS)

test-fast: setup lint
	$(BIN)/python -m pytest -q -m "not slow and not faults" $(PYTEST_ARGS)

test-faults: setup lint
	$(BIN)/python -m pytest -q --durations=10 -m faults $(PYTEST_ARGS)

demo: setup
	$(BIN)/meal-ray demo --output runs/demo

demo-quick: setup
	$(BIN)/meal-ray demo --quick --output runs/demo-quick

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
