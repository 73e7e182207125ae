# The README's two commands: `make train` and `make test`. Both set up .venv/ first (idempotent: a stamp
# file records which requirement files the venv was built from, so a second run costs nothing).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt
# The CUDA stack only when an NVIDIA GPU is really there; otherwise the CPU stack.
STACK := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP := $(VENV)/.stamp-$(STACK)
DATA_ROOT := datasets/synthetic
NPROC ?= 2
ARGS ?=

.PHONY: venv data train test lint bench clean

venv: $(STAMP)

$(STAMP): requirements/common.txt requirements/$(STACK).txt requirements/torchrec.txt requirements/constraints.txt pyproject.toml
	@echo "== setting up $(VENV) ($(STACK) stack)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements/$(STACK).txt
	$(PIP) -r requirements/common.txt
	@# CPU: torchrec's declared fbgemm-gpu (CUDA) must not be pulled in. CUDA: its deps are the pinned ones.
	$(PIP) $(if $(filter cpu,$(STACK)),--no-deps,) -r requirements/torchrec.txt
	$(PIP) --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchrec, fbgemm_gpu, torchmetrics, tensordict, hydra, pyarrow; print('torch', torch.__version__, 'torchrec', torchrec.__version__)"
	rm -f $(VENV)/.stamp-* && touch $@

$(DATA_ROOT)/dataset.json: | $(STAMP)
	$(PY) -m data.generate --config conf/data/synthetic.yaml --root $(DATA_ROOT)

data: venv $(DATA_ROOT)/dataset.json

train: venv data
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launch/train.py $(ARGS)

test: venv
	@# pytest exits 5 when it collected no test: for this project that means the suite went missing.
	rc=0; $(PY) -m pytest -q $(ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(PY) launch/bench.py dense --preset rankmixer_small --batch-size 512

clean:
	rm -rf $(VENV) outputs
