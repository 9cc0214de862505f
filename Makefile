# Two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch is pinned here: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/raven run

test: $(STAMP)
	$(BIN)/ruff check bot adapters tests bench
	$(BIN)/mypy bot adapters bench
	$(BIN)/pytest -q -n 2

bench: $(STAMP)
	$(BIN)/raven bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
