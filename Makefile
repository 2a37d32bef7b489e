# The front door. `make help` lists the targets.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install test test-all train train-imagenet eval resume report tb demo-data prepare-demo prepare-imagenet \
        bench bench-data clean
DEMO_RAW ?= data/demo/raw
DEMO_STORE ?= data/demo/store
STORE ?= data/imagenet/store

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED) ## create .venv and install repro (editable) with its test extra

test: $(INSTALLED) ## the test suite without the slow tests (sets itself up first)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(INSTALLED) ## every test, the slow ones included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

train: prepare-demo ## the whole job on the demo data: generate, prepare, train, 10-patch eval, result table
	$(BIN)/repro-train experiment=demo $(ARGS)

train-imagenet: $(INSTALLED) ## the paper on ILSVRC-2012: make train-imagenet IMAGENET=/path/to/ilsvrc [STORE=...] [ARGS=...]
	@test -n "$(IMAGENET)" || { echo "usage: make train-imagenet IMAGENET=<folder with the ILSVRC-2012 archives or train/ val/> [STORE=$(STORE)]" >&2; exit 2; }
	@case "$(ARGS)" in *devices=*) ;; *) $(BIN)/python -m repro.runtime ;; esac  # two GPUs, before hours of preparation
	test -f $(STORE)/manifest.json || $(BIN)/repro-prepare $(IMAGENET) $(STORE)
	$(BIN)/repro-train experiment=paper data.store=$(STORE) $(ARGS)

eval: $(INSTALLED) ## evaluate a checkpoint (centre crop and 10 patches): make eval CKPT=runs/.../checkpoints/best.pt
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=<checkpoint> [ARGS='store=... devices=[cpu,cpu]']" >&2; exit 2; }
	$(BIN)/repro-eval checkpoint=$(CKPT) $(ARGS)

resume: $(INSTALLED) ## continue a run from its last checkpoint: make resume RUN=runs/<name>/<time>
	@test -n "$(RUN)" || { echo "usage: make resume RUN=<run folder> [ARGS=...]" >&2; exit 2; }
	$(BIN)/repro-resume $(RUN) $(ARGS)

report: $(INSTALLED) ## a finished run beside the paper's numbers (report.md): make report RUN=runs/<name>/<time>
	@test -n "$(RUN)" || { echo "usage: make report RUN=<run folder>" >&2; exit 2; }
	$(BIN)/repro-report $(RUN)

tb: $(INSTALLED) ## TensorBoard over every run in runs/ and multirun/
	$(BIN)/tensorboard --logdir_spec runs:runs,multirun:multirun

demo-data: $(INSTALLED) ## write the synthetic demo set (ILSVRC-2012 layout) to data/demo/raw
	$(BIN)/repro-demo-data --out $(DEMO_RAW)

prepare-demo: demo-data ## prepare the demo set into data/demo/store (its one truncated file is skipped on purpose)
	$(BIN)/repro-prepare $(DEMO_RAW) $(DEMO_STORE) --skip-bad

prepare-imagenet: $(INSTALLED) ## prepare ILSVRC-2012 once: make prepare-imagenet RAW=/path/to/ilsvrc OUT=/fast/disk/store
	@test -n "$(RAW)" -a -n "$(OUT)" || { echo "usage: make prepare-imagenet RAW=<folder with the ILSVRC-2012 archives or train/ val/> OUT=<store folder> [ARGS=--skip-bad]" >&2; exit 2; }
	$(BIN)/repro-prepare $(RAW) $(OUT) $(ARGS)

bench-data: $(INSTALLED) ## data-pipeline benchmark; writes docs/benchmarks.{md,json}
	$(BIN)/python tools/bench_data.py

bench: bench-data ## data, training and evaluation speed, GPU sections where there are GPUs; docs/benchmarks.{md,json}
	$(BIN)/python tools/bench.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) *.egg-info .pytest_cache
