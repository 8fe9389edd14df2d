"""Per-cell facts: the committed gene tables, program scores and marker genes on a hand-computed fixture, the
caption sentence and its parser, and facts through a corpus build (identical for --jobs 1 and 2)."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import make_adata
from scmm.data_pipeline.fact_text import (
    FACT_TEMPLATES,
    PROGRAM_PHRASES,
    display_name,
    fact_sentence,
    fact_view,
    parse_claims,
)
from scmm.data_pipeline.facts import GENE_NAMES_FILE, HALLMARK_FILE, FactModel, GeneStats, gene_names, hallmark_sets

E1, E2 = math.e - 1, math.e ** 2 - 1  # linear values whose log1p is 1 and 2


def test_hallmark_table_is_the_msigdb_v7_5_1_release():
    table = hallmark_sets()
    assert table["version"] == "7.5.1" and table["licence"] == "CC BY 4.0" and "pegasuspy 1.10.2" in table["source"]
    sets = table["sets"]
    assert len(sets) == 50 and all(n.startswith("HALLMARK_") for n in sets)
    assert sets["HALLMARK_INTERFERON_GAMMA_RESPONSE"][:3] == ["STAT1", "ISG15", "IFIT1"]
    assert len(sets["HALLMARK_INTERFERON_GAMMA_RESPONSE"]) == 200 and "HLA-DRA" in sets["HALLMARK_ALLOGRAFT_REJECTION"]
    assert sum(len(g) for g in sets.values()) == 7321
    assert json.loads(HALLMARK_FILE.read_text()) == table


def test_gene_name_table_holds_ncbi_names_of_the_vocab():
    names = gene_names(["HLA-DRA", "LYZ", "CD74", "NOT-A-GENE"])
    assert names == {"HLA-DRA": "major histocompatibility complex, class II, DR alpha", "LYZ": "lysozyme",
                     "CD74": "CD74 molecule"}
    with gzip.open(GENE_NAMES_FILE, "rt") as f:
        header = f.readline()
        rows = f.read().splitlines()
    assert "Entrez Gene 2022-Sep12" in header and "r-bioc-org.hs.eg.db 3.16" in header
    assert len(rows) == 38935 and rows == sorted(rows, key=lambda r: r.split("\t")[0])


def test_every_hallmark_set_has_one_distinct_phrase():
    assert set(PROGRAM_PHRASES) == set(hallmark_sets()["sets"])
    assert len({p.lower() for p in PROGRAM_PHRASES.values()}) == 50
    assert PROGRAM_PHRASES["HALLMARK_INTERFERON_GAMMA_RESPONSE"] == "interferon-gamma response"
    assert PROGRAM_PHRASES["HALLMARK_TNFA_SIGNALING_VIA_NFKB"] == "TNF-alpha signaling via NF-kB"


# --- the hand-computed fixture ------------------------------------------------------------------------------------
# 4 training cells, genes G0..G5 plus a filler gene F that brings every cell to 10,000 (so log1p CP10k = log1p x):
# log values (rows = cells) G0..G5:  [1,0,0,2,1,0] [0,1,0,0,1,1] [2,1,1,0,1,0] [1,0,1,2,1,1]
LOGS = np.array([[1, 0, 0, 2, 1, 0], [0, 1, 0, 0, 1, 1], [2, 1, 1, 0, 1, 0], [1, 0, 1, 2, 1, 1]], dtype=float)
SYMBOLS = ["G0", "G1", "G2", "G3", "G4", "G5", "F"]
SETS = {"A": ["G0", "G1", "G2", "G3", "G5"], "B": ["G0", "G1", "G2", "G3", "G4"], "C": ["G0", "NOT_IN_PANEL"]}


def _fixture_matrix() -> sp.csr_matrix:
    lin = np.where(LOGS == 1, E1, np.where(LOGS == 2, E2, 0.0))
    filler = 1e4 - lin.sum(axis=1, keepdims=True)
    return sp.csr_matrix(np.hstack([lin, filler]))


def _fixture_model() -> FactModel:
    x = _fixture_matrix()
    model = FactModel.from_stats(SYMBOLS, GeneStats.of(x), SETS)
    raw = model.raw_scores(x)
    model.program_mean, model.program_sd = raw.mean(axis=0), raw.std(axis=0)
    return model


def test_program_scores_equal_the_hand_computed_fixture():
    """Gene means/sds (population): G0 1, sqrt(.5); G1 .5, .5; G2 .5, .5; G3 1, 1; G4 1, 0 (constant: left out of
    every set); G5 .5, .5. Set A's raw score = mean z over G0,G1,G2,G3,G5 = -0.4, -sqrt(2)/5, sqrt(2)/5, 0.4 (train
    mean 0, sd sqrt(0.12)), so the standardised scores are -2/sqrt(3), -sqrt(2/3), sqrt(2/3), 2/sqrt(3). Set B has 4
    usable genes (G4 is constant) and set C one: both left out."""
    model = _fixture_model()
    mean, sd, detected = GeneStats.of(_fixture_matrix()).mean_sd()
    np.testing.assert_allclose(mean[:6], [1, .5, .5, 1, 1, .5], atol=1e-9)
    np.testing.assert_allclose(sd[:6], [math.sqrt(.5), .5, .5, 1, 0, .5], atol=1e-9)
    np.testing.assert_array_equal(detected[:6], [.75, .5, .5, .5, 1, .5])
    assert model.program_names == ["A"] and model.left_out == {"B": 4, "C": 1}
    np.testing.assert_allclose(model.raw_scores(_fixture_matrix())[:, 0], [-.4, -math.sqrt(2) / 5,
                                                                          math.sqrt(2) / 5, .4], atol=1e-9)
    scores, _ = model.facts(_fixture_matrix())
    np.testing.assert_allclose(scores[:, 0], [-2 / math.sqrt(3), -math.sqrt(2 / 3), math.sqrt(2 / 3),
                                              2 / math.sqrt(3)], atol=1e-6)


def test_marker_genes_of_fixture_cells_are_exact():
    """Cell 3 expresses G0 (z 0: not over-expressed), G2, G3, G5 (z 1 each: ties go to the lower index), G4
    (constant) and the filler F, whose log value is below its mean (cell 3 has the most G values, so the least F):
    markers G2, G3, G5. Cell 2: G0 (z sqrt 2), G1, G2 (z 1); F below its mean. Cell 0: G3 (z 1), then F (its sums
    of G values are 9.83 against a mean of 9.95 over cells: F is 0.04 sd above its mean). Cell 1: F first (sums
    5.15 against 9.95: z 1.59), then G1 and G5 (z 1)."""
    _, markers = _fixture_model().facts(_fixture_matrix())
    assert markers.shape == (4, 20) and markers.dtype == np.int32
    assert markers[3, :4].tolist() == [2, 3, 5, -1] and (markers[3, 3:] == -1).all()
    assert markers[2, :4].tolist() == [0, 1, 2, -1]
    assert markers[0, :3].tolist() == [3, 6, -1]
    assert markers[1, :4].tolist() == [6, 1, 5, -1]
    x = np.log1p(_fixture_matrix().toarray()[:, 6])
    z = (x - x.mean()) / x.std()
    np.testing.assert_allclose(z[[0, 1]], [0.04, 1.59], atol=0.01)
    assert z[2] < 0 and z[3] < 0


def test_markers_need_one_percent_detection():
    """A gene expressed in 1 of 200 training cells (0.5%) is never a marker, however high its z-score."""
    rng = np.random.default_rng(0)
    x = rng.poisson(5.0, size=(200, 8)).astype(float) + 1
    x[:, 7] = 0
    x[17, 7] = 500.0
    model = FactModel.from_stats([f"G{i}" for i in range(8)], GeneStats.of(sp.csr_matrix(x)), {})
    model.program_mean, model.program_sd = np.zeros(0), np.zeros(0)
    _, markers = model.facts(sp.csr_matrix(x))
    assert 7 not in markers
    x[18, 7] = 400.0  # 2 of 200: 1%
    model = FactModel.from_stats([f"G{i}" for i in range(8)], GeneStats.of(sp.csr_matrix(x)), {})
    model.program_mean, model.program_sd = np.zeros(0), np.zeros(0)
    assert model.facts(sp.csr_matrix(x))[1][17, 0] == 7


# --- captions and the parser --------------------------------------------------------------------------------------
GENES = [("HLA-DRA", "major histocompatibility complex, class II, DR alpha"), ("LYZ", "lysozyme"),
         ("ABCB6", "ATP binding cassette subfamily B member 6 (Langereis blood group)"),
         ("C1QA", "complement C1q A chain"), ("HLA-B", None)]


def test_the_caption_sentence_reads_as_the_issue_asks():
    text = fact_sentence(["HALLMARK_INTERFERON_GAMMA_RESPONSE", "HALLMARK_ALLOGRAFT_REJECTION"], GENES[:2], 0)
    assert text == ("Its most active programs are interferon-gamma response and allograft rejection; it expresses "
                    "high levels of HLA-DRA (major histocompatibility complex, class II, DR alpha) and LYZ "
                    "(lysozyme).")
    assert display_name("ATP binding cassette subfamily B member 6 (Langereis blood group)") == \
        "ATP binding cassette subfamily B member 6, Langereis blood group"


@pytest.mark.parametrize("template", range(len(FACT_TEMPLATES)))
def test_the_parser_recovers_every_program_and_gene_from_every_phrasing(template: int):
    """Every hallmark phrase (in groups of 1 to 3, every set at every position) and genes whose names hold a
    program word ("complement"), parentheses and commas, after a label sentence that itself names a program."""
    names = sorted(PROGRAM_PHRASES)
    label = "A monocyte from the blood. A cell with an inflammatory response and apoptosis."
    for k in (1, 2, 3):
        for start in range(len(names)):
            programs = [names[(start + j * 17) % len(names)] for j in range(k)]
            if len(set(programs)) < k:
                continue
            for genes in (GENES[:1], GENES[1:4], GENES[2:5]):
                text = f"{label} {fact_sentence(programs, genes, template)}"
                claims = parse_claims(text)
                assert claims.programs == programs, text
                assert claims.genes == [g for g, _ in genes if _ is not None], text
    only_programs = fact_sentence(names[:2], [], template)
    assert parse_claims(only_programs).programs == names[:2] and parse_claims(only_programs).genes == []


def test_the_parser_reads_nothing_from_a_label_caption():
    assert parse_claims("A monocyte. It shows an inflammatory response; it expresses CD14 (CD14 molecule).") \
        .programs == []
    claims = parse_claims("Its most active programs are hypoxia, hypoxia and glycolysis; it expresses high levels "
                          "of LYZ (lysozyme), LYZ (lysozyme) and XYZ1 (made up)")
    assert claims.programs == ["HALLMARK_HYPOXIA", "HALLMARK_GLYCOLYSIS"] and claims.genes == ["LYZ", "XYZ1"]


def test_a_fact_view_is_the_captions_claims_alone_in_the_asked_phrasing():
    caption = ("A CD14-positive monocyte from the blood of a healthy donor. " + fact_sentence(
        ["HALLMARK_INTERFERON_GAMMA_RESPONSE", "HALLMARK_COMPLEMENT"], GENES[:2], 0) + " Measured with 10x 3' v3.")
    assert fact_view(caption, 2) == ("It shows high activity of interferon-gamma response and complement; among its "
                                     "most over-expressed genes are HLA-DRA (major histocompatibility complex, "
                                     "class II, DR alpha) and LYZ (lysozyme).")
    for template in range(len(FACT_TEMPLATES)):
        for phrasing in range(len(FACT_TEMPLATES)):
            text = "A B cell. " + fact_sentence(["HALLMARK_HYPOXIA"], GENES[1:4], template)
            view = fact_view(text, phrasing)
            assert "B cell" not in view and parse_claims(view) == parse_claims(text)
    assert fact_view(caption, 0, "programs") == "Its most active programs are interferon-gamma response and complement."
    assert fact_view(caption, 1, "genes") == ("Its top marker genes are HLA-DRA (major histocompatibility complex, "
                                              "class II, DR alpha) and LYZ (lysozyme).")
    with pytest.raises(ValueError, match="parts"):
        fact_view(caption, 0, "pathways")
    assert fact_view("A B cell from the blood. A lymphocyte of B lineage.", 1) == ""
    assert fact_view("A cell. Its most active programs are hypoxia.", 0, "genes") == ""
    assert fact_view("A cell. Its most active programs are hypoxia.", 0) == "Its most active programs are hypoxia."


# --- facts through a corpus build ---------------------------------------------------------------------------------
FACT_GENES = ["STAT1", "ISG15", "IFIT1", "IFIT3", "CXCL10", "IRF1", "HLA-DRA", "CD74", "LYZ", "CD3D", "CD3E",
              "CD8A", "CD4", "MS4A1", "CD79A", "NKG7", "GNLY", "CD14", "GZMB", "IL7R"]


def test_corpus_facts_equal_the_fact_model_and_jobs_give_the_same_corpus(tmp_path: Path):
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.data_pipeline.store import Corpus
    make_adata(n_cells=90, seed=3, genes=FACT_GENES).write_h5ad(tmp_path / "a.h5ad")
    make_adata(n_cells=70, seed=4, genes=FACT_GENES).write_h5ad(tmp_path / "b.h5ad")
    manifests = []
    for jobs in (1, 2):
        m = build_corpus(BuildConfig(inputs=[tmp_path / "a.h5ad", tmp_path / "b.h5ad"], out=tmp_path / f"j{jobs}",
                                     shard_size=24, chunk_size=11, jobs=jobs, progress=False))
        m.pop("created")
        manifests.append(m)
    assert manifests[0] == manifests[1]
    facts = manifests[0]["facts"]
    assert "HALLMARK_INTERFERON_GAMMA_RESPONSE" in facts["programs"]["names"]
    assert facts["programs"]["left_out"]["HALLMARK_HYPOXIA"] < 5 and facts["programs"]["licence"] == "CC BY 4.0"
    assert all(s["checksums"]["program_scores"] for s in manifests[0]["shards"])
    corpus = Corpus(tmp_path / "j1")
    arrays = corpus.fact_arrays()
    model = FactModel.from_arrays(corpus.gene_symbols, facts["programs"]["names"], facts["programs"]["left_out"],
                                  arrays)
    # the stored facts of every shard equal the model's facts of the stored expression; train scores standardised
    train_scores = []
    for entry in corpus.shards():
        shard = corpus.read_shard(entry["name"], ("cell_id", "text"))
        scores, markers = corpus.read_facts(entry["name"])
        want_scores, want_markers = model.facts(shard.matrix)
        np.testing.assert_array_equal(scores, want_scores)
        np.testing.assert_array_equal(markers, want_markers)
        if entry["split"] == "train":
            train_scores.append(scores)
        for text, s, mk in zip(shard.obs["text"], scores, markers):
            claims = parse_claims(text)
            top = [facts["programs"]["names"][p] for p in np.argsort(-s, kind="stable")[:3]]
            assert claims.programs == top
            assert claims.genes == [str(corpus.gene_symbols[g]) for g in mk[:3] if g >= 0]
    train = np.concatenate(train_scores)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-4)


def test_a_corpus_without_facts_opens_and_says_so(tmp_path: Path):
    from scmm.data_pipeline.build import BuildConfig, build_corpus
    from scmm.data_pipeline.store import Corpus
    from scmm.errors import ScmmError
    make_adata(n_cells=40, genes=FACT_GENES).write_h5ad(tmp_path / "a.h5ad")
    m = build_corpus(BuildConfig(inputs=[tmp_path / "a.h5ad"], out=tmp_path / "c", facts=False, progress=False))
    corpus = Corpus(tmp_path / "c")
    assert "facts" not in m and corpus.facts is None
    assert all(parse_claims(t).programs == [] for s in corpus.iter_shards(columns=("text",)) for t in s.obs["text"])
    with pytest.raises(ScmmError, match="no per-cell facts"):
        corpus.read_facts(corpus.shards()[0]["name"])




def test_the_table_script_makes_the_committed_format(tmp_path: Path):
    """scripts/make_gene_tables.py on a two-set GMT, a three-gene NCBI table and a vocabulary: the hallmark JSON
    (sets sorted, duplicates dropped) and the gzipped symbol -> name table of the vocabulary's genes, byte-stable."""
    import importlib.util
    import sqlite3
    spec = importlib.util.spec_from_file_location("make_gene_tables", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "make_gene_tables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "h.gmt").write_text("HALLMARK_B\turl\tG2\tG1\tG2\nHALLMARK_A\turl\tG3\n")
    with sqlite3.connect(tmp_path / "g.sqlite") as db:
        db.execute("CREATE TABLE gene_info (_id INTEGER, gene_name TEXT, symbol TEXT)")
        db.executemany("INSERT INTO gene_info VALUES (?, ?, ?)", [(1, "gene one", "G1"), (2, "gene\ttwo", "G2"),
                                                                   (3, "not in vocab", "G9")])
    (tmp_path / "v.json").write_text(json.dumps({"G1": 0, "G2": 1, "G3": 2}))
    args = ["--gmt", str(tmp_path / "h.gmt"), "--sqlite", str(tmp_path / "g.sqlite"), "--vocab",
            str(tmp_path / "v.json"), "--out", str(tmp_path / "out")]
    assert script.main(args) == 0
    table = json.loads((tmp_path / "out" / "hallmark_v7.5.1.json").read_text())
    assert table["sets"] == {"HALLMARK_A": ["G3"], "HALLMARK_B": ["G2", "G1"]} and table["licence"] == "CC BY 4.0"
    first = (tmp_path / "out" / "gene_names.tsv.gz").read_bytes()
    with gzip.open(tmp_path / "out" / "gene_names.tsv.gz", "rt") as f:
        assert f.read().splitlines()[1:] == ["G1\tgene one", "G2\tgene two"]
    assert script.main(args) == 0 and (tmp_path / "out" / "gene_names.tsv.gz").read_bytes() == first
