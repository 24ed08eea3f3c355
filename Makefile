# adamshap: `make demo` runs the default recipe end to end; `make test` runs the test suite.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_RECIPE ?= recipes/digits-mlp.yaml
# The shipped models are tiny: one intra-op thread per process is fastest, and it keeps
# pytest -n 2 (two workers) and a busy machine from oversubscribing the cores.
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-all bench lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e '.[dev]'

demo: install
	$(PYTHON) -m adamshap_cli train $(DEMO_RECIPE) --name demo --force

test: install
	$(PYTHON) -m pytest -q -n 2

test-all: install
	$(PYTHON) -m pytest -q -n 2 -m ""

bench:
	@echo "not yet: see issue 6"

lint:
	$(PYTHON) -m ruff check .
