"""What a cell representation carries of each cell's hallmark programs: the ceiling that search by text can reach.

``language.search`` ranks test cells by their similarity to "cells with high <program> activity" with no training
on programs at all. This benchmark asks the easier, supervised question of each representation: a ridge regression
fitted on the train split's cells (program z-scores from the corpus's facts) predicts the test cells' scores, and
the prediction is scored as ``language.search`` scores a similarity (AUROC of the top quartile, mean over programs;
within type: each type's own top quartile, types with at least 8 cells). What a supervised linear read-out cannot
find in a representation, a text query cannot find there either.

Representations: the cell-type one-hot (what the label alone says), ``X_scmm`` (the stage-1 model's aligned cell
embedding), the log1p CP10k panel expression standardised per gene (the program scores are a linear function of
it, so this row is near 1 whenever the ridge is not over-regularised: it shows the data carries the programs), and
a PCA of that expression fitted on train (the expression compressed to as many numbers as an embedding).

Run from a demo folder (``make demo`` done)::

    .venv/bin/python benchmarks/bench_program_probe.py [--run runs/demo] [--model runs/demo/stage1/model ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV

from common import record, table
from scmm.data_pipeline.hvg import log1p_profiles
from scmm.data_pipeline.store import Corpus
from scmm.eval.annotate import embed_split
from scmm.eval.language import SplitFacts, search_metrics, split_facts
from scmm.model.aligner import CellTextAligner

ALPHAS = np.logspace(-3, 3, 13)


def probe(train: np.ndarray, test: np.ndarray, facts: dict[str, SplitFacts]) -> dict[str, float]:
    """Ridge from ``train`` features to the train cells' program scores, its test predictions scored by
    ``language.search``'s own code (each program's prediction stands where the similarity to its query would)."""
    pred = RidgeCV(alphas=ALPHAS).fit(train, facts["train"].scores).predict(test)
    y = facts["test"].scores
    r2 = 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    scored = search_metrics(pred, np.eye(y.shape[1]), facts["test"])
    return {"auroc": scored["auroc"], "auroc_within_type": scored["auroc_within_type"],
            "r2_median": float(np.median(r2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a demo run folder (its corpus/)")
    ap.add_argument("--model", type=Path, nargs="*", help="stage-1 model folders (default: <run>/stage1/model)")
    ap.add_argument("--pcs", type=int, default=50, help="components of the expression PCA")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    corpus = Corpus(args.run / "corpus")
    facts = {s: split_facts(corpus, s) for s in ("train", "test")}
    expr = {s: log1p_profiles(corpus, s, np.arange(corpus.n_genes))[0] for s in facts}
    types = sorted(set(facts["train"].types) | set(facts["test"].types))
    onehot = {s: (facts[s].types[:, None] == np.asarray(types)[None]).astype(np.float32) for s in facts}
    pca = PCA(args.pcs, random_state=0).fit(expr["train"])
    mean, sd = expr["train"].mean(0), expr["train"].std(0)
    sd[sd == 0] = 1.0
    results = {"type one-hot": probe(onehot["train"], onehot["test"], facts),
               "expression, every panel gene": probe((expr["train"] - mean) / sd, (expr["test"] - mean) / sd, facts),
               f"expression PCA-{args.pcs}": probe(pca.transform(expr["train"]), pca.transform(expr["test"]), facts)}
    for folder in args.model or [args.run / "stage1" / "model"]:
        model = CellTextAligner.from_pretrained(folder)
        emb = {}
        for s in facts:
            e = embed_split(model, corpus, s, progress=False)
            assert e.cell_ids == facts[s].cell_ids, "embedding order differs from the facts' order"
            emb[s] = e.embeddings / np.linalg.norm(e.embeddings, axis=1, keepdims=True)
        results[f"X_scmm ({folder})"] = probe(emb["train"], emb["test"], facts)
    print(table(["representation", "AUROC", "AUROC within type", "R² (median over programs)"],
                [[k, f"{v['auroc']:.3f}", f"{v['auroc_within_type']:.3f}", f"{v['r2_median']:.3f}"]
                 for k, v in results.items()]))
    record("program_probe", {"run": str(args.run), "n_train": len(facts["train"].cell_ids),
                             "n_test": len(facts["test"].cell_ids), "n_programs": len(facts["test"].programs),
                             "results": results})


if __name__ == "__main__":
    main()
