"""Foreign cells: synthetic cells unlike every cell of a corpus, to measure that annotation calls them unknown.

A model that never saw a tissue should not name its cells after the tissues it saw. ``scmm eval`` checks this on
cells it makes unlike the corpus (:func:`foreign_counts`), in the manner of ``scmm data synth``
(:mod:`scmm.data_pipeline.synth`): each of :data:`FOREIGN_PROGRAMS` made-up expression programmes is a log-normal
mean profile over the corpus's genes plus :data:`PROGRAM_GENES` up-regulated genes drawn from the genes the train
split detects least (a programme absent from training); each cell draws a library size around the train cells'
median total and negative-binomial (gamma-Poisson) counts. Everything is seeded, so one corpus and seed give the
same cells. ``scmm eval`` annotates them as ``scmm annotate`` would (embedding, confidence, novelty check), and
``annotation.foreign`` reports ``n_cells``, ``unknown_rate`` (the share called ``unknown``) and ``novel_rate`` (the
share the novelty check alone calls unknown).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scmm.data_pipeline.hvg import log1p_profiles
from scmm.data_pipeline.store import Corpus

__all__ = ["foreign_counts", "FOREIGN_CELLS", "FOREIGN_PROGRAMS", "PROGRAM_GENES"]

FOREIGN_CELLS = 300
FOREIGN_PROGRAMS = 3
PROGRAM_GENES = 30  # up-regulated genes per programme (fewer when the panel is small)
PROGRAM_BOOST = 30.0  # their mean over the profile's
PROFILE_SIGMA = 1.5  # log-normal spread of a programme's mean profile
DISPERSION = 0.3  # negative-binomial dispersion (variance = mu + DISPERSION mu^2)
LIBRARY_SIGMA = 0.3
MAX_TRAIN_CELLS = 5000  # train cells read for the gene detection and the library size


def foreign_counts(corpus: Corpus, n_cells: int = FOREIGN_CELLS, n_programs: int = FOREIGN_PROGRAMS,
                   seed: int = 0) -> sp.csr_matrix:
    """Counts [n_cells, corpus genes] (float32 CSR; column j is the corpus's gene j) of cells made unlike the
    train split (module docstring); ``n_programs`` programmes, cells assigned in turn."""
    if n_cells < 1 or n_programs < 1:
        raise ValueError(f"need at least one cell and one programme, got {n_cells} and {n_programs}")
    n_genes = corpus.n_genes
    x, _, _ = log1p_profiles(corpus, "train", np.arange(n_genes), max_cells=MAX_TRAIN_CELLS, seed=seed)
    detected = (x > 0).mean(axis=0) if len(x) else np.zeros(n_genes)
    totals = _train_totals(corpus)
    library = float(np.median(totals)) if totals.size else 2000.0
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 27]))
    rare = np.argsort(detected, kind="stable")[:max(1, n_genes // 4)]  # the least detected quarter of the genes
    profiles = np.zeros((n_programs, n_genes))
    for p in range(n_programs):
        mu = rng.lognormal(0.0, PROFILE_SIGMA, n_genes)
        up = rng.choice(rare, size=min(PROGRAM_GENES, len(rare)), replace=False)
        mu[up] *= PROGRAM_BOOST
        profiles[p] = mu / mu.sum()
    which = np.arange(n_cells) % n_programs
    lib = library * rng.lognormal(0.0, LIBRARY_SIGMA, n_cells)
    mean = profiles[which] * lib[:, None]
    counts = rng.poisson(rng.gamma(1.0 / DISPERSION, mean * DISPERSION))
    counts[counts.sum(axis=1) == 0, int(np.argmax(profiles[0]))] = 1  # no empty cell
    return sp.csr_matrix(counts.astype(np.float32))


def _train_totals(corpus: Corpus) -> np.ndarray:
    """The linear totals of (at most :data:`MAX_TRAIN_CELLS`) train cells, as stored (counts or normalised)."""
    out, n = [], 0
    for shard in corpus.iter_shards("train", columns=("cell_id",)):
        out.append(np.asarray(shard.matrix.sum(axis=1)).ravel())
        n += shard.n_cells
        if n >= MAX_TRAIN_CELLS:
            break
    totals = np.concatenate(out) if out else np.zeros(0)
    if corpus.manifest.get("normalization") == "log1p":  # an older corpus storing log1p values: no linear totals
        return np.zeros(0)
    return totals[totals > 0]
