"""Every ontology ID scmm takes is checked against the ontology it must belong to, wherever it enters.

The sweep: each entry point (the cell-type, tissue and disease obs columns of `data build`, `--label-map` as JSON
and TSV, used or not, `--holdout-types` of `data build` and `data demo`, `--labels` of `annotate` (list and file)
and `eval`, the label column of `index build`) times each wrong value for its kind (a known term of another
ontology, an unknown term of the right one): one `error:` line naming the value, exit 2, nothing written. Then
what the check accepts: any spelling of a right ID (written the ontology's way in the corpus), free text, and a
label map whose source label never renames the term.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import make_adata, save_tiny_stage1
from scmm.cli import main
from scmm.data_pipeline.build import BuildConfig, build_corpus
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.terms import CELL_TYPE, DISEASE, TISSUE, check_term, looks_like_term_id
from scmm.data_pipeline.text import corpus_labels
from scmm.errors import ScmmError

# wrong values per kind: known terms of other ontologies, then an unknown term of the right one
WRONG = {
    "cell type": ("UBERON:0000178", "MONDO:0005015", "PATO:0000461", "CL:9999999"),
    "tissue": ("MONDO:0005015", "PATO:0000461", "HsapDv:0000087", "UBERON:9999999"),
    "disease": ("UBERON:0000178", "CL:0000236", "PATO:0000383", "MONDO:9999999"),
}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, small_corpus: Path) -> Path:
    CORPUS[:] = [small_corpus]
    return save_tiny_stage1(small_corpus, tmp_path_factory.mktemp("onto") / "stage1")


def _h5ad(tmp: Path, **columns) -> str:
    """A small CELLxGENE-schema h5ad whose first cell has the given obs values (the rest as make_adata's)."""
    a = make_adata(n_cells=40)
    a.obs["lab"] = ["weird blob cells"] * 10 + ["B cell"] * 10 + ["T cell"] * 20
    for column, value in columns.items():
        a.obs[column] = a.obs[column].astype(str) if column in a.obs else ""
        a.obs.iloc[0, a.obs.columns.get_loc(column)] = value
    path = tmp / "in.h5ad"
    a.write_h5ad(path)
    return str(path)


def _file(tmp: Path, name: str, body: str) -> str:
    (tmp / name).write_text(body)
    return str(tmp / name)


Entry = Callable[[Path, Path, Path, str], list[str]]  # (inputs folder, outputs folder, stage-1 model, value)
CORPUS: list[Path] = []  # the stage-1 model's corpus (set by the fixture)
ENTRIES: dict[str, tuple[str, Entry]] = {
    "build: cell-type column": ("cell type", lambda i, o, m, v: [
        "data", "build", _h5ad(i, cell_type_ontology_term_id=v), "--out", str(o / "c")]),
    "build: cell-type column, --unmatched-labels keep": ("cell type", lambda i, o, m, v: [
        "data", "build", _h5ad(i, cell_type_ontology_term_id=v), "--out", str(o / "c"), "--unmatched-labels",
        "keep"]),
    "build: free-text cell-type column": ("cell type", lambda i, o, m, v: [
        "data", "build", _h5ad(i, lab=v), "--out", str(o / "c"), "--cell-type-column", "lab", "--label-map",
        _file(i, "m.json", json.dumps({"weird blob cells": "CL:0000236"}))]),
    "build: tissue column": ("tissue", lambda i, o, m, v: [
        "data", "build", _h5ad(i, tissue_ontology_term_id=v), "--out", str(o / "c")]),
    "build: --tissue-column": ("tissue", lambda i, o, m, v: [
        "data", "build", _h5ad(i, organ=v), "--out", str(o / "c"), "--tissue-column", "organ"]),
    "build: disease column": ("disease", lambda i, o, m, v: [
        "data", "build", _h5ad(i, disease_ontology_term_id=v), "--out", str(o / "c")]),
    "build: disease column, one of A || B": ("disease", lambda i, o, m, v: [
        "data", "build", _h5ad(i, disease_ontology_term_id=f"MONDO:0005015 || {v}"), "--out", str(o / "c")]),
    "build: --label-map JSON": ("cell type", lambda i, o, m, v: [
        "data", "build", _h5ad(i), "--out", str(o / "c"), "--cell-type-column", "lab", "--label-map",
        _file(i, "m.json", json.dumps({"weird blob cells": v}))]),
    "build: --label-map TSV": ("cell type", lambda i, o, m, v: [
        "data", "build", _h5ad(i), "--out", str(o / "c"), "--cell-type-column", "lab", "--label-map",
        _file(i, "m.tsv", f"# label\tCL ID\nweird blob cells\t{v}\n")]),
    "build: --label-map entry no cell uses": ("cell type", lambda i, o, m, v: [
        "data", "build", _h5ad(i), "--out", str(o / "c"), "--label-map",
        _file(i, "m.json", json.dumps({"a label not in the data": v}))]),
    "build: --holdout-types": ("cell type", lambda i, o, m, v: [
        "data", "build", _h5ad(i), "--out", str(o / "c"), "--holdout-types", f"CL:0000623,{v}"]),
    "demo: --holdout-types": ("cell type", lambda i, o, m, v: [
        "data", "demo", "--out", str(o / "c"), "--holdout-types", v]),
    "annotate: --labels": ("cell type", lambda i, o, m, v: [
        "annotate", _h5ad(i), "--model", str(m), "--out", str(o / "a.h5ad"), "--labels", f"T cell,{v}"]),
    "annotate: --labels FILE": ("cell type", lambda i, o, m, v: [
        "annotate", _h5ad(i), "--model", str(m), "--out", str(o / "a.h5ad"), "--labels",
        _file(i, "labels.txt", f"B cell\n{v}\n")]),
    "eval: --labels": ("cell type", lambda i, o, m, v: [
        "eval", "--model", str(m), "--corpus", str(CORPUS[0]), "--out", str(o / "ev"),
        "--labels", f"{v},T cell"]),
    "index build: label column": ("cell type", lambda i, o, m, v: [
        "index", "build", _h5ad(i, cell_type_ontology_term_id=v), "--model", str(m), "--label-column",
        "cell_type_ontology_term_id", "--out", str(o / "ix")]),
}
CASES = [(name, value) for name, (kind, _) in ENTRIES.items() for value in WRONG[kind]]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n} = {v}" for n, v in CASES])
def test_wrong_ontology_id_is_refused(name, value, stage1, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), out.mkdir()
    argv = ENTRIES[name][1](inputs, out, stage1, value)
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert value in lines[0], lines[0]
    assert list(out.iterdir()) == [], "an output was left behind"


def test_the_sweep_covers_every_entry_point():
    kinds = {kind for kind, _ in ENTRIES.values()}
    assert kinds == set(WRONG) and len(CASES) == 4 * len(ENTRIES) == 64


# --- what the check accepts ------------------------------------------------------------------------------
def test_check_term_reads_any_spelling_and_names_the_other_ontology():
    onto = get_ontology()
    assert check_term("cl_0000236", CELL_TYPE, onto, "x") == "CL:0000236"
    assert check_term(" CL:0000236 ", CELL_TYPE, onto, "x") == "CL:0000236"
    assert check_term("uberon:0000178", TISSUE, onto, "x") == "UBERON:0000178"
    assert check_term("PATO:0000461", DISEASE, onto, "x") == "PATO:0000461"
    assert check_term("CL:0000236", TISSUE, onto, "x") == "CL:0000236"  # a cell culture's tissue (CELLxGENE)
    with pytest.raises(ScmmError, match=r"^--label-map: 'UBERON:0000178' \(blood\) is a Uberon \(UBERON\) term, "
                                        r"not a cell type \(expected a Cell Ontology term"):
        check_term("UBERON:0000178", CELL_TYPE, onto, "--label-map")
    with pytest.raises(ScmmError, match="'B cell' is not an ontology ID"):
        check_term("B cell", CELL_TYPE, onto, "--label-map")
    # free text is not an ID, even with an underscore and a digit; a known prefix with a digit is
    assert [looks_like_term_id(v, onto) for v in ("cluster_3", "T_1", "weird blob cells", "CD14+ mono", "cl_0000236",
                                                   "EFO:0009922", "HsapDv:0000087")] == [False] * 4 + [True] * 3


def test_a_label_map_names_the_source_label_and_never_renames_the_term(tmp_path: Path):
    """Case 1's other half: weird blob cells -> CL:0000236 is a B cell labelled as the ontology labels it, and the
    real B cells keep that label (weird blob cells come first, so the source label would otherwise win)."""
    _h5ad(tmp_path)
    m = build_corpus(BuildConfig(inputs=[tmp_path / "in.h5ad"], out=tmp_path / "c", cell_type_column="lab",
                                 label_map={"weird blob cells": "cl:0000236"}, progress=False))
    assert {k: v["label"] for k, v in m["cell_types"].items()} == {"CL:0000236": "B cell", "CL:0000084": "T cell"}
    assert m["cell_types"]["CL:0000236"]["count"] == 20
    corpus = Corpus(tmp_path / "c")
    texts, labels = [], set()
    for split in ("train", "val", "test"):
        for shard in corpus.iter_shards(split, columns=("text", "cell_type", "cell_type_ontology_term_id")):
            texts += list(shard.obs["text"])
            labels |= set(zip(shard.obs["cell_type_ontology_term_id"], shard.obs["cell_type"]))
    assert labels == {("CL:0000236", "B cell"), ("CL:0000084", "T cell")}
    assert len(texts) == 40 and not [t for t in texts if "blob" in t]
    assert {r["key"]: r["label"] for r in corpus_labels(corpus)} == {"CL:0000236": "B cell", "CL:0000084": "T cell"}


def test_accepted_spellings_are_stored_the_ontology_way(tmp_path: Path):
    a = make_adata(n_cells=40)
    a.obs["cell_type_ontology_term_id"] = a.obs["cell_type_ontology_term_id"].astype(str).str.replace(
        "CL:0000236", "cl_0000236")
    a.obs["tissue_ontology_term_id"] = ["uberon:0000178"] * 20 + ["peripheral blood"] * 20  # IDs and free text
    a.obs["disease_ontology_term_id"] = ["MONDO:0005015 || MONDO:0004975"] * 20 + ["PATO:0000461"] * 20
    a.write_h5ad(tmp_path / "in.h5ad")
    m = build_corpus(BuildConfig(inputs=[tmp_path / "in.h5ad"], out=tmp_path / "c", holdout_types=("cl_0000623",),
                                 progress=False))
    assert "CL:0000236" in m["cell_types"] and m["holdout_types"] == ["CL:0000623"]
    seen = set()
    for split in ("train", "val", "test"):
        for shard in Corpus(tmp_path / "c").iter_shards(split, columns=(
                "tissue_ontology_term_id", "tissue", "disease_ontology_term_id", "disease")):
            seen |= set(zip(*(shard.obs[c] for c in ("tissue_ontology_term_id", "tissue",
                                                      "disease_ontology_term_id", "disease"))))
    assert {(t, tl) for t, tl, _, _ in seen} == {("UBERON:0000178", "blood"), ("", "peripheral blood")}
    assert {(d, dl) for _, _, d, dl in seen} == {
        ("MONDO:0005015 || MONDO:0004975", "diabetes mellitus || Alzheimer disease"), ("PATO:0000461", "normal")}
