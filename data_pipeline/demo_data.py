"""The bundled real demo data: scanpy's ``pbmc68k_reduced`` as a CELLxGENE-schema AnnData.

Provenance
----------
The cells are human peripheral blood mononuclear cells from Zheng et al. 2017, "Massively parallel
digital transcriptional profiling of single cells", Nature Communications 8:14049 (the 10x
Genomics "Fresh 68k PBMCs" data set, GemCode / 10x 3' v1 chemistry). scanpy ships a subsample of
700 cells and 765 genes as ``scanpy.datasets.pbmc68k_reduced()`` (read from the installed
package, no download). Its ``bulk_labels`` are the 10 cell-type labels Zheng et al. assigned by
correlation with FACS-sorted reference populations.

Reconstruction of the counts
----------------------------
scanpy's ``.raw.X`` holds ``log1p(counts / n_counts * 1e4)`` (rounded to 3 decimals) for the
765 genes, where ``obs['n_counts']`` is each cell's total count over *all* genes of the original
data set (so the 765 genes here sum to only ~20% of it). The raw counts are therefore recovered
as ``round(expm1(raw.X) * n_counts / 1e4)``; before rounding the values are within 0.09 of an
integer, and ``log1p(counts / n_counts * 1e4)`` reproduces ``raw.X`` to within 5e-4 (the
3-decimal rounding). ``obs['n_counts']`` is kept as that original library size.

There are no donor IDs in this data set, so there is no ``donor_id`` column; a split must fall
back to ``dataset_id`` (a single data set) or to cells.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scmm.data_pipeline.ontology import get_ontology

__all__ = ["pbmc_demo_adata", "BULK_LABEL_TO_CL", "DATASET_ID", "DEMO_HOLDOUT_TYPES"]

#: ``bulk_labels`` category -> Cell Ontology term.
BULK_LABEL_TO_CL: dict[str, str] = {
    "CD14+ Monocyte": "CL:0001054",
    "Dendritic": "CL:0000451",
    "CD19+ B": "CL:0000236",
    "CD4+/CD25 T Reg": "CL:0000815",
    "CD8+ Cytotoxic T": "CL:0000625",
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",
    "CD56+ NK": "CL:0000623",
    "CD4+/CD45RO+ Memory": "CL:0000897",
    "CD34+": "CL:0008001",
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",
}

DATASET_ID = "pbmc68k_reduced"

#: Types ``scmm data demo`` keeps out of train and val by default (all their cells go to test), so that the demo
#: always measures how scmm treats a type it never saw: the 13 CD34+ hematopoietic precursor cells.
DEMO_HOLDOUT_TYPES: tuple[str, ...] = ("CL:0008001",)

_CONSTANT_OBS = {
    "tissue_ontology_term_id": "UBERON:0000178",
    "disease_ontology_term_id": "PATO:0000461",
    # GemCode Single-Cell 3' v1 chemistry (Zheng et al. 2017); EFO:0009901 is "10x 3' v1".
    "assay_ontology_term_id": "EFO:0009901",
}
# label column for each constant ontology column
_LABEL_COLUMN = {
    "tissue_ontology_term_id": "tissue",
    "disease_ontology_term_id": "disease",
    "assay_ontology_term_id": "assay",
}


def _const_cat(value: str, n: int) -> pd.Categorical:
    return pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[value])


def pbmc_demo_adata():
    """Return the 700 x 765 PBMC demo data as a CELLxGENE-schema AnnData with raw counts.

    ``X`` is a float32 CSR matrix of integer counts over all 765 ``.raw`` genes (index and
    ``var['feature_name']`` = gene symbols; the data carries no Ensembl IDs). ``obs`` has
    ``cell_type_ontology_term_id`` / ``cell_type`` (from ``bulk_labels`` via
    :data:`BULK_LABEL_TO_CL`, labels from ``cellxgene-ontology-guide``), ``bulk_labels``,
    ``n_counts`` (original library size), tissue blood, disease normal, organism, assay
    10x 3' v1 (each with its ontology ID) and ``dataset_id``. All string columns are categorical.
    See the module docstring for provenance. Raises ``ValueError`` if a ``bulk_labels`` category
    has no Cell Ontology mapping.
    """
    import scanpy as sc  # noqa: PLC0415 - scanpy takes seconds to import; only the demo data needs it

    src = sc.datasets.pbmc68k_reduced()
    if src.raw is None:
        raise ValueError("pbmc68k_reduced has no .raw; cannot reconstruct counts")

    labels = src.obs["bulk_labels"]
    categories = [str(c) for c in labels.cat.categories]
    unmapped = sorted(set(categories) - set(BULK_LABEL_TO_CL))
    if unmapped:
        raise ValueError(f"bulk_labels categories without a Cell Ontology mapping: {unmapped}")
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} cells have no bulk_labels value")

    # counts = round(expm1(log1p(counts per 10k)) * n_counts / 1e4)
    raw = sp.csr_matrix(src.raw.X)
    raw.sum_duplicates()
    raw.sort_indices()
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)
    per_entry = np.repeat(n_counts, np.diff(raw.indptr))
    counts = np.rint(np.expm1(raw.data.astype(np.float64)) * per_entry / 1e4)
    if (counts < 0).any():
        raise ValueError("negative counts reconstructed from pbmc68k_reduced .raw.X")
    X = sp.csr_matrix((counts.astype(np.float32), raw.indices.copy(), raw.indptr.copy()), shape=raw.shape)
    X.eliminate_zeros()

    ontology = get_ontology()
    n = src.n_obs
    cl_ids = labels.astype(str).map(BULK_LABEL_TO_CL).to_numpy()
    cl_order = [BULK_LABEL_TO_CL[c] for c in categories]
    obs = pd.DataFrame(index=src.obs_names.copy())
    obs["cell_type_ontology_term_id"] = pd.Categorical(cl_ids, categories=cl_order)
    cl_labels = {cl: ontology.label(cl) for cl in cl_order}
    obs["cell_type"] = pd.Categorical([cl_labels[c] for c in cl_ids], categories=[cl_labels[c] for c in cl_order])
    obs["bulk_labels"] = labels.copy()
    for col, term in _CONSTANT_OBS.items():
        obs[col] = _const_cat(term, n)
        obs[_LABEL_COLUMN[col]] = _const_cat(ontology.label(term), n)
    # NCBITaxon is not looked up: cellxgene-ontology-guide needs ~20 s to load that ontology.
    obs["organism_ontology_term_id"] = _const_cat("NCBITaxon:9606", n)
    obs["organism"] = _const_cat("Homo sapiens", n)
    obs["dataset_id"] = _const_cat(DATASET_ID, n)
    obs["n_counts"] = src.obs["n_counts"].to_numpy(dtype=np.float32)

    symbols = [str(g) for g in src.raw.var_names]
    var = pd.DataFrame(index=pd.Index(symbols))
    var["feature_name"] = pd.Categorical(symbols)
    var["feature_reference"] = _const_cat("NCBITaxon:9606", len(symbols))

    uns = {
        "title": "PBMC 68k (Zheng et al. 2017), 700-cell subsample shipped with scanpy (pbmc68k_reduced)",
        "citation": "Zheng et al. (2017) Massively parallel digital transcriptional profiling of single "
                    "cells. Nat Commun 8:14049. Subsample: scanpy.datasets.pbmc68k_reduced.",
    }
    return anndata.AnnData(X=X, obs=obs, var=var, uns=uns)
