"""Every mistake is one line: malformed inputs, files and options across the commands, each checked for an
``error:`` line (the last on stderr, the only one), exit code 2, no traceback, no process group left started
(config values are checked before any) and nothing written."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml

from conftest import make_adata, save_tiny_stage1
from scmm.cli import build_parser, main


@dataclass
class Env:
    """The files the cases point at (shared, never modified) and a fresh folder for each case's outputs."""

    root: Path
    corpus: Path
    stage1: Path
    other_vocab_stage1: Path
    h5ad: Path
    inputs: dict[str, Path]
    out: Path = Path()

    def pretrain(self, **changes) -> str:
        cfg = {"corpus": str(self.corpus), "out": str(self.out / "run"),
               "model": {"cell_tower": {"d_model": 16, "nhead": 2, "d_hid": 32, "nlayers": 1},
                         "text_tower": {"max_length": 32}, "qformer": {"num_queries": 2, "num_layers": 1}},
               "train": {"steps": 2}}
        return self._yaml("stage1.yaml", _merge(cfg, changes))

    def finetune(self, stage1: Path | None = None, **changes) -> str:
        lm = self.root / "lm"
        lm.mkdir(exist_ok=True)
        cfg = {"corpus": str(self.corpus), "stage1": str(stage1 or self.stage1), "lm": str(lm),
               "out": str(self.out / "run"), "train": {"steps": 2}}
        return self._yaml("stage2.yaml", _merge(cfg, changes))

    def _yaml(self, name: str, cfg: dict) -> str:
        path = self.out / name
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def text(self, name: str, body: str) -> str:
        path = self.out / name
        path.write_text(body)
        return str(path)

    def bytes(self, name: str, body: bytes) -> str:
        path = self.out / name
        path.write_bytes(body)
        return str(path)

    def folder(self, name: str) -> str:
        path = self.out / name
        path.mkdir()
        return str(path)


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _write(adata, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_corpus: Path) -> Env:
    root = tmp_path_factory.mktemp("bad")
    stage1 = save_tiny_stage1(small_corpus, root / "stage1")
    other = root / "stage1_other_vocab"
    shutil.copytree(stage1, other)
    vocab_file = other / "cell_tower" / "vocab.json"
    vocab = json.loads(vocab_file.read_text())
    cd3d, cd3e = vocab["CD3D"], vocab["CD3E"]
    vocab["CD3D"], vocab["CD3E"] = cd3e, cd3d
    vocab_file.write_text(json.dumps(vocab))
    good = make_adata(n_cells=40)
    inputs = {"good": _write(good, root / "good.h5ad")}
    nan = good.copy()
    nan.X = nan.X.toarray()
    nan.X[3, 2] = np.nan
    inputs["nan"] = _write(nan, root / "nan.h5ad")
    neg = good.copy()
    neg.X = sp.csr_matrix(-neg.X.toarray())
    inputs["negative"] = _write(neg, root / "negative.h5ad")
    huge = good.copy()
    huge.X = sp.csr_matrix(huge.X.toarray().astype(np.float64) * 1e300)
    inputs["huge"] = _write(huge, root / "huge.h5ad")
    unknown = good.copy()
    unknown.var["feature_name"] = [f"NOTAGENE{i}" for i in range(unknown.n_vars)]
    unknown.var_names = [f"X{i}" for i in range(unknown.n_vars)]
    inputs["unknown_genes"] = _write(unknown, root / "unknown_genes.h5ad")
    blob = good.copy()  # issue 28 case 1: free-text labels, one of them mapped by --label-map
    blob.obs["author_cell_type"] = ["weird blob cells"] * 10 + ["B cell"] * 30
    inputs["blob"] = _write(blob, root / "blob.h5ad")
    uberon = good.copy()
    uberon.obs["cell_type_ontology_term_id"] = "UBERON:0000178"
    inputs["uberon_cell_types"] = _write(uberon, root / "uberon_cell_types.h5ad")
    inputs["not_h5ad"] = root / "notes.h5ad"
    inputs["not_h5ad"].write_text("this is not HDF5\n")
    return Env(root, small_corpus, stage1, other, inputs["good"], inputs)


Case = tuple[str, Callable[[Env], list[str]], str]

CASES: list[Case] = [
    # --- scmm data build / info
    ("build: input missing", lambda e: ["data", "build", str(e.root / "nope.h5ad"), "--out", str(e.out / "c")],
     "not found"),
    ("build: input not HDF5", lambda e: ["data", "build", str(e.inputs["not_h5ad"]), "--out", str(e.out / "c")],
     "not an h5ad file"),
    ("build: NaN values", lambda e: ["data", "build", str(e.inputs["nan"]), "--out", str(e.out / "c")], "NaN"),
    ("build: negative values", lambda e: ["data", "build", str(e.inputs["negative"]), "--out", str(e.out / "c")],
     "negative"),
    ("build: values overflow float32", lambda e: ["data", "build", str(e.inputs["huge"]), "--out", str(e.out / "c")],
     "too large"),
    ("build: --shard-size 0", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"), "--shard-size", "0"],
     "shard"),
    ("build: --chunk-size 0", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"), "--chunk-size", "0"],
     "chunk"),
    ("build: --min-gene-coverage 2", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"),
                                                "--min-gene-coverage", "2"], "must be a number in [0, 1]"),
    ("build: label map missing", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"),
                                            "--label-map", str(e.root / "nope.tsv")], "label map not found"),
    ("build: label map bad JSON", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"),
                                             "--label-map", e.text("map.json", "{oops")], "not valid JSON"),
    ("build: no such cell-type column", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"),
                                                   "--cell-type-column", "celltype"], "celltype"),
    ("build: genes not in the vocabulary", lambda e: ["data", "build", str(e.inputs["unknown_genes"]), "--out",
                                                      str(e.out / "c")], "vocabulary"),
    ("build: --out under a file", lambda e: ["data", "build", str(e.h5ad), "--out",
                                             str(Path(e.text("f.txt", "x")) / "c")], "f.txt"),
    ("build: bad --unmatched-labels", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"),
                                                 "--unmatched-labels", "ignore"], "invalid choice"),
    ("info: no corpus", lambda e: ["data", "info", str(e.root / "nope")], "not found"),
    # --- scmm pretrain
    ("pretrain: config missing", lambda e: ["pretrain", "--config", str(e.root / "nope.yaml")], "not found"),
    ("pretrain: invalid YAML", lambda e: ["pretrain", "--config", e.text("bad.yaml", "train: [1, 2\n")],
     "not valid YAML"),
    ("pretrain: unknown key", lambda e: ["pretrain", "--config", e.pretrain(train={"stpes": 3})], "train.stpes"),
    ("pretrain: negative lr", lambda e: ["pretrain", "--config", e.pretrain(train={"lr": -1e-4})], "lr"),
    ("pretrain: batch size 0", lambda e: ["pretrain", "--config", e.pretrain(loader={"batch_size": 0})],
     "batch_size"),
    ("pretrain: d_model not divisible by nhead",
     lambda e: ["pretrain", "--config", e.pretrain(model={"cell_tower": {"d_model": 18, "nhead": 4}})], "nhead"),
    ("pretrain: unknown precision", lambda e: ["pretrain", "--config", e.pretrain(train={"precision": "fp8"})],
     "precision"),
    ("pretrain: string for a number", lambda e: ["pretrain", "--config", e.pretrain(train={"steps": "many"})],
     "train.steps"),
    ("pretrain: corpus missing", lambda e: ["pretrain", "--config", e.pretrain(corpus=str(e.root / "nope"))],
     "not found"),
    ("pretrain: max_len 0", lambda e: ["pretrain", "--config", e.pretrain(encoding={"max_len": 0})], "max_len"),
    # --- scmm finetune
    ("finetune: negative lr", lambda e: ["finetune", "--config", e.finetune(train={"lr": -1.0})], "lr"),
    ("finetune: stage-1 folder missing", lambda e: ["finetune", "--config", e.finetune(stage1=e.root / "nope")],
     "stage-1 model folder not found"),
    ("finetune: stage-1 model of another vocabulary",
     lambda e: ["finetune", "--config", e.finetune(stage1=e.other_vocab_stage1)], "another gene vocabulary"),
    ("finetune: unknown task", lambda e: ["finetune", "--config", e.finetune(data={"tasks": ["poetry"]})],
     "poetry"),
    # --- scmm eval
    ("eval: model missing", lambda e: ["eval", "--model", str(e.root / "nope"), "--corpus", str(e.corpus),
                                       "--out", str(e.out / "ev")], "not found"),
    ("eval: corpus missing", lambda e: ["eval", "--model", str(e.stage1), "--corpus", str(e.root / "nope"),
                                        "--out", str(e.out / "ev")], "not found"),
    ("eval: unknown task", lambda e: ["eval", "--model", str(e.stage1), "--corpus", str(e.corpus), "--out",
                                      str(e.out / "ev"), "--tasks", "astrology"], "astrology"),
    # --- scmm annotate / embed
    ("annotate: input missing", lambda e: ["annotate", str(e.root / "nope.h5ad"), "--model", str(e.stage1),
                                           "--out", str(e.out / "a.h5ad")], "not found"),
    ("annotate: input not HDF5", lambda e: ["annotate", str(e.inputs["not_h5ad"]), "--model", str(e.stage1),
                                            "--out", str(e.out / "a.h5ad")], "not an h5ad file"),
    ("annotate: model missing", lambda e: ["annotate", str(e.h5ad), "--model", str(e.root / "nope"), "--out",
                                           str(e.out / "a.h5ad")], "not found"),
    ("annotate: --smooth --k 0", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                            str(e.out / "a.h5ad"), "--smooth", "--k", "0"], "--k"),
    ("annotate: --labels file missing", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                   str(e.out / "a.h5ad"), "--labels", str(e.root / "labels.txt")],
     "labels file not found"),
    ("annotate: --unknown-threshold nan", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                     str(e.out / "a.h5ad"), "--unknown-threshold", "nan"],
     "unknown-threshold"),
    ("annotate: --batch-size 0", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                            str(e.out / "a.h5ad"), "--batch-size", "0"], "batch-size"),
    ("annotate: --out under a file", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                str(Path(e.text("f.txt", "x")) / "a.h5ad"), "--labels",
                                                "T cell,B cell"], "f.txt"),
    ("annotate: --out is the input", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                str(e.h5ad), "--overwrite"], "is the input"),
    ("annotate: values overflow float32", lambda e: ["annotate", str(e.inputs["huge"]), "--model", str(e.stage1),
                                                     "--out", str(e.out / "a.h5ad")], "too large"),
    ("annotate: NaN values", lambda e: ["annotate", str(e.inputs["nan"]), "--model", str(e.stage1), "--out",
                                        str(e.out / "a.h5ad")], "NaN"),
    ("annotate: no such layer", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                           str(e.out / "a.h5ad"), "--layer", "spliced"], "spliced"),
    ("annotate: no such gene column", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                 str(e.out / "a.h5ad"), "--gene-column", "symbol"], "symbol"),
    ("annotate: no known gene", lambda e: ["annotate", str(e.inputs["unknown_genes"]), "--model", str(e.stage1),
                                           "--out", str(e.out / "a.h5ad")], "vocabulary"),
    ("annotate: no GPU", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                    str(e.out / "a.h5ad"), "--device", "cuda", "--labels", "T cell"], "GPU"),
    ("embed: --min-gene-coverage -1", lambda e: ["embed", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                 str(e.out / "a.h5ad"), "--min-gene-coverage", "-1"],
     "argument --min-gene-coverage"),
    ("embed: a corpus folder as input", lambda e: ["embed", str(e.corpus), "--model", str(e.stage1), "--out",
                                                   str(e.out / "a.h5ad")], "is a folder"),
    # --- scmm describe / generate (stage 2 needed)
    ("describe: stage-1 model", lambda e: ["describe", str(e.h5ad), "--model", str(e.stage1), "--out",
                                           str(e.out / "d.h5ad")], "no stage-2 part"),
    ("generate: stage-1 model", lambda e: ["generate", "--model", str(e.stage1), "--text", "a B cell", "--n", "3",
                                           "--out", str(e.out / "g.h5ad")], "no stage-2 part"),
    ("generate: --n 0", lambda e: ["generate", "--model", str(e.stage1), "--text", "a B cell", "--n", "0",
                                   "--out", str(e.out / "g.h5ad")], "--n"),
    ("generate: empty text", lambda e: ["generate", "--model", str(e.stage1), "--text", " ", "--n", "3",
                                        "--out", str(e.out / "g.h5ad")], "--text"),
    # --- scmm index
    ("index build: no such label column", lambda e: ["index", "build", str(e.h5ad), "--model", str(e.stage1),
                                                     "--label-column", "celltype", "--out", str(e.out / "ix")],
     "celltype"),
    ("index query: no index", lambda e: ["index", "query", str(e.root / "nope"), str(e.h5ad), "--model",
                                         str(e.stage1), "--out", str(e.out / "q.h5ad")], "not found"),
    ("index query: --k 0", lambda e: ["index", "query", str(e.root / "nope"), str(e.h5ad), "--model",
                                      str(e.stage1), "--out", str(e.out / "q.h5ad"), "--k", "0"], "--k"),
    # --- scmm package
    ("package: stage 1 missing", lambda e: ["package", "--stage1", str(e.root / "nope"), "--corpus", str(e.corpus),
                                            "--out", str(e.out / "p")], "not found"),
    ("package: corpus missing", lambda e: ["package", "--stage1", str(e.stage1), "--corpus", str(e.root / "nope"),
                                           "--out", str(e.out / "p")], "not found"),
    ("package: stage 2 not a stage-2 folder", lambda e: ["package", "--stage1", str(e.stage1), "--corpus",
                                                         str(e.corpus), "--stage2", str(e.stage1), "--out",
                                                         str(e.out / "p")], "stage-2"),
    ("package: corpus of another vocabulary", lambda e: ["package", "--stage1", str(e.other_vocab_stage1),
                                                         "--corpus", str(e.corpus), "--out", str(e.out / "p")],
     "another gene vocabulary"),
    # --- issue 28 (round 3): ontology IDs checked against their ontology wherever they enter
    ("build: --label-map to a tissue ID (issue 28 case 1)",
     lambda e: ["data", "build", str(e.inputs["blob"]), "--out", str(e.out / "c"), "--cell-type-column",
                "author_cell_type", "--label-map", e.text("map.json", '{"weird blob cells": "UBERON:0000178"}')],
     "'UBERON:0000178' (blood) is a Uberon (UBERON) term, not a cell type"),
    ("build: --label-map to an unknown CL ID", lambda e: ["data", "build", str(e.inputs["blob"]), "--out",
                                                          str(e.out / "c"), "--cell-type-column", "author_cell_type",
                                                          "--label-map",
                                                          e.text("map.tsv", "weird blob cells\tCL:9999999\n")],
     "'CL:9999999' is not a known Cell Ontology (CL) term"),
    ("build: --label-map to free text", lambda e: ["data", "build", str(e.inputs["blob"]), "--out", str(e.out / "c"),
                                                   "--cell-type-column", "author_cell_type", "--label-map",
                                                   e.text("map.json", '{"weird blob cells": "B cell"}')],
     "'B cell' is not an ontology ID"),
    ("build: tissue IDs as cell types, --unmatched-labels keep",
     lambda e: ["data", "build", str(e.inputs["uberon_cell_types"]), "--out", str(e.out / "c"),
                "--unmatched-labels", "keep"], "not a cell type"),
    ("build: --holdout-types a tissue", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"),
                                                   "--holdout-types", "UBERON:0000178"], "not a cell type"),
    ("demo: --holdout-types a disease", lambda e: ["data", "demo", "--out", str(e.out / "c"), "--holdout-types",
                                                   "MONDO:0005015"], "not a cell type"),
    ("annotate: --labels a tissue ID", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                  str(e.out / "a.h5ad"), "--labels", "B cell,UBERON:0000178"],
     "not a cell type"),
    ("eval: --labels a disease ID", lambda e: ["eval", "--model", str(e.stage1), "--corpus", str(e.corpus), "--out",
                                               str(e.out / "ev"), "--labels", "PATO:0000461"], "not a cell type"),
    ("index build: label column of tissue IDs", lambda e: ["index", "build", str(e.inputs["uberon_cell_types"]),
                                                           "--model", str(e.stage1), "--label-column",
                                                           "cell_type_ontology_term_id", "--out", str(e.out / "ix")],
     "not a cell type"),
    # --- issue 28: files that are not UTF-8
    ("build: label map not UTF-8 (issue 28 case 3)",
     lambda e: ["data", "build", str(e.inputs["blob"]), "--out", str(e.out / "c"), "--cell-type-column",
                "author_cell_type", "--label-map",
                e.bytes("map.tsv", "B cell\tCL:0000236\nweird blob cells \xe9\tCL:0000236\n".encode("latin-1"))],
     "is not UTF-8 text (line 2"),
    ("annotate: --labels file not UTF-8", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                                     str(e.out / "a.h5ad"), "--labels",
                                                     e.bytes("labels.txt", b"B cell\n\xff\xfeT\n")],
     "labels file"),
    # --- issue 28: numeric options, range-checked by their types at parse time
    ("describe: --num-beams 0 (issue 28 case 4)", lambda e: ["describe", str(e.h5ad), "--model", str(e.stage1),
                                                             "--out", str(e.out / "d.h5ad"), "--num-beams", "0"],
     "argument --num-beams: must be an integer from 1"),
    ("describe: --num-beams -2 (issue 28 case 4)", lambda e: ["describe", str(e.h5ad), "--model", str(e.stage1),
                                                              "--out", str(e.out / "d.h5ad"), "--num-beams", "-2"],
     "argument --num-beams"),
    ("annotate: --k 1e30", lambda e: ["annotate", str(e.h5ad), "--model", str(e.stage1), "--out",
                                      str(e.out / "a.h5ad"), "--k", "1e30"], "argument --k"),
    ("generate: --n above the limit", lambda e: ["generate", "--model", str(e.stage1), "--text", "a B cell", "--n",
                                                 "1000001", "--out", str(e.out / "g.h5ad")], "argument --n"),
    ("generate: --noise nan", lambda e: ["generate", "--model", str(e.stage1), "--text", "a B cell", "--n", "3",
                                         "--noise", "nan", "--out", str(e.out / "g.h5ad")], "argument --noise"),
    ("build: --seed -1", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"), "--seed", "-1"],
     "argument --seed"),
    ("eval: --unknown-rate 1", lambda e: ["eval", "--model", str(e.stage1), "--corpus", str(e.corpus), "--out",
                                          str(e.out / "ev"), "--unknown-rate", "1"], "argument --unknown-rate"),
    ("build: --jobs 100000", lambda e: ["data", "build", str(e.h5ad), "--out", str(e.out / "c"), "--jobs",
                                        "100000"], "argument --jobs"),
    # --- issue 28: hints name options that exist; messages say what is wrong
    ("generate: --out exists", lambda e: ["generate", "--model", str(e.stage1), "--text", "a B cell", "--n", "3",
                                          "--out", e.text("g.h5ad", "x")], "pass --overwrite"),
    ("generate: --overwrite is an option", lambda e: ["generate", "--model", str(e.stage1), "--text", "a B cell",
                                                      "--n", "3", "--out", e.text("g.h5ad", "x"), "--overwrite"],
     "no stage-2 part"),
    ("import-lm: --gguf a folder", lambda e: ["finetune", "import-lm", "--gguf", e.folder("gguf"), "--out",
                                              str(e.out / "lm")], "is a folder"),
    ("pretrain: empty config", lambda e: ["pretrain", "--config", e.text("empty.yaml", "")],
     "is empty; it needs at least the key(s) corpus, out"),
    ("pretrain: config without out", lambda e: ["pretrain", "--config", e.text("s1.yaml", f"corpus: {e.corpus}\n")],
     "missing the required key(s) out"),
    ("finetune: empty config", lambda e: ["finetune", "--config", e.text("empty.yaml", "# nothing yet\n")],
     "is empty"),
]


def _options_of(argv: list[str]) -> set[str]:
    """The options of the command ``argv`` runs (its leaf parser's)."""
    parser = build_parser()
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return {o for a in parser._actions for o in a.option_strings}


_OPTION = re.compile(r"(?<![\w-])(--[a-z](?:[a-z0-9_-]*[a-z0-9])?)")


def _hints(line: str, argv: list[str]) -> list[tuple[list[str], set[str]]]:
    """(command, options it names) of an error line: options in a quoted `scmm WORDS ...` belong to that command,
    the others to the command that printed the line."""
    quoted = re.findall(r"`scmm ([^`]*)`", line)
    outside = re.sub(r"`scmm [^`]*`", "", line)
    return [(argv, set(_OPTION.findall(outside))), *((q.split(), set(_OPTION.findall(q))) for q in quoted)]


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(env: Env, tmp_path: Path, capsys, name: str, argv, expected: str):
    env.out = tmp_path
    args = argv(env)  # writes the case's config or text files
    before, shared = _listing(tmp_path), _listing(env.root)
    with pytest.raises(SystemExit) as exit_info:  # argparse usage errors exit; the others return
        raise SystemExit(main(args))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    assert expected.lower() in lines[-1].lower(), lines[-1]
    for command, hinted in _hints(lines[-1], args):
        assert hinted <= _options_of(command), f"the error names options {command[:2]} does not have: {lines[-1]}"
    assert "Traceback" not in err
    assert _listing(tmp_path) == before, "an output was left behind"
    assert _listing(env.root) == shared, "a shared file was changed"
    assert not torch.distributed.is_initialized(), "the process group started before the config was checked"

