# One entry point for people, CI and DVC. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2
# dvc.yaml's commands say `python`: the project's virtualenv must come first.
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install init repro test test-fast lint bench bench-decoders bench-serve serve gate clean sweep \
	repro-ci ci-comment record-base docker docker-build

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-15s %s\n", $$1, $$2}'

$(BIN)/captioning: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/captioning ## create .venv and install the project with pinned dependencies

init: install ## make this folder a git + DVC repo if it is not one yet (DVC needs one commit)
	@git rev-parse --git-dir >/dev/null 2>&1 || { git init -q && git add -A && git -c user.name=captioning -c user.email=captioning@localhost commit -qm "initial commit"; }
	@test -d .dvc || { $(BIN)/dvc init -q && $(BIN)/dvc config core.autostage true && $(BIN)/dvc config core.analytics false; }

# dvc can exit 0 with a folder output missing from a full cache: the second line checks.
repro: init ## run the whole pipeline (offline demo data by default), then check the DVC cache holds it
	$(BIN)/dvc repro
	$(BIN)/python -m captioning.dvc_cache

test: install ## run the whole test suite, slow integration tests included
	$(BIN)/pytest -q

test-fast: install ## the inner-loop subset: everything not marked slow
	$(BIN)/pytest -q -m "not slow"

lint: install ## ruff check and format check
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/ruff format --check src stages tests benchmarks

bench: install ## speed and memory benchmarks (docs/benchmarks.md; `python -m benchmarks --list` for all)
	$(BIN)/python -m benchmarks

bench-decoders: install ## greedy vs beam 3 vs beam 5 on the test split: scores and captions/s (after make repro)
	$(BIN)/python -m benchmarks decoders --out reports/bench_decoders.json

.PHONY: select
select: install ## model selection across data sets and seeds, val only (issue 26; hours on a CPU: docs/experiments.md)
	$(BIN)/python -m benchmarks.selection --images 1000 --seeds 3 --out reports/selection.json

.PHONY: bench-gpu
bench-gpu: install ## on a GPU: extraction img/s, training pairs/s by precision, decoding, share of peak (docs/scaling.md)
	$(BIN)/python -m benchmarks features precision decode --out reports/bench_gpu.json

# A small grid on the demo data, one DVC experiment per point, run one at a time.
SWEEP ?= -S 'train.learning_rate=0.001,0.002' -S 'train.label_smoothing=0.0,0.1'
sweep: init ## queue the SWEEP grid as DVC experiments, run them one at a time under one MLflow parent run, print the table
	$(BIN)/dvc exp run --queue $(SWEEP)
	@parent=$$($(BIN)/python -m captioning.tracking.sweeps open --grid "$(SWEEP)") || exit 1; \
	CAPTIONING_SWEEP_RUN_ID=$$parent $(BIN)/dvc exp run --run-all --jobs 1; status=$$?; \
	$(BIN)/python -m captioning.tracking.sweeps close $$parent --exit-code $$status; exit $$status
	$(BIN)/dvc exp show --only-changed --drop 'Created|State|Executor' --sort-by reports/metrics.json:CIDEr --sort-order desc --no-pager

SERVE_PORT ?= 5001
MODEL_NAME ?= image-captioner
serve: install ## serve models:/$(MODEL_NAME)@champion on 127.0.0.1:$(SERVE_PORT) (mlflow models serve)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} $(BIN)/mlflow models serve -m models:/$(MODEL_NAME)@champion --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

# The champion as a container: `docker` writes build/docker/{Dockerfile,model_dir} offline;
# `docker-build` has Docker build it (pulls python:3.11-slim and the model's pip requirements).
DOCKER_DIR ?= build/docker
DOCKER_IMAGE ?= $(MODEL_NAME)
docker: install ## write $(DOCKER_DIR)/Dockerfile serving models:/$(MODEL_NAME)@champion (mlflow models generate-dockerfile)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} $(BIN)/mlflow models generate-dockerfile -m models:/$(MODEL_NAME)@champion -d $(DOCKER_DIR)

docker-build: install ## build the image $(DOCKER_IMAGE) of the champion (mlflow models build-docker; needs Docker and a registry)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} $(BIN)/mlflow models build-docker -m models:/$(MODEL_NAME)@champion -n $(DOCKER_IMAGE)

INPUT ?= data/raw
OUT ?= build/captions.parquet
batch: install ## caption INPUT (folder, glob or Parquet) with models:/$(MODEL_NAME)@champion on Spark into OUT (docs/spark.md)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} $(BIN)/captioning batch '$(INPUT)' --output $(OUT) --model models:/$(MODEL_NAME)@champion

bench-serve: install ## load-test the served model (300 requests, 8 concurrent, 127.0.0.1 only)
	$(BIN)/python -m benchmarks serve --out reports/bench_serve.json

# --- CI: .github/workflows/ci.yml runs these same targets (docs/ci.md) ---
CI_DIR := build/ci
# The CI-sized demo run, as `dvc exp run -S` overrides: a few minutes on a CI runner.
CI_PARAMS ?= data.demo_train_images=400 data.demo_val_images=160 train.captions_per_image=5 train.budget_pairs=16000 train.epoch_pairs=2000 report.num_images=3
# What the gate compares with: BASE_REF=main (a git revision: `dvc metrics diff`), or
# BASE_DIR=build/ci/base (metrics.json + train_history.csv that CI recorded for the base commit).
BASE_REF ?=
BASE_DIR ?=
GATE_BASE = $(if $(BASE_DIR),--base-metrics $(BASE_DIR)/metrics.json,$(if $(BASE_REF),--base-ref $(BASE_REF)))
PLOT_BASE = $(if $(BASE_DIR),--base-history $(BASE_DIR)/train_history.csv,$(if $(BASE_REF),--base-ref $(BASE_REF)))

repro-ci: init ## the pipeline at CI size (CI_PARAMS) as a DVC experiment; params.yaml is restored after
	@mkdir -p $(CI_DIR) && cp params.yaml $(CI_DIR)/params.yaml.orig
	$(BIN)/dvc exp run $(addprefix -S ,$(CI_PARAMS)); status=$$?; \
	cp $(CI_DIR)/params.yaml.orig params.yaml; exit $$status

gate: install ## check reports/metrics.json against params.yaml `gates:` (and BASE_REF=main or BASE_DIR=...)
	$(BIN)/captioning gate --out $(CI_DIR)/gate.md $(GATE_BASE)

ci-comment: install ## write build/ci/comment.md (gate table, curves, overlays) and post it on the PR
	$(BIN)/python -m captioning.evaluation.ci_comment --gate $(CI_DIR)/gate.md --out-dir $(CI_DIR) $(PLOT_BASE)

record-base: ## copy this run's metrics and curves to build/ci/base (CI caches them for later PRs)
	mkdir -p $(CI_DIR)/base
	cp reports/metrics.json reports/train_history.csv $(CI_DIR)/base/

clean: ## remove pipeline outputs (keeps data/raw downloads)
	rm -rf data/interim data/features data/tokens models

# --- A team (docs/team.md): the MLflow team server, and CI with a DVC remote ---
TEAM_DIR ?= build/team
TEAM_HOST ?= 127.0.0.1
TEAM_PORT ?= 5000
.PHONY: team-server team-server-upgrade ci-remote pull-outputs push-outputs
team-server: install ## run the MLflow team server (PostgreSQL, logins, proxied artifacts) until Ctrl-C; needs MLFLOW_AUTH_ADMIN_PASSWORD
	$(BIN)/python -m captioning.tracking.team_server --dir $(TEAM_DIR) --host $(TEAM_HOST) --port $(TEAM_PORT)

team-server-upgrade: install ## `mlflow db upgrade` the team server's tracking database (after an MLflow upgrade)
	$(BIN)/python -m captioning.tracking.team_server --dir $(TEAM_DIR) --upgrade

# CI's remote comes from the environment (the repository's secrets): DVC_REMOTE_URL, and for
# ssh:// DVC_SSH_KEY (a private key) and DVC_SSH_KNOWN_HOSTS (the server's known_hosts line).
# It goes to .dvc/config.local and ~/.ssh, never into a tracked file.
DVC_REMOTE_URL ?=
ci-remote: init ## CI: make DVC_REMOTE_URL the default DVC remote (does nothing when it is unset)
	@if [ -n "$$DVC_REMOTE_URL" ]; then \
	  $(BIN)/dvc remote add --local --force --default ci "$$DVC_REMOTE_URL" && \
	  if [ -n "$$DVC_SSH_KEY" ]; then \
	    mkdir -p ~/.ssh && (umask 077 && printf '%s\n' "$$DVC_SSH_KEY" > ~/.ssh/dvc_remote_key) && \
	    $(BIN)/dvc remote modify --local ci keyfile ~/.ssh/dvc_remote_key; fi && \
	  if [ -n "$$DVC_SSH_KNOWN_HOSTS" ]; then \
	    mkdir -p ~/.ssh && printf '%s\n' "$$DVC_SSH_KNOWN_HOSTS" >> ~/.ssh/known_hosts; fi; \
	fi

pull-outputs: ci-remote ## pull what dvc.lock names (and the run-cache) from the remote; missing ones are recomputed
	$(BIN)/dvc pull --run-cache --allow-missing

push-outputs: ci-remote ## push the workspace's outputs and the run-cache to the remote
	$(BIN)/dvc push --run-cache

ifneq ($(strip $(DVC_REMOTE_URL)),)
# With a remote, CI starts from the outputs dvc.lock names, pulled, at full size: only the
# stages a pull request changed run again (the CI-sized overrides would change them all).
  CI_PARAMS :=
  repro-ci: pull-outputs
endif
