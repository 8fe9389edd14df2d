"""Ontology wrapper (data_pipeline.ontology) and cell descriptions (data_pipeline.text), on the real bundled data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scmm.data_pipeline.ontology import Ontology, get_ontology, normalise_label
from scmm.data_pipeline.text import TEMPLATES, CellMetadata, describe, label_texts, metadata_from_obs, template_index

ROOT = Path(__file__).resolve().parents[1]
MONO = "CL:0001054"


@pytest.fixture(scope="module")
def onto() -> Ontology:
    return get_ontology()


@pytest.fixture(scope="module")
def mono(onto: Ontology) -> CellMetadata:
    return CellMetadata(
        cell_type_id=MONO, cell_type="CD14-positive monocyte", tissue_id="UBERON:0000178", tissue="blood",
        disease_id="PATO:0000461", disease="normal", sex="female", development_stage="adult stage",
        assay="10x 3' v3", organism="Homo sapiens",
    )


# -- ontology --------------------------------------------------------------------------------------------------
def test_label_definition_synonyms(onto: Ontology) -> None:
    assert onto.label(MONO) == "CD14-positive monocyte"
    assert onto.definition(MONO) and "CD14" in onto.definition(MONO)
    assert onto.label("UBERON:0000178") == "blood"
    assert onto.label("PATO:0000461") == "normal"
    assert "B lymphocyte" in onto.synonyms("CL:0000236")
    assert get_ontology() is get_ontology()


def test_hierarchy(onto: Ontology) -> None:
    assert "CL:0000084" in onto.ancestors("CL:0000625")  # CD8 alpha-beta T cell is a T cell
    assert "CL:0000625" not in onto.ancestors("CL:0000625")
    assert onto.parents(MONO) == ["CL:0000576"]  # monocyte
    assert MONO in onto.children("CL:0000576")
    assert set(onto.parents("CL:0000625")) <= set(onto.ancestors("CL:0000625"))


def test_validity_and_unknown_terms(onto: Ontology) -> None:
    assert onto.is_valid(MONO) and onto.is_valid("PATO:0000461") and onto.is_valid("MONDO:0100096")
    for bad in ("CL:9999999", "FOO:0000001", "garbage", "", "unknown", "na"):
        assert not onto.is_valid(bad)
    for bad in ("CL:9999999", "FOO:0000001"):
        with pytest.raises(KeyError, match=bad):
            onto.label(bad)
    assert onto.is_special("unknown") and onto.label("unknown") == "unknown"
    assert onto.ancestors("na") == [] and onto.definition("unknown") is None


def test_match_cell_type(onto: Ontology) -> None:
    for text in ("CD14-positive monocyte", "cd14 positive Monocyte", "  CD14-Positive   monocyte ",
                 "CD14+ Monocyte", "CD14_positive_monocytes"):
        assert onto.match_cell_type(text) == MONO, text
    assert onto.match_cell_type("B lymphocyte") == "CL:0000236"  # synonym
    assert onto.match_cell_type("NK cells") == "CL:0000623"  # synonym, plural
    assert onto.match_cell_type("CL:0000084") == "CL:0000084"
    assert onto.match_cell_type("CL_0000084") == "CL:0000084"
    assert onto.match_cell_type("CL:9999999") is None
    assert onto.match_cell_type("not a cell type") is None
    assert onto.match_cell_type("") is None
    assert onto.match_cell_type("Dendritic") is None  # no fuzzy guessing
    # primes are significant: two different terms
    assert onto.match_cell_type("Bm2 B cell") == "CL:0000962"
    assert onto.match_cell_type("Bm2' B cell") == "CL:0000964"
    assert normalise_label("CD4+ CD25- T cells") == "cd4 positive cd25 negative t cell"


def test_resolve_cell_types(onto: Ontology) -> None:
    values = ["B cell", "CD14+ Monocyte", "foo", "B cell", "bar", "CD14+ Monocyte"]
    matched, unmatched = onto.resolve_cell_types(values)
    assert matched == {"B cell": "CL:0000236", "CD14+ Monocyte": MONO}
    assert unmatched == ["bar", "foo"]


# -- descriptions ----------------------------------------------------------------------------------------------
def test_describe_content(onto: Ontology, mono: CellMetadata) -> None:
    definition = onto.definition(MONO)
    for i in range(20):
        text = describe(mono, f"cell{i}", onto)
        assert "CD14-positive monocyte" in text and definition in text
        assert text.index("CD14-positive monocyte") < text.index(definition)  # cell type first
        assert "healthy" in text and "normal" not in text.lower()
        assert "blood" in text and "female" in text and "adult stage" in text and "10x 3' v3" in text
        assert text[0].isupper() and text.endswith(".") and ".." not in text and "  " not in text


def test_describe_disease(onto: Ontology, mono: CellMetadata) -> None:
    from dataclasses import replace

    sick = replace(mono, disease_id="MONDO:0100096", disease=None)
    texts = {describe(sick, f"k{i}", onto) for i in range(40)}
    assert all("COVID-19" in t and "healthy" not in t for t in texts)
    only_label = replace(mono, disease_id=None, disease="normal")  # label alone also reads as healthy
    assert all("healthy" in describe(only_label, f"k{i}", onto) for i in range(20))


def test_describe_skips_missing_fields(onto: Ontology) -> None:
    meta = CellMetadata(cell_type_id=MONO, cell_type="CD14-positive monocyte", tissue_id="unknown", tissue=None,
                        disease_id=None, disease="", sex="unknown", development_stage="na", assay=None,
                        organism=None)
    for i in range(30):
        text = describe(meta, f"c{i}", onto)
        for word in ("None", "unknown", " na ", " na.", "nan", "donor", "healthy", ",.", " ."):
            assert word not in text, (word, text)
        assert text.endswith(".") and "CD14-positive monocyte" in text


def test_describe_deterministic_and_varied(onto: Ontology, mono: CellMetadata) -> None:
    keys = [f"AAACCTG-{i}" for i in range(50)]
    texts = [describe(mono, k, onto) for k in keys]
    assert texts == [describe(mono, k, onto) for k in keys]
    assert len(set(texts)) >= 3 and len({template_index(k) for k in keys}) >= 3
    # hash stability across processes (Python's hash() is salted per process; ours must not be)
    code = (
        "import json; from data_pipeline.ontology import get_ontology; from data_pipeline.text import *;"
        "m = CellMetadata(**json.loads(input())); o = get_ontology();"
        f"print(json.dumps([describe(m, k, o) for k in {keys!r}]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(mono.__dict__), capture_output=True,
                         text=True, env=env, cwd=ROOT, check=True, timeout=120)
    assert json.loads(out.stdout) == texts


def test_label_texts(onto: Ontology) -> None:
    texts = label_texts(MONO, onto)
    assert len(texts) == len(TEMPLATES) >= 4 and len(set(texts)) == len(texts)
    assert all("CD14-positive monocyte" in t and onto.definition(MONO) in t for t in texts)
    assert all("blood" not in t and "healthy" not in t for t in texts)
    # the same phrasing as a training text of a cell with no other metadata
    bare = CellMetadata(cell_type_id=MONO, cell_type="CD14-positive monocyte")
    assert describe(bare, "x", onto) == texts[template_index("x")]
    free = label_texts("CD4+/CD25 T Reg", onto)  # free text: no definition
    assert len(set(free)) >= 4 and all("CD4+/CD25 T Reg" in t and t.endswith(".") for t in free)
    assert any(t.startswith("An NK cell") for t in label_texts("NK cell", onto, label="NK cell"))


def test_metadata_from_obs(onto: Ontology) -> None:
    row = {
        "cell_type_ontology_term_id": MONO, "tissue_ontology_term_id": "UBERON:0000178",
        "disease_ontology_term_id": "PATO:0000461", "sex_ontology_term_id": "PATO:0000383",
        "development_stage_ontology_term_id": "HsapDv:0000087", "assay_ontology_term_id": "EFO:0009922",
        "organism_ontology_term_id": "NCBITaxon:9606",
    }
    meta = metadata_from_obs(row, onto)
    assert meta.cell_type == "CD14-positive monocyte" and meta.tissue == "blood"
    assert meta.disease_id == "PATO:0000461" and meta.sex == "female"
    assert meta.development_stage == "adult stage" and meta.assay == "10x 3' v3" and meta.organism == "Homo sapiens"
    assert "human donor" in describe(meta, "k", onto)

    sparse = {"cell_type_ontology_term_id": "CL:0000236", "cell_type": "B cell", "tissue": "lung",
              "sex": "unknown", "development_stage_ontology_term_id": "HsapDv:9999999", "assay": float("nan"),
              "disease": "normal"}
    meta = metadata_from_obs(sparse, onto)
    assert (meta.tissue, meta.sex, meta.development_stage, meta.assay) == ("lung", None, None, None)
    assert "healthy" in describe(meta, "k", onto)
    assert metadata_from_obs({"cell_type": "NK cell"}, onto).cell_type_id == "CL:0000623"
    with pytest.raises(ValueError):
        metadata_from_obs({"cell_type_ontology_term_id": "unknown"}, onto)
