# `make demo` and `make test` do all the set-up on a fresh machine: a .venv with vitkit installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/vitkit demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/throughput.py --steps 10
	$(BIN)/python bench/digits_accuracy.py
	$(BIN)/python bench/attack.py
	$(BIN)/python bench/certify.py --images 500 --full-images 100 --out bench/results/certify-untrained-cpu.json

clean:
	rm -rf runs .pytest_cache
