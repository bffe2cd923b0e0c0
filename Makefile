# Two entry points that work on a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vprompt-installed
# The reference machines carry this torch build; never pin anything newer.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup assets quickstart test test-fast lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,serve]"
	touch $@

assets: $(STAMP)
	@bash scripts/install-assets.sh $(BIN)/python

quickstart: setup assets
	@$(BIN)/python scripts/quickstart.py runs/quickstart

test: setup assets
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow and not real" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
