"""Sphinx configuration of scmm's documentation site (`make docs`: a strict, offline build into .cache/site).

Why Sphinx: the docstrings are reStructuredText with Sphinx cross-reference roles (``:func:``, ``:class:``, ...),
so autodoc renders them as written and ``nitpicky`` + ``-W`` turn every reference that does not resolve into a
failed build. The pages are Markdown (MyST). Everything is read from the *installed* package (``import scmm``):
the top-level folders only exist as ``scmm.model``, ``scmm.eval``, ... once installed, so the tree is never
put on ``sys.path``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build faiss tried is noise here
sys.path.insert(0, str(Path(__file__).parent / "_ext"))  # scmm_docs: config-key tables and the CLI check

import scmm  # noqa: E402  (the installed package, `pip install -e .[docs]`)

project = "scmm"
author = "the scmm developers"
copyright = "the scmm developers"
release = version = scmm.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinxarg.ext",
    "scmm_docs",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links, checked by the build

# every reference must resolve: a broken `:class:` in a docstring or a stale link fails the build (-W)
nitpicky = True
# Objects of other libraries (torch, numpy, AnnData, ...) have no inventory offline (no intersphinx fetch), and
# private helpers (a leading underscore) are not part of the documented API: references to them are not checked.
_EXTERNAL = ("torch", "np", "numpy", "pd", "pandas", "ad", "anndata", "h5py", "faiss", "zarr", "scipy", "sp",
             "transformers", "peft", "deepspeed", "datasets", "tokenizers", "nn", "typing", "collections", "os",
             "pathlib", "Path", "argparse", "logging", "yaml", "dataclasses", "json", "io", "tiledbsoma")
nitpick_ignore_regex = [
    ("py:.*", rf"(~?)({'|'.join(_EXTERNAL)})(\..*)?"),
    ("py:.*", r"(.*\.)?_[A-Za-z0-9].*"),  # private names
    ("py:class", r"(Any|Callable|Iterator|Iterable|Sequence|Mapping|Literal|TypeVar|T|Self|optional)"),
    ("py:.*", r"(int|float|str|bool|dict|list|tuple|bytes|None|object|type|callable|array|array-like)"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# members are named where they are wanted (`:members: a, b`): a module documented twice is a duplicate
autodoc_mock_imports: list[str] = []
add_module_names = False
python_use_unqualified_type_names = True

html_theme = "furo"
html_title = f"scmm {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
# offline: furo ships its own CSS and JS and uses system fonts; nothing is fetched from a CDN
