# recsys: every command a user needs. `make help` lists them.
# The first target that needs Python creates .venv and installs the project into it (once).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
CONFIG ?= configs/default.yaml
ITEMS ?=
K ?= 20
PORT ?= 5055
UI_PORT ?= 5000
STAMP := $(VENV)/.installed
EXPORT_STAMP := $(VENV)/.installed-export
LIVE_PORT ?= 5056
DAYS ?= 7
COLD_EVERY ?= 1

# MLflow's store (mlops/ in the working directory: this folder) and its quiet environment are
# set by the recsys commands themselves (recsys/serving/mlflow_store.py); only what the shell
# needs before Python starts is exported here.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup pipeline tune compare-cells prepare train evaluate register replay recommend serve serve-live ui check-ui test lint format bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: about 2 minutes)"
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -e '.[dev]'
	@touch $(STAMP)

$(EXPORT_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -qq -e '.[dev,export]'
	@touch $(EXPORT_STAMP)

setup: $(STAMP) ## Create .venv and install the project (done automatically by other targets)

pipeline: $(STAMP) ## prepare -> train -> evaluate -> register on CONFIG (default: the embedded synthetic log)
	$(VENV)/bin/recsys pipeline --config $(CONFIG)

tune: $(STAMP) ## Hyper-parameter search on CONFIG's train_tr/valid -> data/<name>/tuning/best.yaml
	$(VENV)/bin/recsys tune --config $(CONFIG)

compare-cells: $(STAMP) ## Every cell (and BPTT 1 vs 5) trained and evaluated in one harness on CONFIG (docs/cells.md)
	$(VENV)/bin/recsys compare-cells --config $(CONFIG)

prepare: $(STAMP) ## Prepare the dataset of CONFIG
	$(VENV)/bin/recsys prepare --config $(CONFIG)

train: $(STAMP) ## Train GRU4Rec on CONFIG's prepared data
	$(VENV)/bin/recsys train --config $(CONFIG)

evaluate: $(STAMP) ## Evaluate GRU4Rec and the baselines on CONFIG's test split
	$(VENV)/bin/recsys evaluate --config $(CONFIG)

register: $(STAMP) ## Register the trained model in MLflow (champion/challenger)
	$(VENV)/bin/recsys register --config $(CONFIG)

replay: $(STAMP) ## Daily retraining replayed on CONFIG's last DAYS days: warm updates vs cold retrains every COLD_EVERY days
	$(VENV)/bin/recsys replay --config $(CONFIG) --days $(DAYS) --cold-every $(COLD_EVERY)

recommend: $(STAMP) ## Top-K for one session: make recommend ITEMS="id1,id2" [CONFIG=...]
	@test -n "$(ITEMS)" || { echo 'usage: make recommend ITEMS="id1,id2,..." [CONFIG=...] [K=20]'; exit 2; }
	$(VENV)/bin/recsys recommend --config $(CONFIG) --items "$(ITEMS)" -k $(K)

serve: $(STAMP) ## REST server for the champion of CONFIG on 127.0.0.1:PORT (POST /invocations)
	$(VENV)/bin/recsys serve --config $(CONFIG) --port $(PORT)

serve-live: $(STAMP) ## Live REST service (sessions kept, follows the champion) on 127.0.0.1:LIVE_PORT
	$(VENV)/bin/recsys serve-live --config $(CONFIG) --port $(LIVE_PORT)

ui: $(STAMP) ## MLflow UI on 127.0.0.1:UI_PORT against the project store
	$(VENV)/bin/recsys ui --port $(UI_PORT)

check-ui: $(STAMP) ## Render CONFIG's latest run in the MLflow UI (headless Chromium) and check it; SHOTS=dir saves screenshots
	$(PY) scripts/check_ui.py --config $(CONFIG) $(if $(SHOTS),--screenshots $(SHOTS))

test: $(EXPORT_STAMP) ## Run the test suite (installs the export extra: the ONNX tests run)
	$(PY) -m pytest -q

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check recsys pipelines benchmarks tests scripts
	$(VENV)/bin/ruff format --check recsys pipelines benchmarks tests scripts

format: $(STAMP) ## ruff format + autofix
	$(VENV)/bin/ruff check --fix recsys pipelines benchmarks tests scripts
	$(VENV)/bin/ruff format recsys pipelines benchmarks tests scripts

bench: $(STAMP) ## Benchmarks (events/s, latency percentiles, peak memory); see docs/benchmarks.md
	$(VENV)/bin/recsys bench

clean: ## Remove generated data, models and the local MLflow store (keeps .venv)
	rm -rf data mlops
