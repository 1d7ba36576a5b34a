# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_APPS := tests/apps/node
NODE_STAMP := $(NODE_APPS)/node_modules/.installed

.PHONY: demo test install bench lint clean

$(STAMP): pyproject.toml setup.py proxy/router/_hash.c proxy/wire/_datarow.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The Node.js drivers of the app tier (tests/apps/test_node.py), from the npm registry.
$(NODE_STAMP): $(NODE_APPS)/package.json
	cd $(NODE_APPS) && npm install --silent --no-package-lock
	touch $(NODE_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pgfleet demo

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/pgbench_compare.py

lint: $(STAMP)
	$(BIN)/ruff check proxy tests

clean:
	rm -rf $(VENV) .pgfleet
