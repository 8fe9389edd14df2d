# The README's commands. `make demo` and `make test` set everything up first on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip
SCMM    := $(VENV)/bin/scmm
DEMO    ?= runs/demo
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED = 1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps scgpt==0.2.4
	touch $@

demo: setup
	$(SCMM) data demo --out $(DEMO)/corpus --overwrite
	$(SCMM) data info $(DEMO)/corpus
	rm -rf $(DEMO)/stage1
	OMP_NUM_THREADS=2 $(SCMM) pretrain --config configs/stage1_demo.yaml
	$(SCMM) eval --model $(DEMO)/stage1/model --corpus $(DEMO)/corpus --out $(DEMO)/eval

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_loader.py
	test -d runs/demo/corpus || $(SCMM) data demo --out runs/demo/corpus --quiet
	$(PY) benchmarks/bench_stage1_precision.py

clean:
	rm -rf runs .cache .pytest_cache
