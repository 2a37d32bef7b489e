# The front door. `make help` lists the targets.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TESTED := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: help install test test-all train train-imagenet train-ddp eval resume report figures tb demo-data prepare-demo \
        prepare-imagenet convert-store bench bench-data preflight figure1 clean ablate-lrn ablate-pool ablate-towers ablate-pca ablate-dropout ablations \
        ablation-report
DEMO_RAW ?= data/demo/raw
# The demo store's records: raw (exact pixels) or jpeg (make train FORMAT=jpeg: its own store, data/demo/store-jpeg).
FORMAT ?= raw
DEMO_STORE ?= data/demo/store$(if $(filter-out raw,$(FORMAT)),-$(FORMAT))
STORE ?= data/imagenet/store
# Non-empty when STORE= was given (command line or environment), not the default above.
STORE_GIVEN := $(filter-out file,$(origin STORE))
comma := ,
OUT ?= docs/figures
NPROC ?= 1
NNODES ?= 1
RDZV ?=
RDZV_ID ?= repro

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED) ## create .venv and install repro (editable) with its test extra

# The tests also cover the sweeps' SLURM and GPU-pair launchers and the parquet reader, so they install the optional
# cluster and parquet extras too.
$(TESTED): $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e '.[test,cluster,parquet]'
	touch $@

test: $(TESTED) ## the test suite without the slow tests (sets itself up first)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(TESTED) ## every test, the slow ones included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

train: prepare-demo ## the whole job on the demo data: generate, prepare, train, 10-patch eval, result table [FORMAT=jpeg]
	$(BIN)/repro-train experiment=demo data.store=$(DEMO_STORE) $(ARGS)

train-imagenet: $(INSTALLED) ## the paper on ILSVRC-2012: make train-imagenet RAW=/path/to/ilsvrc [STORE=...] [ARGS=...]
	@test -n "$(RAW)" || { echo "usage: make train-imagenet RAW=<folder with ILSVRC-2012 in a layout docs/data.md lists> [STORE=$(STORE)]" >&2; exit 2; }
	@case "$(ARGS)" in *devices=*) ;; *) $(BIN)/repro-gpus ;; esac  # two GPUs, before hours of preparation
	test -f $(STORE)/manifest.json || $(BIN)/repro-prepare raw=$(RAW) store=$(STORE)
	$(BIN)/repro-train experiment=paper data.store=$(STORE) $(ARGS)

train-ddp: $(INSTALLED) ## DDP, one process per GPU pair: make train-ddp NPROC=2 [NNODES=2 RDZV=host:port] ARGS='experiment=paper data.store=...'
	@test -n "$(ARGS)" || { echo "usage: make train-ddp NPROC=<processes per node, each with two GPUs> [NNODES=<nodes> RDZV=<host:port of node 0>] ARGS='experiment=... data.store=... [hydra.run.dir=...]'" >&2; exit 2; }
	$(BIN)/torchrun --nnodes $(NNODES) --nproc_per_node $(NPROC) \
	  $(if $(RDZV),--rdzv-backend c10d --rdzv-endpoint $(RDZV) --rdzv-id $(RDZV_ID),--standalone) $(BIN)/repro-train $(ARGS)

eval: $(INSTALLED) ## evaluate a checkpoint (centre crop and 10 patches): make eval CKPT=runs/.../checkpoints/best.pt
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=<checkpoint> [STORE=...] [ARGS='devices=[cpu,cpu]']" >&2; exit 2; }
	$(BIN)/repro-eval checkpoint=$(CKPT) $(if $(STORE_GIVEN),store=$(STORE)) $(ARGS)

resume: $(INSTALLED) ## continue a run from its last checkpoint: make resume RUN=runs/<name>/<time>
	@test -n "$(RUN)" || { echo "usage: make resume RUN=<run folder> [ARGS=...]" >&2; exit 2; }
	$(BIN)/repro-resume run_dir=$(RUN) $(ARGS)

report: $(INSTALLED) ## a finished run beside the paper's numbers (report.md): make report RUN=runs/<name>/<time>
	@test -n "$(RUN)" || { echo "usage: make report RUN=<run folder>" >&2; exit 2; }
	$(BIN)/repro-report run_dir=$(RUN)

figures: $(INSTALLED) ## the paper's Figures 3 and 4 into RUN/figures/: make figures RUN=runs/<name>/<time> [ARGS=...]
	@test -n "$(RUN)" || { echo "usage: make figures RUN=<run folder> [ARGS='which=[conv1,neighbours,top5] queries=N devices=[cpu,cpu]']" >&2; exit 2; }
	$(BIN)/repro-figures run_dir=$(RUN) $(ARGS)

tb: $(INSTALLED) ## TensorBoard over every run in runs/ and multirun/
	$(BIN)/tensorboard --logdir_spec runs:runs,multirun:multirun

# Ablation sweeps (conf/ablation/): each runs the baseline and the variant(s) as one Hydra multirun into SWEEP, then
# writes its summary. EXPERIMENT=demo or tiny for a quick look; STORE=... to use another prepared store; SEEDS=0,1,2
# for repeats; SWEEP=<an earlier sweep folder> to resume it. LAUNCHER (docs/ablations.md): basic runs the jobs one
# after another on this box's GPUs (Hydra's own launcher); pairs runs one job per GPU pair of this box at once, and
# slurm submits one SLURM job per sweep point (both need pip install -e '.[cluster]'; SLURM keys through ARGS, e.g.
# ARGS='hydra.launcher.partition=gpu hydra.launcher.timeout_min=2880'). With slurm the command returns once it has
# started the sweep's driver in the background (it waits for the jobs, then writes the summary; SWEEP/sweep.log).
EXPERIMENT ?= paper
SEEDS ?= 0
LAUNCHER ?= basic
ABLATION_DEPS := $(INSTALLED) $(if $(filter demo tiny,$(EXPERIMENT)),prepare-demo)  # the demo store, made if missing
define ablate
	@case "$(LAUNCHER)" in basic) ;; pairs|slurm) $(BIN)/python -c 'import hydra_plugins.hydra_submitit_launcher' \
	    2>/dev/null || { echo "LAUNCHER=$(LAUNCHER) needs hydra-submitit-launcher: $(BIN)/pip install -e '.[cluster]'" >&2; \
	    exit 2; };; *) echo "LAUNCHER=$(LAUNCHER): one of basic, pairs, slurm" >&2; exit 2;; esac
	sweep=$(or $(SWEEP),multirun/$(1)/$$(date +%Y-%m-%d_%H-%M-%S)); \
	ablate() { $(BIN)/repro-train --multirun experiment=$(EXPERIMENT) name=$(1) ablation=$(2) seed=$(SEEDS) \
	    $(if $(STORE_GIVEN),data.store=$(STORE)) hydra.sweep.dir=$$sweep \
	    $(if $(filter-out basic,$(LAUNCHER)),hydra/launcher=$(LAUNCHER)) $(ARGS); status=$$?; \
	    $(BIN)/repro-ablation-report sweep=$$sweep && return $$status; }; \
	if [ "$(LAUNCHER)" = slurm ]; then \
	    mkdir -p $$sweep; (trap '' HUP; ablate) < /dev/null > $$sweep/sweep.log 2>&1 & \
	    echo "the sweep's driver (pid $$!, in the background; it survives logging out) submits the jobs, waits for them and writes the summary: $$sweep/sweep.log; squeue -u $$USER; make ablation-report SWEEP=$$sweep at any time"; \
	else ablate; fi
endef

ablate-lrn: $(ABLATION_DEPS) ## with and without response normalisation (§3.3): make ablate-lrn [EXPERIMENT=demo] [STORE=...] [LAUNCHER=pairs|slurm]
	$(call ablate,ablate-lrn,baseline$(comma)no_lrn)

ablate-pool: $(ABLATION_DEPS) ## overlapping 3x3/2 vs 2x2/2 pooling (§3.4)
	$(call ablate,ablate-pool,baseline$(comma)no_overlap_pool)

ablate-towers: $(ABLATION_DEPS) ## the two-tower net vs the one-GPU net (§3.2)
	$(call ablate,ablate-towers,baseline$(comma)one_tower)

ablate-pca: $(ABLATION_DEPS) ## with and without PCA colour noise (§4.1)
	$(call ablate,ablate-pca,baseline$(comma)no_pca)

ablate-dropout: $(ABLATION_DEPS) ## with and without dropout (§4.2)
	$(call ablate,ablate-dropout,baseline$(comma)no_dropout)

ablations: $(ABLATION_DEPS) ## all five ablations in one sweep with one shared baseline (6 runs) [LAUNCHER=pairs|slurm]
	$(call ablate,ablations,baseline$(comma)no_lrn$(comma)no_overlap_pool$(comma)one_tower$(comma)no_pca$(comma)no_dropout)

ablation-report: $(INSTALLED) ## summary.md/.json/.png of a sweep: make ablation-report SWEEP=multirun/<name>/<time>
	@test -n "$(SWEEP)" || { echo "usage: make ablation-report SWEEP=<sweep folder, e.g. multirun/ablations/2026-...>" >&2; exit 2; }
	$(BIN)/repro-ablation-report sweep=$(SWEEP)

demo-data: $(INSTALLED) ## write the synthetic demo set (ILSVRC-2012 layout) to data/demo/raw
	$(BIN)/repro-demo-data raw=$(DEMO_RAW)

prepare-demo: demo-data ## prepare the demo set into data/demo/store (its one truncated file is skipped on purpose) [FORMAT=jpeg]
	$(BIN)/repro-prepare raw=$(DEMO_RAW) store=$(DEMO_STORE) skip_bad=true format=$(FORMAT)

prepare-imagenet: $(INSTALLED) ## prepare ILSVRC-2012 once: make prepare-imagenet RAW=/path/to/ilsvrc [STORE=/fast/disk/store]
	@test -n "$(RAW)" || { echo "usage: make prepare-imagenet RAW=<folder with ILSVRC-2012 in a layout docs/data.md lists> [STORE=$(STORE)] [ARGS='source=... skip_bad=true']" >&2; exit 2; }
	$(BIN)/repro-prepare raw=$(RAW) store=$(STORE) $(ARGS)

convert-store: $(INSTALLED) ## a prepared store in another record format: make convert-store SOURCE=<store> STORE=<new folder> [FORMAT=jpeg] [ARGS=quality=90]
	@test -n "$(SOURCE)" -a -n "$(STORE_GIVEN)" || { echo "usage: make convert-store SOURCE=<a prepared store> STORE=<folder for the new one> [FORMAT=jpeg|raw] [ARGS='quality=90 workers=8']" >&2; exit 2; }
	$(BIN)/repro-convert source=$(SOURCE) store=$(STORE) $(if $(filter-out file,$(origin FORMAT)),format=$(FORMAT)) $(ARGS)

preflight: $(INSTALLED) ## a new box's first command (numerics, placement, randomness, speed): make preflight [STORE=...] [ARGS=...]
	$(BIN)/repro-preflight $(if $(or $(STORE_GIVEN),$(wildcard $(STORE)/manifest.json)),store=$(STORE)) $(ARGS)

bench-data: $(INSTALLED) ## the data-pipeline section of make bench alone; writes docs/benchmarks.{md,json}
	$(BIN)/python tools/bench.py --sections data

bench: $(INSTALLED) ## data, training and evaluation speed, GPU sections where there are GPUs; docs/benchmarks.{md,json}
	$(BIN)/python tools/bench.py

figure1: $(INSTALLED) ## the paper's Figure 1 (ReLU vs tanh, CIFAR-10): make figure1 DATA=<class folders or CIFAR-10 root> [OUT=docs/figures] [ARGS=...]
	@test -n "$(DATA)" || { echo "usage: make figure1 DATA=<CIFAR-10 class folders (<class>/*.jpg or train/<class>/) or a torchvision CIFAR-10 root> [OUT=$(OUT)] [ARGS='download=true limit=5000 ...']" >&2; exit 2; }
	$(BIN)/repro-figure1 data=$(DATA) out=$(OUT) $(ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) *.egg-info .pytest_cache
