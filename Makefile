# adamshap: `make demo` runs the default recipe end to end; `make test` runs the type check and the test suite.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_RECIPE ?= recipes/digits-mlp.yaml
# The shipped models are tiny: one intra-op thread per process is fastest, and it keeps
# pytest -n 2 (two workers) and a busy machine from oversubscribing the cores.
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-all typecheck bench lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e '.[dev,hf]'

demo: install
	$(PYTHON) -m adamshap_cli train $(DEMO_RECIPE) --name demo --force

# the static type check of adamshap_core and cli (settings: pyproject.toml, [tool.mypy]); part of `make test`
typecheck: install
	$(PYTHON) -m mypy

test: typecheck
	$(PYTHON) -m pytest -q -n 2

test-all: install
	$(PYTHON) -m pytest -q -n 2 -m ""

# `make bench`: the MLP at batch 32 with its whole validation split and the GPT at batch 16 and 64
# with one validation sequence, each timed against plain training and the per-example baseline,
# exact and fast mode (see README, Speed), then one table of them all.
BENCH = $(PYTHON) -m adamshap_cli bench
BENCH_GPT ?= recipes/facts-gpt.yaml
BENCH_REPEATS ?= 3
BENCH_MLP_STEPS ?= 200
BENCH_GPT_STEPS ?= 100
BENCH_METHODS ?= adam adam,adam_fixed,sgd
BENCH_FAST ?= --fast
# the exact mode's fastest configuration: validation rows in the training batch (README, Speed)
BENCH_SET ?= --set attribution.fuse_validation=true

bench: install
	@set -e; suite=$${ADAMSHAP_RUNS:-runs}/bench/suite-$$(date +%Y%m%d-%H%M%S); \
	for m in $(BENCH_METHODS); do \
	  tag=$$(echo "$$m" | tr ',' '+'); common="--methods $$m $(BENCH_FAST) $(BENCH_SET) --repeats $(BENCH_REPEATS) --quiet"; \
	  $(BENCH) $(DEMO_RECIPE) --batch-size 32 --steps $(BENCH_MLP_STEPS) $$common --out $$suite/mlp-b32-$$tag; \
	  $(BENCH) $(BENCH_GPT) --batch-size 16 --val-batch 1 --steps $(BENCH_GPT_STEPS) $$common \
	    --out $$suite/gpt-b16-$$tag; \
	  $(BENCH) $(BENCH_GPT) --batch-size 64 --val-batch 1 --steps $(BENCH_GPT_STEPS) $$common \
	    --out $$suite/gpt-b64-$$tag; \
	done; \
	$(BENCH) --summary $$suite

lint: install
	$(PYTHON) -m ruff check .
