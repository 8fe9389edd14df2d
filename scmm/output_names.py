"""The names of what scmm writes into an AnnData (DESIGN.md, "Output names"): one owner for every writer and
reader of the inference results."""
from __future__ import annotations

__all__ = ["EMBEDDING_KEY", "CELL_TYPE", "CELL_TYPE_ID", "CONFIDENCE", "LEVEL", "NOVELTY", "DESCRIPTION",
           "LLM_COLUMNS", "QC", "QC_EMPTY", "UNKNOWN", "UNS_KEY", "PROGRAMS", "MARKERS", "CLAIMS_SUPPORTED"]

EMBEDDING_KEY = "X_scmm"  # obsm: the aligned, L2-normalised cell embedding
CELL_TYPE = "scmm_cell_type"
CELL_TYPE_ID = "scmm_cell_type_ontology_term_id"
CONFIDENCE = "scmm_confidence"
LEVEL = "scmm_cell_type_level"
NOVELTY = "scmm_novelty"
DESCRIPTION = "scmm_description"
PROGRAMS = "scmm_programs"  # the cell's most active hallmark programs, measured on its expression (describe)
MARKERS = "scmm_markers"  # its most over-expressed genes against the training cells (describe)
CLAIMS_SUPPORTED = "scmm_claims_supported"  # share of the description's claims its measured facts support
LLM_COLUMNS = {CELL_TYPE: "scmm_llm_cell_type", CELL_TYPE_ID: "scmm_llm_cell_type_ontology_term_id",
               CONFIDENCE: "scmm_llm_confidence", LEVEL: "scmm_llm_cell_type_level"}
QC = "scmm_qc"
QC_EMPTY = "no_expressed_gene"  # a cell that expresses none of the model's genes
UNKNOWN = "unknown"
UNS_KEY = "scmm"  # uns['scmm']: what a run says about the file as a whole (novelty_summary)
