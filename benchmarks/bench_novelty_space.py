"""Which space the novelty check should look in: the cell embedding, or the expression profile (scmm.eval.novelty).

On a model and a corpus with held-out types (`make demo`'s), each cell's novelty similarity is computed two ways:

* **embedding**: the cosine of the cell's aligned embedding to its nearest training cell's (the check before
  scmm.eval.novelty), and the same after centring on the training cells' mean embedding;
* **expression**: the mean cosine to the 5 nearest training cells in the PCA space of log1p CP10k profiles of the
  training split's most variable genes (scmm.eval.novelty, what `scmm eval` now uses), and with 1 neighbour.

Two figures per score: the AUROC between seen-type and held-out-type test cells (the held-out types are never in
train or val), and, on the val split alone, the mean AUROC of leave-one-type-out (each training type with at least
3 val cells in turn left out of the reference, the PCA kept; its val cells against the others). The second needs
no held-out type but flatters the embedding, which was trained on every one of those types; it is what chose the
5 neighbours of the expression check (0.81 against 0.78 for the nearest cell alone on the demo). Then the
abstention rule itself (half of the unknown rate to the confidence, half to novelty, thresholds on val) at rates
0.05 and 0.1: the share of seen-type test cells that abstain and of held-out-type cells caught.

    python benchmarks/bench_novelty_space.py [--model runs/demo/stage2/model] [--corpus runs/demo/corpus]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from common import record
from scmm.data_pipeline.hvg import log1p_profiles
from scmm.data_pipeline.store import Corpus
from scmm.eval import knn
from scmm.eval.annotate import Candidates, embed_split, label_prototypes
from scmm.eval.calibration import abstention_threshold, fit_temperature, novelty_threshold, softmax
from scmm.eval.metrics import binary_auroc
from scmm.eval.novelty import NOVELTY_K, fit_novelty
from scmm.model.folders import load_model


def mean_top_k(reference: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine similarity of each query row to its k most similar reference rows."""
    index = knn.build_index(knn.l2_normalise(reference.astype(np.float32)), "ip")
    scores, _ = knn.knn_search(index, knn.l2_normalise(query.astype(np.float32)), min(k, len(reference)))
    return scores.mean(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/demo/stage2/model")
    p.add_argument("--corpus", default="runs/demo/corpus")
    args = p.parse_args()
    corpus = Corpus(args.corpus)
    holdout = set(corpus.holdout_types)
    if not holdout:
        raise SystemExit("the corpus has no held-out types (scmm data build --holdout-types)")
    aligner = load_model(args.model).aligner
    with torch.no_grad():
        emb = {s: embed_split(aligner, corpus, s, progress=False) for s in ("train", "val", "test")}
        cands = Candidates.from_corpus(corpus)
        protos = label_prototypes(aligner, cands)
    y = {s: np.asarray(e.labels).astype(str) for s, e in emb.items()}
    check = fit_novelty(corpus)
    pos = {int(v): i for i, v in enumerate(corpus.gene_vocab_ids)}
    genes = np.array([pos[int(v)] for v in check.vocab_ids])
    points = {}
    for s, e in emb.items():
        x, ids, _ = log1p_profiles(corpus, s, genes)
        order = {c: i for i, c in enumerate(ids)}
        points[s] = check.points(x[[order[c] for c in e.cell_ids]])  # in the embedded cells' order
    mu = knn.l2_normalise(emb["train"].embeddings).mean(0)
    spaces = {
        "embedding, nearest cell": lambda s, keep, k=1: mean_top_k(emb["train"].embeddings[keep], emb[s].embeddings, k),
        "embedding centred, nearest cell": lambda s, keep, k=1: mean_top_k(
            knn.l2_normalise(emb["train"].embeddings[keep]) - mu, knn.l2_normalise(emb[s].embeddings) - mu, k),
        "expression PCA, nearest cell": lambda s, keep, k=1: mean_top_k(points["train"][keep], points[s], k),
        f"expression PCA, {NOVELTY_K} nearest (scmm)": lambda s, keep, k=NOVELTY_K: mean_top_k(
            points["train"][keep], points[s], k)}
    seen = ~np.isin(y["test"], list(holdout))
    every = np.ones(len(y["train"]), dtype=bool)
    loto_types = [t for t in np.unique(y["val"]) if (y["val"] == t).sum() >= 3]
    # the confidence check, as scmm eval fits it
    index = {k: i for i, k in enumerate(cands.keys)}
    vsim = knn.l2_normalise(emb["val"].embeddings) @ protos.T
    temperature = fit_temperature(vsim, [index[t] for t in y["val"]])
    vconf = softmax(vsim, temperature).max(1)
    tconf = softmax(knn.l2_normalise(emb["test"].embeddings) @ protos.T, temperature).max(1)
    rows, figures = [], {}
    for name, score in spaces.items():
        test, val = score("test", every), score("val", every)
        auroc = binary_auroc(test[seen], test[~seen])
        loto = float(np.mean([binary_auroc(score("val", y["train"] != t)[y["val"] != t],
                                           score("val", y["train"] != t)[y["val"] == t]) for t in loto_types]))
        rule = []
        for rate in (0.05, 0.1):
            cut_c, cut_n = abstention_threshold(vconf, rate / 2), novelty_threshold(val, rate / 2)
            out = (tconf < cut_c) | (test < (cut_n if cut_n is not None else -np.inf))
            rule += [float(out[seen].mean()), float(out[~seen].mean())]
        rows.append((name, auroc, loto, *rule))
        figures[name] = {"auroc_test_heldout": auroc, "auroc_val_leave_one_type_out": loto,
                         "rate_0.05": {"seen_abstain": rule[0], "unseen_caught": rule[1]},
                         "rate_0.1": {"seen_abstain": rule[2], "unseen_caught": rule[3]}}
    print(f"{int(seen.sum())} seen-type and {int((~seen).sum())} held-out-type test cells "
          f"({', '.join(sorted(holdout))}); {len(y['val'])} val cells; leave-one-type-out over {len(loto_types)} types")
    print("| novelty score | AUROC, held-out types (test) | AUROC, leave-one-type-out (val) | rate 0.05: seen abstain "
          "/ held-out caught | rate 0.1: seen abstain / held-out caught |")
    print("|---|---:|---:|---:|---:|")
    for name, auroc, loto, a, b, c, d in rows:
        print(f"| {name} | {auroc:.3f} | {loto:.3f} | {a:.3f} / {b:.3f} | {c:.3f} / {d:.3f} |")
    print(f"| confidence alone | {binary_auroc(tconf[seen], tconf[~seen]):.3f} | | | |")
    record("novelty_space", {"model": args.model, "corpus": args.corpus, "n_seen": int(seen.sum()),
                             "n_heldout": int((~seen).sum()), "scores": figures})


if __name__ == "__main__":
    main()
