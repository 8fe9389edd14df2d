"""Train/val/test splits that never put one donor (or dataset) in two splits.

The grouping key is the donor when the data has donors, else the dataset, else the cell itself.
Groups are shuffled with the seed and dealt, largest shortfall first, so that cell counts come
close to the requested fractions. Per-cell splits are stratified by label so that every type with
enough cells appears in every split.

Held-out types (``holdout``, a per-cell mask of the cells whose type is held out; ``scmm data build
--holdout-types``) never reach train or val: every such cell goes to test. With donor (or dataset) groups the
group rule still holds, so every group that holds a held-out cell goes *wholly* to test, and the other groups are
dealt as usual towards the requested fractions of the cells of seen types (the seen-type cells of the forced
groups count towards test's share, so test takes fewer of the other groups but still holds seen-type cells).
When fewer than two groups are free of held-out cells there is no donor-respecting split with a train and a val
part: that is an error naming the held-out types. With per-cell splits the held-out cells go to test and the
other cells are split, stratified, by the fractions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitPlan:
    split: np.ndarray  # per cell: 0 train, 1 val, 2 test
    group_by: str  # "donor_id", "dataset_id" or "cell"

    def counts(self) -> dict[str, int]:
        return {name: int((self.split == i).sum()) for i, name in enumerate(SPLITS)}


def _usable(names: np.ndarray) -> bool:
    """Some present value is a real name (not empty or a placeholder)."""
    values = pd.Series(names, dtype=object).astype(str).str.strip().str.lower()
    return bool((~values.isin(["", "nan", "none", "na", "unknown"])).any())


def _group_codes(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(per cell: rank of its value among the sorted distinct values, the distinct values present), computed on
    the categories of a categorical column so that no per-cell string is made. Ranks sort like the names, so a
    split drawn over them equals one drawn over the names."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = np.asarray(col.cat.categories.astype(str), dtype=object)
        codes = col.cat.codes.to_numpy()
        if (codes < 0).any():  # missing values read as 'nan', like astype(str) of the values
            cats, codes = np.append(cats, "nan"), np.where(codes < 0, len(cats), codes)
        names, rank = np.unique(cats.astype(str), return_inverse=True)
        codes = rank.astype(np.int32)[codes]  # int32 per cell, not int64
    else:
        names, codes = np.unique(col.astype(str).to_numpy(), return_inverse=True)
    present = _unique(codes)[0]
    return codes, names[present]


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True, return_counts=True)``; for small non-negative integers (codes)
    by counting, which holds no sorted copy of the cells."""
    if values.dtype.kind in "iu" and values.size and values.min() >= 0 and values.max() < 1 << 24:
        counts = np.bincount(values)
        names = np.flatnonzero(counts)
        table = np.zeros(len(counts), dtype=np.int32)
        table[names] = np.arange(len(names))
        return names.astype(values.dtype), table[values], counts[names]
    return np.unique(values, return_inverse=True, return_counts=True)


def assign_groups(groups: np.ndarray, fractions: tuple[float, float, float], seed: int,
                  to_test: np.ndarray | None = None) -> np.ndarray:
    """Split index per cell with every group wholly inside one split. A group holding a ``to_test`` cell goes to
    test; the fractions then apply to the other cells (those of held-out types are not counted), so that test
    still gets its share of seen-type cells."""
    names, inverse, sizes = _unique(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    held = np.zeros(len(groups), dtype=bool) if to_test is None else np.asarray(to_test, dtype=bool)
    counted = np.bincount(inverse[~held], minlength=len(names))  # cells per group that count towards the targets
    target = np.asarray(fractions, dtype=float) * counted.sum()
    have = np.zeros(3)
    group_split = np.zeros(len(names), dtype=np.int8)
    forced = np.zeros(len(names), dtype=bool)
    if held.any():
        forced[np.unique(inverse[held])] = True
        group_split[forced] = 2
        have[2] = counted[forced].sum()
    for g in order:
        if forced[g]:
            continue
        s = int(np.argmax(target - have))
        group_split[g] = s
        have[s] += counted[g]
    return group_split[inverse]


def assign_cells(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Per-cell split, stratified by label, seeded."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.int8)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(fractions[1] * len(idx)))
        n_test = int(round(fractions[2] * len(idx)))
        split[idx[:n_test]] = 2
        split[idx[n_test:n_test + n_val]] = 1
    return split


def plan_splits(obs: pd.DataFrame, labels: np.ndarray, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                seed: int = 0, donor_column: str = "donor_id", dataset_column: str = "dataset_id",
                holdout: np.ndarray | None = None) -> SplitPlan:
    """Choose the grouping (donor, else dataset, else cell) and assign every cell a split; cells in the
    ``holdout`` mask go to test (module docstring). ``labels`` are strings, or integer codes that sort like the
    names they stand for (the build's compact obs). ``ValueError`` when no group-respecting split is possible."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    held = np.zeros(len(obs), dtype=bool) if holdout is None else np.asarray(holdout, dtype=bool)
    if held.shape != (len(obs),):
        raise ValueError(f"holdout mask has {held.shape} entries for {len(obs)} cells")
    for column in (donor_column, dataset_column):
        if column not in obs.columns:
            continue
        groups, present = _group_codes(obs[column])
        if _usable(present):
            if len(present) >= 3:
                free = np.setdiff1d(_unique(groups)[0], np.unique(groups[held]))
                if len(free) < 2:
                    raise ValueError(f"only {len(free)} {column} group(s) hold no cell of a held-out type: a split "
                                     f"that keeps each {column} in one split needs at least 2 for train and val")
                return SplitPlan(assign_groups(groups, fractions, seed, to_test=held), column)
    split = np.full(len(obs), 2, dtype=np.int8)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":  # integer labels (codes that sort like the names) are used as they are
        labels = labels.astype(str)
    split[~held] = assign_cells(labels[~held], fractions, seed)
    return SplitPlan(split, "cell")
