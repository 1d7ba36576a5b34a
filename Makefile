# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench lint clean

$(STAMP): pyproject.toml setup.py proxy/router/_hash.c proxy/wire/_datarow.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pgfleet demo

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/pgbench_compare.py

lint: $(STAMP)
	$(BIN)/ruff check proxy tests

clean:
	rm -rf $(VENV) .pgfleet
