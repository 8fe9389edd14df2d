"""Ontology-aware similarity between a predicted and a true Cell Ontology (CL) term.

Both scores lie in [0, 1], give 1 to the exact term and 0 to an unrelated one, and share these rules:

* **Non-CL labels.** A label that is not a known CL term (free text, ``"unknown"``, another ontology's ID)
  scores 1 if it equals the other label as a string and 0 otherwise. Equal strings always score 1.
* **Graph.** The edges are the direct parents that :meth:`data_pipeline.ontology.Ontology.parents` lists
  (``is_a``, plus ``part_of`` where the ontology guide encodes it).
* **Generic terms.** Ancestors in :data:`GENERIC_TERMS` carry no information: the root ``cell``
  (CL:0000000), its obsolete predecessors ``native cell`` (CL:0000003) and ``animal cell`` (CL:0000548), and
  the upper-level *property* classes (eukaryotic, nucleate, single nucleate, motile, secretory, contractile,
  electrically active/responsive/signalling, stuff accumulating, ploidy classes, ``precursor cell``, ``cell in
  vitro``, ``abnormal cell``). Lineage classes such as ``hematopoietic cell``, ``epithelial cell``,
  ``neural cell`` or ``germ line cell`` are *not* generic. Two terms whose only shared ancestors are generic
  are unrelated (score 0): e.g. CD14-positive monocyte vs hepatocyte share only ``eukaryotic cell`` and ``cell``.
  A generic term (say a prediction of just ``cell``) scores 0 against any *other* term.

(a) Path score, :func:`ontology_score`
    Let ``d(x, a)`` be the length of the shortest upward path from ``x`` to its ancestor ``a`` (``d(x, x) = 0``)
    and ``C`` the set of terms that are ``pred`` or one of its ancestors *and* ``true`` or one of its ancestors,
    minus ``GENERIC_TERMS``. Then::

        ontology_score = decay ** min_{a in C} (d(pred, a) + d(true, a))      (0 if C is empty)

    with ``decay = 0.8``: the length of the shortest path between the two terms through a shared, informative
    ancestor. Parent or child of the truth: 0.8; sibling or grandparent: 0.64; first cousin: 0.8**4 = 0.41;
    T cell vs B cell (via ``lymphocyte``, 1 + 2 steps): 0.512.

(b) Personalized-PageRank similarity, :func:`ppr_similarity`
    Cell2Text scores a prediction by Personalized PageRank (PPR) on the ontology with directed ``is_a`` edges;
    a walk then only moves towards ancestors, so a prediction that is a *descendant* (or, depending on which
    term seeds the walk, an *ancestor*) of the truth is scored like an unrelated term. Here the walk goes both
    ways. For a pair (p, t):

    * ``G`` is the undirected graph whose nodes are ``{p, t}`` and all their ancestors, minus ``GENERIC_TERMS``
      (the pair's terms themselves are always kept), and whose edges are the parent links between those nodes.
      A bounded, pair-local graph: the score does not depend on which other labels are being evaluated, and
      sibling subtrees cannot dilute it.
    * ``pi_s`` is the PPR vector seeded at ``s``: ``pi_s = alpha * e_s + (1 - alpha) * pi_s @ P`` with ``P`` the
      row-normalised adjacency of ``G`` (an isolated node keeps its mass), restart probability ``alpha = 0.15``,
      solved by power iteration.
    * ``h(s -> x) = pi_s(x) / pi_x(x)``. By the strong Markov property this is the probability that a walk
      started at ``s``, which stops at each step with probability ``alpha``, visits ``x`` before it stops; it
      lies in [0, 1], equals 1 for ``x = s`` and 0 when ``x`` cannot be reached.
    * ``ppr_similarity = (h(p -> t) + h(t -> p)) / 2``: symmetric, 1 for the exact term, 0 for terms in
      different components of ``G`` (no shared informative ancestor), and positive for an ancestor, a
      descendant or any relative through a shared informative ancestor.
"""
from __future__ import annotations

import functools
from collections import Counter, deque
from collections.abc import Iterable

import numpy as np

from scmm.data_pipeline.ontology import Ontology

__all__ = ["GENERIC_TERMS", "ontology_score", "ppr_similarity", "mean_pair_score", "is_cl_term", "up_distances",
           "is_same_or_ancestor", "informative_common_ancestor"]

GENERIC_TERMS: frozenset[str] = frozenset({
    "CL:0000000",  # cell (root)
    "CL:0000003",  # native cell (obsolete former root)
    "CL:0000548",  # animal cell (former upper-level class)
    "CL:0000255",  # eukaryotic cell
    "CL:0002242",  # nucleate cell
    "CL:0000226",  # single nucleate cell
    "CL:0000225",  # anucleate cell
    "CL:0002371",  # somatic cell (former upper-level class)
    "CL:0000219",  # motile cell
    "CL:0000151",  # secretory cell
    "CL:0000183",  # contractile cell
    "CL:0000211",  # electrically active cell
    "CL:0000393",  # electrically responsive cell
    "CL:0000404",  # electrically signaling cell
    "CL:0000325",  # stuff accumulating cell
    "CL:0000412",  # polyploid cell
    "CL:0000413",  # haploid cell
    "CL:0000415",  # diploid cell
    "CL:0000417",  # endopolyploid cell
    "CL:0011115",  # precursor cell
    "CL:0001034",  # cell in vitro
    "CL:0001061",  # abnormal cell
})

DEFAULT_DECAY = 0.8
DEFAULT_ALPHA = 0.15


def is_cl_term(label: object, ontology: Ontology) -> bool:
    """True if ``label`` is a CL ID known to the ontology (deprecated terms included)."""
    return isinstance(label, str) and label.startswith("CL:") and ontology.is_valid(label)


@functools.lru_cache(maxsize=65536)
def _up_distances(ontology: Ontology, term: str) -> dict[str, int]:
    """Shortest upward distance from ``term`` to itself (0) and to each of its ancestors (BFS over parents)."""
    dist = {term: 0}
    queue = deque([term])
    while queue:
        node = queue.popleft()
        for parent in ontology.parents(node) if ontology.is_valid(node) else ():
            if parent not in dist:
                dist[parent] = dist[node] + 1
                queue.append(parent)
    return dist


def up_distances(term: str, ontology: Ontology) -> dict[str, int]:
    """Shortest upward distance from ``term`` to itself (0) and each of its ancestors; ``{term: 0}`` for a label
    that is not a CL term."""
    return dict(_up_distances(ontology, term)) if is_cl_term(term, ontology) else {term: 0}


def is_same_or_ancestor(pred: str, true: str, ontology: Ontology) -> bool:
    """True when ``pred`` is ``true`` or one of its ancestors (a *lineage-correct* answer: right, or coarser but
    right). ``"unknown"`` and labels that are not CL terms count only when equal to ``true``."""
    if pred == true:
        return True
    return is_cl_term(pred, ontology) and is_cl_term(true, ontology) and pred in _up_distances(ontology, true)


def informative_common_ancestor(terms: Iterable[str], ontology: Ontology,
                                generic: Iterable[str] = GENERIC_TERMS) -> tuple[str, int] | None:
    """The lowest informative common ancestor of CL ``terms`` (a term counts as its own ancestor) and how many
    ontology steps it lies above the *first* term; None when the terms share no informative ancestor or one of
    them is not a CL term.

    *Informative* means not in ``generic`` (:data:`GENERIC_TERMS`: the root ``cell``, its former roots and the
    upper-level property classes such as ``eukaryotic cell`` or ``motile cell``; the same rule as the ontology
    score). *Lowest*: among the common ancestors, the one with the smallest sum of shortest upward distances from
    the terms; ties go to the one nearest the first term, then to the one with more ancestors of its own (the more
    specific term), then to the smaller ID. For one term, or terms that are all one term, that term at level 0;
    when the first term is an ancestor of the others it is the answer, also at level 0.
    """
    terms = list(dict.fromkeys(terms))
    if not terms or not all(is_cl_term(t, ontology) for t in terms):
        return None
    generic = frozenset(generic)
    dists = [_up_distances(ontology, t) for t in terms]
    common = set(dists[0]).intersection(*dists[1:]) - generic
    if not common:
        return None
    best = min(common, key=lambda a: (sum(d[a] for d in dists), dists[0][a], -len(_up_distances(ontology, a)), a))
    return best, int(dists[0][best])


def ontology_score(pred: str, true: str, ontology: Ontology, decay: float = DEFAULT_DECAY,
                   generic: Iterable[str] = GENERIC_TERMS) -> float:
    """Path score ``decay ** (shortest path through a shared informative ancestor)``; see the module docstring."""
    generic = frozenset(generic)
    trivial = _trivial_score(pred, true, ontology, generic)
    return trivial if trivial is not None else _path_score(ontology, pred, true, float(decay), generic)


def _trivial_score(pred: str, true: str, ontology: Ontology, generic: frozenset[str]) -> float | None:
    """1 for the same label, 0 when either side is generic or not a CL term; None when the graph must decide."""
    if pred == true:
        return 1.0
    if pred in generic or true in generic or not (is_cl_term(pred, ontology) and is_cl_term(true, ontology)):
        return 0.0
    return None


@functools.lru_cache(maxsize=65536)
def _path_score(ontology: Ontology, pred: str, true: str, decay: float, generic: frozenset[str]) -> float:
    dp, dt = _up_distances(ontology, pred), _up_distances(ontology, true)
    common = (dp.keys() & dt.keys()) - generic
    if not common:
        return 0.0
    return float(decay ** min(dp[a] + dt[a] for a in common))


def ppr_similarity(pred: str, true: str, ontology: Ontology, alpha: float = DEFAULT_ALPHA,
                   generic: Iterable[str] = GENERIC_TERMS) -> float:
    """Symmetric two-way PPR hitting similarity of two CL terms; see the module docstring."""
    generic = frozenset(generic)
    trivial = _trivial_score(pred, true, ontology, generic)
    if trivial is not None:
        return trivial
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a, b = sorted((pred, true))  # symmetric: cache one order
    return _ppr_pair(ontology, a, b, float(alpha), generic)


def _ppr_vector(adj: np.ndarray, seed: int, alpha: float, tol: float = 1e-13, max_iter: int = 10_000) -> np.ndarray:
    """PPR vector seeded at node ``seed`` by power iteration on the row-normalised adjacency ``adj``."""
    deg = adj.sum(axis=1)
    trans = np.where(deg[:, None] > 0, adj / np.maximum(deg, 1)[:, None], np.eye(len(adj)))
    restart = np.zeros(len(adj))
    restart[seed] = 1.0
    pi = restart.copy()
    for _ in range(max_iter):
        new = alpha * restart + (1.0 - alpha) * (pi @ trans)
        if np.abs(new - pi).sum() < tol:
            return new
        pi = new
    return pi


@functools.lru_cache(maxsize=65536)
def _ppr_pair(ontology: Ontology, a: str, b: str, alpha: float, generic: frozenset[str]) -> float:
    nodes = sorted(((_up_distances(ontology, a).keys() | _up_distances(ontology, b).keys()) - generic) | {a, b})
    index = {n: i for i, n in enumerate(nodes)}
    adj = np.zeros((len(nodes), len(nodes)))
    for n in nodes:
        for p in ontology.parents(n) if ontology.is_valid(n) else ():
            if p in index and p != n:
                adj[index[n], index[p]] = adj[index[p], index[n]] = 1.0
    ia, ib = index[a], index[b]
    pa, pb = _ppr_vector(adj, ia, alpha), _ppr_vector(adj, ib, alpha)
    h_ab, h_ba = pa[ib] / pb[ib], pb[ia] / pa[ia]
    return float(np.clip((h_ab + h_ba) / 2.0, 0.0, 1.0))


def mean_pair_score(y_true: Iterable[str], y_pred: Iterable[str], ontology: Ontology, kind: str = "path") -> float:
    """Mean of :func:`ontology_score` (``kind='path'``) or :func:`ppr_similarity` (``'ppr'``) over cells.

    Each distinct (pred, true) pair is scored once, so this is fast on many cells.
    """
    fn = {"path": ontology_score, "ppr": ppr_similarity}[kind]
    t = np.asarray(list(y_true), dtype=object)
    p = np.asarray(list(y_pred), dtype=object)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} labels, y_pred {len(p)}")
    if len(t) == 0:
        return float("nan")
    pairs = Counter(zip(p.tolist(), t.tolist()))
    total = sum(fn(str(pp), str(tt), ontology) * n for (pp, tt), n in pairs.items())
    return float(total / len(t))
