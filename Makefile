# Two commands on a fresh machine: `make demo` (main job end to end on a local Ray) and `make test`.
# Each creates or refreshes its own virtualenv (.venv) from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE ?= $(abspath ../shared/data/nih_malaria)
DATA ?=
OUT ?= demo-out
DEMO_FLAGS ?= --image-size 64 --epochs 3 --batch-size 32 --num-workers 1
# The cluster image (Dockerfile), tagged with the project's version; cluster/ names it under a
# registry: `make image IMAGE=registry.example.com/malaria-ray:$(VERSION)`, then `docker push` it.
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= malaria-ray:$(VERSION)
DOCKER ?= docker

export MALARIA_SAMPLE_DIR ?= $(SAMPLE)
# TensorFlow logs its CPU feature banner at import; keep the demo and test output readable.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv demo test test-fast bench image clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	@if [ -z "$(DATA)" ]; then \
	  echo "== no DATA= given: writing a SYNTHETIC corpus to $(OUT)/synthetic-corpus (not NIH data)"; \
	  $(BIN)/malaria-ray synth $(OUT)/synthetic-corpus --n 400; \
	fi
	$(BIN)/python jobs/train.py --data $(if $(DATA),$(DATA),$(OUT)/synthetic-corpus) --output $(OUT)/train-run --overwrite $(DEMO_FLAGS)
	$(BIN)/python jobs/score.py --input $(if $(DATA),$(DATA),$(OUT)/synthetic-corpus) --model $(OUT)/train-run --output $(OUT)/scores --skip-scored
	@echo "== demo outputs under $(OUT)/: train-run/ (model, history, plots) and scores/ (predictions/, metrics.parquet, slides.parquet)"

# Lint, then two pytest runs: the documented commands (each starts its own local Ray) and the
# job-submission tests (their own Ray head) run after the in-process suite's Ray is gone: one
# machine must never hold two Ray instances at once (Train V2 breaks).
test: venv
	$(BIN)/ruff check malaria_ray jobs bench tests
	$(BIN)/python -m pytest -m "not cluster and not fresh" -ra
	$(BIN)/python -m pytest -m "fresh or cluster" -ra

test-fast: venv
	$(BIN)/ruff check malaria_ray jobs bench tests
	$(BIN)/python -m pytest -m "not ray and not tf and not cluster and not fresh and not slow" -ra

bench: venv
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/score_throughput.py

image:
	@command -v $(DOCKER) >/dev/null 2>&1 || { \
	  echo "make image: '$(DOCKER)' not found; install Docker (https://docs.docker.com/engine/install/) to build the cluster image" >&2; \
	  exit 2; }
	$(DOCKER) build -t $(IMAGE) .

clean:
	rm -rf $(OUT) .pytest_cache
