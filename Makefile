# vecap: one target per stage. Every target sets up what it needs (make setup is idempotent).
SHELL := /bin/bash
PY := .venv/bin/python
VECAP := .venv/bin/vecap
CONFIG ?= demo
SET ?=
SETARGS := $(foreach s,$(SET),--set $(s))
ROOT ?= data/sample
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export HF_HOME := $(CURDIR)/.cache/hf
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export VLLM_CPU_KVCACHE_SPACE ?= 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: help setup sample-data models download caption fuse write run dry-run report inspect status demo test lint bench clean

help:
	@echo "make demo        whole pipeline on the bundled sample data with tiny local models (sets itself up)"
	@echo "make test        the test suite (sets itself up)"
	@echo "make lint        ruff (lint and format check) and mypy, configured in pyproject.toml"
	@echo "make caption|fuse|write|run|dry-run CONFIG=gpu|path/to/recipe.yaml SET='caption.batch_size=32 ...'"
	@echo "make download URLS=list.parquet OUT=data/mine/images"
	@echo "make report | make inspect P=data/sample/fused/00000.parquet | make status ROOT=data/sample | make bench"

setup:
	@scripts/setup_env.sh

sample-data: setup
	$(VECAP) sample-data --root $(ROOT)

models: setup
	$(VECAP) models tiny --out models

download: setup
	@test -n "$(URLS)" -a -n "$(OUT)" || { echo "usage: make download URLS=urls.parquet OUT=data/mine/images"; exit 2; }
	$(VECAP) download $(URLS) $(OUT)

caption fuse write run: setup
	$(VECAP) $@ --config $(CONFIG) $(SETARGS)

dry-run: setup
	$(VECAP) run --dry-run --config $(CONFIG) $(SETARGS)

report: setup
	$(VECAP) report --config $(CONFIG) $(SETARGS)

inspect: setup
	$(VECAP) inspect $(or $(P),$(ROOT)/vecap)

status: setup
	$(VECAP) status $(ROOT) $(SETARGS)

demo: setup sample-data models
	$(VECAP) run --config $(CONFIG) $(SETARGS)
	$(VECAP) report --config $(CONFIG) $(SETARGS)
	$(VECAP) inspect $(ROOT)/vecap --rows 3
	@echo
	@echo "Outputs under $(ROOT)/: images/ (input) captions/ fused/ vecap/ clip/ (CLIP-ready tars) and report.html"

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# All three run, and the target fails if any of them does.
lint: setup
	@rc=0; \
	$(PY) -m ruff check . || rc=1; \
	$(PY) -m ruff format --check . || rc=1; \
	$(PY) -m mypy || rc=1; \
	exit $$rc

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf data/sample models .cache bench/results
