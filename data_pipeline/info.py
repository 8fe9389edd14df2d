"""`scmm data info`: what a corpus holds, as a dict (for --json) or as text."""
from __future__ import annotations

from scmm.data_pipeline.store import Corpus


def corpus_info(corpus: Corpus, n_examples: int = 3) -> dict:
    """Cells, genes, cell types with CL IDs and counts, splits, coverage and example texts."""
    m = corpus.manifest
    examples: list[dict] = []
    n_texts = 0
    for entry in corpus.shards():
        shard = corpus.read_shard(entry["name"], columns=("cell_id", "text", "cell_type_ontology_term_id"))
        texts = shard.obs["text"]
        n_texts += int(sum(bool(t.strip()) for t in texts))
        for i in range(min(len(texts), n_examples - len(examples))):
            examples.append({"cell_id": shard.obs["cell_id"][i], "cell_type_ontology_term_id":
                             shard.obs["cell_type_ontology_term_id"][i], "text": texts[i]})
    return {
        "path": str(corpus.path), "schema_version": m["schema_version"], "n_cells": m["n_cells"],
        "n_genes": m["n_genes"], "nnz": m["nnz"], "normalization": m["normalization"],
        "cell_types": {k: {"label": v["label"], "count": v["count"]} for k, v in m["cell_types"].items()},
        "splits": m["splits"], "split_group_by": m["split_group_by"],
        "holdout_types": {k: m["cell_types"].get(k, {}).get("label", k) for k in m.get("holdout_types") or []},
        "gene_coverage": m["gene_coverage"],
        "vocab": m["vocab"], "n_shards": len(m["shards"]), "n_texts": n_texts, "dropped_cells": m["dropped_cells"],
        "examples": examples,
    }


def format_info(info: dict) -> str:
    cov = info["gene_coverage"]
    lines = [f"corpus {info['path']}",
             f"  cells {info['n_cells']}, genes {info['n_genes']}, non-zeros {info['nnz']}, "
             f"values: {info['normalization']}, shards {info['n_shards']}",
             f"  splits (by {info['split_group_by']}): " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()),
             *(["  held-out types (all their cells in test, none in train or val): " + ", ".join(
                 f"{k} {v}" for k, v in info["holdout_types"].items())] if info.get("holdout_types") else []),
             f"  gene coverage: {cov['genes_mapped']}/{cov['genes_in_files']} ({cov['coverage']:.1%})",
             f"  texts: {info['n_texts']} of {info['n_cells']} cells", "  cell types:"]
    width = max((len(k) for k in info["cell_types"]), default=0)
    for term, rec in sorted(info["cell_types"].items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"    {term:<{width}}  {rec['count']:>8}  {rec['label']}")
    if info["examples"]:
        lines.append("  example texts:")
        lines += [f"    [{e['cell_type_ontology_term_id']}] {e['text']}" for e in info["examples"]]
    return "\n".join(lines)
