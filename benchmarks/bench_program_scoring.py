"""Side-by-side of program-scoring methods on the demo's real PBMCs (scanpy's pbmc68k_reduced), to choose the one
the corpus build uses (scmm.data_pipeline.facts).

    python benchmarks/bench_program_scoring.py [--corpus runs/demo/corpus]

Methods, on log1p CP10k of the training cells, hallmark sets with >= 5 panel genes:
* ``zmean``  mean z-score of the set's genes (the gene mean/sd of the training split) -- scmm's choice;
* ``score_genes``  scanpy's ``sc.tl.score_genes`` (set mean minus the mean of expression-matched control genes);
* ``aucell``  AUCell (the area under the recovery curve of the set's genes in the cell's ranking, top 5% of the
  ranks), written here.
Criterion: split-half reliability -- the Pearson correlation, over cells, of the scores of two random halves of the
set (10 draws), mean over sets: a score that measures the program and not a few genes' noise agrees with itself.
Also the share of each score's variance that the cell type explains (high: the label would tell it anyway).
"""
from __future__ import annotations

import argparse
import warnings

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from scmm.data_pipeline.facts import GeneStats, hallmark_sets, log1p_cp10k
from scmm.data_pipeline.store import Corpus, label_keys


def zmean(x, genes, mean, sd):
    return ((x[:, genes] - mean[genes]) / sd[genes]).mean(axis=1)


def score_genes(x, genes, symbols, seed):
    a = ad.AnnData(X=x, var={"gene": symbols})
    a.var_names = list(symbols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.score_genes(a, [symbols[g] for g in genes], random_state=seed, score_name="s")
    return a.obs["s"].to_numpy()


def aucell(ranks, genes, top):
    r = ranks[:, genes]
    hit = r < top
    return ((top - r) * hit).sum(axis=1) / (len(genes) * top)  # rank-weighted recovery, normalised


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", default="runs/demo/corpus")
    args = p.parse_args()
    corpus = Corpus(args.corpus)
    mats, types = [], []
    for s in corpus.iter_shards("train", ("cell_type_ontology_term_id", "cell_type")):
        mats.append(s.matrix)
        types += label_keys(s.obs["cell_type_ontology_term_id"], s.obs["cell_type"])
    m = sp.vstack(mats).tocsr()
    x = log1p_cp10k(m).toarray()
    mean, sd, _ = GeneStats.of(m).mean_sd()
    symbols = np.asarray(corpus.gene_symbols).astype(str)
    index = {s: i for i, s in enumerate(symbols)}
    sets = {n: np.array(sorted({index[g] for g in genes if g in index and sd[index[g]] > 0}))
            for n, genes in hallmark_sets()["sets"].items()}
    sets = {n: g for n, g in sets.items() if len(g) >= 5}
    ranks = np.argsort(np.argsort(-x + 1e-9 * np.arange(x.shape[1]), axis=1), axis=1)
    top = max(1, int(0.05 * x.shape[1]))
    types = np.asarray(types)
    rng = np.random.default_rng(0)
    results = {k: {"split_half": [], "type_share": []} for k in ("zmean", "score_genes", "aucell")}

    def score(method, genes, seed):
        if method == "zmean":
            return zmean(x, genes, mean, sd)
        if method == "score_genes":
            return score_genes(x, genes, symbols, seed)
        return aucell(ranks, genes, top)

    for genes in sets.values():
        for method in results:
            rs = []
            for d in range(10):
                perm = rng.permutation(genes)
                a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
                sa, sb = score(method, a, d), score(method, b, d)
                if sa.std() > 0 and sb.std() > 0:
                    rs.append(np.corrcoef(sa, sb)[0, 1])
            results[method]["split_half"].append(np.mean(rs) if rs else 0.0)
            s = score(method, genes, 0)
            between = sum((types == t).sum() * (s[types == t].mean() - s.mean()) ** 2 for t in set(types))
            results[method]["type_share"].append(between / max(((s - s.mean()) ** 2).sum(), 1e-12))
    print(f"{len(sets)} hallmark sets with >= 5 of the {len(symbols)} panel genes; {x.shape[0]} training cells")
    print("method        split-half r (mean over sets)   variance explained by cell type")
    for method, r in results.items():
        print(f"{method:12s}  {np.mean(r['split_half']):.3f}                          {np.mean(r['type_share']):.3f}")


if __name__ == "__main__":
    main()
