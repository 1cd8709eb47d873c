# Two commands on a fresh machine: `make demo` (main job end to end on a local Ray) and `make test`.
# Each creates or refreshes the virtualenv (.venv) from pyproject.toml: the demo installs the product
# only, the tests add the [dev] extras.
#
# The interpreter: Python 3.10-3.13. PYTHON=/path/to/python3.X chooses one; otherwise the first of
# python3, python3.13, python3.12, python3.11, python3.10 on PATH that is in that range.
SUPPORTED := (3, 10) <= sys.version_info[:2] <= (3, 13)
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11 python3.10; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ($(SUPPORTED)))' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
SCORE_DATA ?=
OUT ?= demo-out
DEMO_FLAGS ?= --image-size 64 --epochs 3 --batch-size 32 --num-workers 1
# The cluster image (Dockerfile), tagged with the project's version; cluster/ names it under a
# registry: `make image IMAGE=registry.example.com/malaria-ray:$(VERSION)`, then `docker push` it.
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= malaria-ray:$(VERSION)
DOCKER ?= docker

# TensorFlow logs its CPU feature banner at import; keep the demo and test output readable.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.DEFAULT_GOAL := venv
.PHONY: python venv venv-dev demo test test-fast bench image carry carry-dry clean

# One line, exit 2, when no usable interpreter is there (none in range, or Debian's python3 without
# its -venv package, which has no ensurepip); make adds its own "*** Error 2" line after it.
PYVERSION = $$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
CHECK_PYTHON = if [ -z "$(PYTHON)" ]; then \
	  echo "make: malaria-ray needs Python 3.10-3.13 and found none on PATH (python3, python3.13 ... python3.10); install one or pass PYTHON=/path/to/python3.X" >&2; exit 2; fi; \
	command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: PYTHON=$(PYTHON) not found" >&2; exit 2; }; \
	$(PYTHON) -c 'import sys; sys.exit(not ($(SUPPORTED)))' 2>/dev/null || { \
	  echo "make: PYTHON=$(PYTHON) is Python $(PYVERSION); malaria-ray needs 3.10-3.13" >&2; exit 2; }; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "make: $(PYTHON) (Python $(PYVERSION)) cannot create a virtualenv: install its venv module (Debian/Ubuntu: apt-get install python$(PYVERSION)-venv)" >&2; exit 2; }

python:
	@$(CHECK_PYTHON)

$(BIN)/.installed: pyproject.toml
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed
venv-dev: $(BIN)/.installed-dev

# Trains on DATA (default: a SYNTHETIC corpus) and scores SCORE_DATA (default: a second synthetic
# set of other patients, so the demo's metrics are out of sample; with DATA= and no SCORE_DATA=, it
# scores DATA itself and says that those metrics are in-sample).
demo: venv
	@if [ -z "$(DATA)" ]; then \
	  echo "== no DATA= given: writing a SYNTHETIC corpus to $(OUT)/synthetic-corpus (not NIH data)"; \
	  $(BIN)/malaria-ray synth $(OUT)/synthetic-corpus --n 400; \
	fi
	@if [ -z "$(SCORE_DATA)$(DATA)" ]; then \
	  echo "== writing a held-out SYNTHETIC night to $(OUT)/synthetic-night (other patients, seed 1) to score"; \
	  $(BIN)/malaria-ray synth $(OUT)/synthetic-night --n 200 --seed 1; \
	fi
	$(BIN)/python jobs/train.py --data $(or $(DATA),$(OUT)/synthetic-corpus) --output $(OUT)/train-run --overwrite $(DEMO_FLAGS)
	$(BIN)/python jobs/score.py --input $(or $(SCORE_DATA),$(DATA),$(OUT)/synthetic-night) --model $(OUT)/train-run --output $(OUT)/scores --skip-scored
	@if [ -n "$(DATA)" ] && [ -z "$(SCORE_DATA)" ]; then \
	  echo "== NOTE: scored the training data itself ($(DATA)): these metrics are in-sample; pass SCORE_DATA= for held-out images"; fi
	@echo "== demo outputs under $(OUT)/: train-run/ (model, model card, history, plots) and scores/ (predictions/, metrics.parquet, slides.parquet, runs/)"

# Lint, then two pytest runs: the documented commands (each starts its own local Ray) and the
# job-submission tests (their own Ray head) run after the in-process suite's Ray is gone: one
# machine must never hold two Ray instances at once (Train V2 breaks).
test: venv-dev
	$(BIN)/ruff check malaria_ray jobs bench tests device
	$(BIN)/python -m pytest -m "not cluster and not fresh and not device" -ra --durations=30
	$(BIN)/python -m pytest -m "(fresh or cluster) and not device" -ra --durations=15

test-fast: venv-dev
	$(BIN)/ruff check malaria_ray jobs bench tests device
	$(BIN)/python -m pytest -m "not ray and not tf and not cluster and not fresh and not slow and not device" -ra

bench: venv-dev
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/score_throughput.py

# The carry for a lent GPU machine without Ray or Keras (docs/device.md): slimmed Ray, Keras and NIH
# cells under device/carry/ (ignored), then the dry run here under Python 3.12 (it starts Ray: one at a time).
carry:
	@$(CHECK_PYTHON)
	$(PYTHON) device/build_carry.py build

carry-dry:  # after make carry
	flock /tmp/malaria-ray-ray.lock $(PYTHON) device/build_carry.py dry

image:
	@command -v $(DOCKER) >/dev/null 2>&1 || { \
	  echo "make image: '$(DOCKER)' not found; install Docker (https://docs.docker.com/engine/install/) to build the cluster image" >&2; \
	  exit 2; }
	$(DOCKER) build -t $(IMAGE) .

clean:
	rm -rf $(OUT) .pytest_cache
