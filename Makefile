# Two commands do everything on a fresh machine:
#   make demo   installs into .venv (if missing) and runs the end-to-end demo
#   make test   installs into .venv (if missing), checks the layers and import cycles (lint-imports) and runs the
#               test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_output

.PHONY: demo test install lint bench clean

$(BIN)/.nnunet-ood-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.nnunet-ood-installed

demo: install
	$(BIN)/nnunet_ood_demo --output $(DEMO_OUT)

test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

bench: install
	$(BIN)/python benchmarks/bench_mahalanobis.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_fit.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
