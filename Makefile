# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README).
# torch is installed first, pinned to the local CPU build; everything else is pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test benchmark
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(BIN)/sspect demo --out demo-output

test: setup
	$(BIN)/python -m pytest

benchmark: setup
	$(BIN)/python benchmarks/real_bed_speed.py
