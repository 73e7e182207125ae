# The README's two commands: `make train` and `make test`. Both set up .venv/ first (idempotent: a stamp
# file records which requirement files the venv was built from, so a second run costs nothing).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt
# STACK=cpu|cuda: the torch / fbgemm-gpu builds of the venv (requirements/$(STACK).txt). Default: cuda when
# nvidia-smi lists a GPU here, else cpu. Name it where the venv is built for other machines (an image built
# on a CPU-only host for GPU nodes: `make venv STACK=cuda`). A venv of the other stack is rebuilt from
# scratch: pip keeps an installed 2.13.0+cpu for `torch==2.13.0`, and both fbgemm wheels write fbgemm_gpu/.
STACK ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
ifeq ($(filter cpu cuda,$(STACK)),)
$(error STACK=$(STACK): must be cpu or cuda)
endif
# the stack the existing venv was built with (.stack; a venv from before .stack: its stamp's name)
VENV_STACK := $(or $(shell cat $(VENV)/.stack 2>/dev/null),$(patsubst $(VENV)/.stamp-%,%,$(wildcard $(VENV)/.stamp-*)))
STAMP := $(VENV)/.stamp-$(STACK)
# DATA=synthetic (default): the generated dataset. DATA=ml100k: MovieLens-100K, converted (data/build/ml100k.py)
# from the recbole==1.2.1 wheel, which is pip-downloaded into $(WHEEL_DIR) (no data is vendored here).
DATA ?= synthetic
DATA_ROOT := datasets/$(DATA)
WHEEL_DIR := datasets/.cache
ML100K_WHEEL := $(WHEEL_DIR)/recbole-1.2.1-py3-none-any.whl
ML100K_PIP := $(PY) -m pip download --disable-pip-version-check --no-deps recbole==1.2.1 -d $(WHEEL_DIR)
# one process per GPU on a GPU box; 2 CPU processes otherwise
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC ?= $(if $(filter-out 0,$(GPUS)),$(GPUS),2)
ARGS ?=

.PHONY: venv data train test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): requirements/common.txt requirements/$(STACK).txt requirements/torchrec.txt requirements/constraints.txt pyproject.toml
	@echo "== setting up $(VENV) ($(STACK) stack)"
	$(if $(filter-out $(STACK),$(VENV_STACK)),rm -rf $(VENV)  # built with the $(VENV_STACK) stack)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo $(STACK) > $(VENV)/.stack
	$(PIP) -r requirements/$(STACK).txt
	$(PIP) -r requirements/common.txt
	@# CPU: torchrec's declared fbgemm-gpu (CUDA) must not be pulled in. CUDA: its deps are the pinned ones.
	$(PIP) $(if $(filter cpu,$(STACK)),--no-deps,) -r requirements/torchrec.txt
	$(PIP) --no-deps --no-build-isolation -e .
	$(PY) -c "import torchmetrics, tensordict, hydra, pyarrow"
	$(PY) -m pipeline.stack --expect $(STACK)
	rm -f $(VENV)/.stamp-* && touch $@

datasets/synthetic/dataset.json: | $(STAMP)
	$(PY) -m data.build.generate --config conf/data/synthetic.yaml --root datasets/synthetic

datasets/ml100k/dataset.json: | $(STAMP)
	test -f $(ML100K_WHEEL) || $(ML100K_PIP) --quiet || { echo "make data: pip could not download \
	recbole==1.2.1 (the MovieLens-100K source); retry: $(ML100K_PIP)" >&2; exit 1; }
	$(PY) -m data.build.ml100k --root datasets/ml100k --wheel-dir $(WHEEL_DIR)

data: venv $(DATA_ROOT)/dataset.json

# DATA other than synthetic selects conf/data/$(DATA).yaml (`data=$(DATA)`), and with it the dataset's recipe
# (conf/recipe/$(DATA).yaml, else conf/recipe/default.yaml): exactly what `torchrun ... launch/train.py
# data=$(DATA)` runs. RECIPE=<name> picks another recipe (`recipe=<name>`); ARGS are Hydra overrides.
RECIPE ?=
train: venv data
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launch/train.py $(if $(filter-out synthetic,$(DATA)),data=$(DATA) )$(if $(RECIPE),recipe=$(RECIPE) )$(ARGS)

test: venv
	@# pytest exits 5 when it collected no test: for this project that means the suite went missing.
	rc=0; $(PY) -m pytest -q $(ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# The inner loop: everything but the multi-process end-to-end tests (`-m "not slow"`). CI runs `make test`.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(PY) launch/bench.py dense --preset rankmixer_small --batch-size 512

clean:
	rm -rf $(VENV) outputs
