"""scmm's Python API: AnnData in, a new AnnData out (the input is never modified), scanpy style.

    import anndata, scmm.api as scmm
    model = scmm.load_model("runs/demo/model")          # packaged folder, or a bare stage-1 model folder
    out = scmm.embed(adata, model)                      # out.obsm['X_scmm']
    out = scmm.annotate(adata, model, labels=None, unknown_threshold=None, smooth=False)
    out = scmm.describe(adata, model)                   # out.obs['scmm_description'] (stage-2 model)
    scmm.build_index(ref, model, label_column="cell_type", out="ref_index")
    out = scmm.query_index("ref_index", adata, model, k=15)

``adata`` may be an in-memory AnnData, a backed one, or an ``.h5ad`` path (read chunk by chunk). ``model``
may be a :class:`~model.package.ScmmModel` or a folder. Every function takes ``batch_size`` (cells per
forward pass), ``chunk_size`` (rows read at a time: the memory bound), ``device`` ("cpu", "cuda"),
``precision`` ("auto", "fp32", "bf16"), ``layer``/``gene_column``/``min_gene_coverage`` (input reading,
see :mod:`scmm.reader`) and ``progress``.

Outputs (DESIGN.md names):

* ``obsm['X_scmm']``: the aligned, L2-normalised cell embedding (float32).
* ``obs['scmm_cell_type']``, ``obs['scmm_cell_type_ontology_term_id']`` (CL ID; "" for a free-text label
  with no CL term; "unknown" when called unknown), ``obs['scmm_confidence']`` (float32 in [0, 1]).
  - ``annotate``: each candidate label's prototype is the mean text embedding of its label texts (as in
    evaluation); a cell's similarity to a label is the cosine between its embedding and the prototype.
    Confidence = softmax over the candidates of ``logit_scale * cosine`` (the model's learned contrastive
    temperature), the probability of the chosen label. ``unknown_threshold`` is on the **cosine similarity**
    of the chosen label (the quantity ``scmm eval`` tunes: ``annotation.with_unknown.threshold`` in
    metrics.json); below it the cell is "unknown". Default: no threshold.
    ``smooth=True``: the probability vectors (and similarities) are averaged over each cell's ``k``
    nearest neighbours in the input's own embedding space (itself included; FAISS, flat or IVF as in
    :mod:`scmm.index`) before the choice.
  - ``query_index``: confidence = the vote share of the winner among the ``k`` nearest reference cells;
    ``unknown_threshold`` is on that vote share.
* ``obs['scmm_description']``: the stage-2 model's text for each cell.

Precision: ``auto`` runs fp32 on CPU and bf16 autocast on a CUDA GPU that supports it (measured on this
project's CPU: bf16 autocast was not faster for the model sizes used here, see the module ``_AUTO_BF16_CPU``
note); ``bf16`` forces autocast, ``fp32`` disables it.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from scmm.model.folders import ScmmModel, load_model as _load_model
from scmm.atomic import temp_file_beside
from scmm.errors import ScmmError

log = logging.getLogger("scmm")

__all__ = ["load_model", "embed", "annotate", "describe", "build_index", "query_index", "ScmmModel",
           "EMBEDDING_KEY", "CELL_TYPE", "CELL_TYPE_ID", "CONFIDENCE", "DESCRIPTION"]

EMBEDDING_KEY = "X_scmm"
CELL_TYPE = "scmm_cell_type"
CELL_TYPE_ID = "scmm_cell_type_ontology_term_id"
CONFIDENCE = "scmm_confidence"
DESCRIPTION = "scmm_description"
UNKNOWN = "unknown"
DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_SIZE = 10_000
SMOOTH_K = 15
INDEX_K = 15
_AUTO_BF16_CPU = False  # measured: see the report in benchmarks/bench_annotate.py's docstring


def load_model(folder: str | os.PathLike | ScmmModel) -> ScmmModel:
    """Open a packaged model folder (checksums verified) or a bare stage-1 model folder."""
    if isinstance(folder, ScmmModel):
        return folder
    return _load_model(folder)


# --- running the cell model -------------------------------------------------------------------------
def _device(device: str | None):
    import torch
    name = device or "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ScmmError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
    elif name != "cpu":
        raise ScmmError(f"--device must be cpu or cuda, not '{name}'")
    return torch.device(name)


def _autocast(device, precision: str):
    import contextlib
    import torch
    if precision not in ("auto", "fp32", "bf16"):
        raise ScmmError(f"precision must be auto, fp32 or bf16, not '{precision}'")
    if precision == "auto":
        use = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and _AUTO_BF16_CPU)
    else:
        use = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


class _Input:
    """One prepared input: chunked source, gene plan and normalisation (coverage checked and logged)."""

    def __init__(self, data: Any, model: ScmmModel, layer: str | None, gene_column: str | None,
                 min_gene_coverage: float):
        from scmm.data_pipeline.reader import detect_normalization, open_input, plan_genes
        self.source = open_input(data, layer)
        where = str(self.source.path)
        self.plan = plan_genes(self.source.var, model, gene_column, min_gene_coverage, where=where)
        self.normalization = detect_normalization(self.source)
        log.info("%s: %d cells, element %s, values read as %s", where, self.source.n_obs, self.source.element,
                 "raw counts (log1p CP10k)" if self.normalization == "counts" else "log1p-normalised")

    @property
    def n_obs(self) -> int:
        return self.source.n_obs


def _batches(inp: _Input, model: ScmmModel, chunk_size: int, batch_size: int):
    from scmm.data_pipeline.reader import iter_batches
    vocab = model.vocab
    return iter_batches(inp.source, inp.plan, inp.normalization, model.loader_config, vocab["<cls>"],
                        vocab["<pad>"], chunk_size, batch_size)


def _progress(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="cells", desc=desc, disable=None if progress else True, smoothing=0.1)


def _embed_input(inp: _Input, model: ScmmModel, batch_size: int, chunk_size: int, device: str | None,
                 precision: str, progress: bool) -> np.ndarray:
    import torch
    dev = _device(device)
    aligner = model.aligner.to(dev).eval()
    dim = aligner.heads.cell_proj.out_features if hasattr(aligner.heads, "cell_proj") else None
    out: np.ndarray | None = None if dim is None else np.zeros((inp.n_obs, dim), dtype=np.float32)
    t0 = time.perf_counter()
    bar = _progress(inp.n_obs, "embed", progress)
    try:
        with torch.inference_mode(), _autocast(dev, precision):
            for rows, batch in _batches(inp, model, chunk_size, batch_size):
                feats = aligner.cell_features(batch["gene_ids"].to(dev), batch["values"].to(dev),
                                              batch["padding_mask"].to(dev)).float().cpu().numpy()
                if out is None:
                    out = np.zeros((inp.n_obs, feats.shape[1]), dtype=np.float32)
                out[rows] = feats
                bar.update(len(rows))
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    log.info("embedded %d cells in %.1f s (%.1f cells/s)", inp.n_obs, dt, inp.n_obs / max(dt, 1e-9))
    assert out is not None
    return out


# --- annotation -------------------------------------------------------------------------------------
def _candidates(model: ScmmModel, labels: str | Sequence[str] | None):
    """(keys, display labels, CL IDs, prototype texts per candidate)."""
    from scmm.data_pipeline.ontology import get_ontology
    from scmm.data_pipeline.text import label_texts
    from scmm.eval.harness import read_labels_option, resolve_candidates
    items = read_labels_option(labels)
    if items is None:
        if not model.labels:
            raise ScmmError(f"model {model.folder} stores no candidate labels (a bare stage-1 folder whose training "
                            f"corpus was not found): pass --labels, or package the model with `scmm package`")
        return ([r["key"] for r in model.labels], [r["label"] for r in model.labels],
                [r["cell_type_ontology_term_id"] for r in model.labels], [r["texts"] for r in model.labels])
    ontology = get_ontology()
    cands = resolve_candidates(items, None, ontology)
    ids = [k if ontology.match_cell_type(k) == k else "" for k in cands.keys]
    texts = [label_texts(cid, ontology) if text is None else label_texts(cid, ontology, label=text)
             for cid, text in zip(cands.ids, cands.texts)]
    return cands.keys, cands.names, ids, texts


def _prototypes(model: ScmmModel, texts: list[list[str]]) -> np.ndarray:
    """Per candidate: the normalised mean of its texts' normalised aligned text features (eval's prototypes)."""
    import torch
    aligner = model.aligner
    rows = []
    with torch.inference_mode():
        for phrasings in texts:
            f = torch.nn.functional.normalize(aligner.text_features(list(phrasings)).float().cpu(), dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(f, dim=0).numpy())
    return np.stack(rows).astype(np.float32)


def _neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    from scmm.index import knn, make_index
    index, _ = make_index(emb)
    _, ids = knn(index, emb, min(k, len(emb)))
    return ids


def annotate_embeddings(emb: np.ndarray, model: ScmmModel, labels: str | Sequence[str] | None = None,
                        unknown_threshold: float | None = None, smooth: bool = False,
                        k: int = SMOOTH_K) -> pd.DataFrame:
    """The three annotation columns for embeddings ``emb`` (see the module docstring)."""
    keys, names, ids, texts = _candidates(model, labels)
    protos = _prototypes(model, texts)
    sim = emb @ protos.T  # cosine similarities [N, C]
    scale = float(model.aligner.heads.get_logit_scale().detach().float().cpu())
    logits = sim * scale
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    if smooth and len(emb) > 1:
        nb = _neighbours(emb, k)
        valid = nb >= 0
        w = valid / valid.sum(1, keepdims=True)
        safe = np.maximum(nb, 0)
        prob = np.einsum("nk,nkc->nc", w, prob[safe])
        sim = np.einsum("nk,nkc->nc", w, sim[safe])
    best = prob.argmax(1)
    rows = np.arange(len(best))
    conf = prob[rows, best].astype(np.float32)
    chosen_sim = sim[rows, best]
    cell_type = np.asarray(names, dtype=object)[best]
    cell_id = np.asarray(ids, dtype=object)[best]
    if unknown_threshold is not None:
        unknown = chosen_sim < unknown_threshold
        cell_type[unknown], cell_id[unknown] = UNKNOWN, UNKNOWN
    return _label_frame(cell_type, cell_id, conf)


def _label_frame(cell_type: np.ndarray, cell_id: np.ndarray, conf: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({CELL_TYPE: pd.Categorical(cell_type.astype(str)),
                         CELL_TYPE_ID: pd.Categorical(cell_id.astype(str)),
                         CONFIDENCE: np.asarray(conf, dtype=np.float32)})


# --- describe ---------------------------------------------------------------------------------------
def _describe_input(inp: _Input, model: ScmmModel, batch_size: int, chunk_size: int, device: str | None,
                    progress: bool, constrained: bool = False, num_beams: int = 1) -> list[str]:
    import torch
    stage2 = model.stage2  # ScmmError when the model has no stage 2
    dev = _device(device)
    if hasattr(stage2, "to"):
        stage2 = stage2.to(dev)
    out: list[str] = [""] * inp.n_obs
    bar = _progress(inp.n_obs, "describe", progress)
    try:
        with torch.inference_mode():
            for rows, batch in _batches(inp, model, chunk_size, batch_size):
                batch = {k: v.to(dev) for k, v in batch.items()}
                texts = stage2.describe_cells(batch, task="describe", constrained=constrained, num_beams=num_beams)
                if len(texts) != len(rows):
                    raise ScmmError(f"the stage-2 model returned {len(texts)} descriptions for {len(rows)} cells")
                for r, t in zip(rows, texts):
                    out[int(r)] = str(t)
                bar.update(len(rows))
    finally:
        bar.close()
    return out


# --- results into AnnData / h5ad --------------------------------------------------------------------
def _result_adata(data: Any, obs: pd.DataFrame | None, obsm: dict[str, np.ndarray]):
    """A copy of the input AnnData (loaded when given as a path or backed) with the new fields."""
    import anndata as ad
    if isinstance(data, (str, Path)):
        adata = ad.read_h5ad(data)
    elif getattr(data, "isbacked", False):
        adata = data.to_memory()
    else:
        adata = data.copy()
    if obs is not None:
        for col in obs.columns:
            adata.obs[col] = obs[col].to_numpy() if not isinstance(obs[col].dtype, pd.CategoricalDtype) \
                else obs[col].values
    for key, value in obsm.items():
        adata.obsm[key] = value
    return adata


def write_result_h5ad(src: str | os.PathLike, out: str | os.PathLike, obs: pd.DataFrame | None,
                      obsm: dict[str, np.ndarray], overwrite: bool = False) -> Path:
    """Write ``out`` = a copy of the file ``src`` plus new obs columns / obsm arrays, atomically.

    The input file is copied byte for byte (its expression matrices are never loaded), then obs is
    rewritten (read, columns added, written back: obs is small) and the obsm arrays are written with
    anndata's element writers through h5py; the copy is renamed to ``out`` only when complete.
    """
    import anndata as ad
    import h5py
    src, out = Path(src), Path(out)
    check_output(src, out, overwrite)
    tmp = temp_file_beside(out, suffix=".h5ad")
    try:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            if obs is not None:
                current = ad.io.read_elem(f["obs"])
                for col in obs.columns:
                    current[col] = obs[col].values
                del f["obs"]
                ad.io.write_elem(f, "obs", current)
            if obsm:
                if "obsm" not in f:
                    ad.io.write_elem(f, "obsm", {})
                for key, value in obsm.items():
                    if key in f["obsm"]:
                        del f["obsm"][key]
                    ad.io.write_elem(f["obsm"], key, np.ascontiguousarray(value))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def check_output(src: Path | None, out: Path, overwrite: bool) -> None:
    """Refuse to write over the input or, without ``overwrite``, over an existing file."""
    if src is not None and out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ScmmError(f"--out {out} is the input file; scmm never modifies its input")
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and out.is_dir():
        raise ScmmError(f"output {out} is a folder")


# --- public functions -------------------------------------------------------------------------------
def _common(model, data, layer, gene_column, min_gene_coverage):
    from scmm.data_pipeline.reader import DEFAULT_MIN_COVERAGE
    model = load_model(model)
    inp = _Input(data, model, layer, gene_column,
                 DEFAULT_MIN_COVERAGE if min_gene_coverage is None else min_gene_coverage)
    return model, inp


def embed(adata: Any, model: Any, batch_size: int = DEFAULT_BATCH_SIZE, chunk_size: int = DEFAULT_CHUNK_SIZE,
          device: str = "cpu", precision: str = "auto", layer: str | None = None, gene_column: str | None = None,
          min_gene_coverage: float | None = None, progress: bool = False):
    """A copy of ``adata`` with ``obsm['X_scmm']`` (the aligned cell embedding)."""
    model, inp = _common(model, adata, layer, gene_column, min_gene_coverage)
    emb = _embed_input(inp, model, batch_size, chunk_size, device, precision, progress)
    return _result_adata(adata, None, {EMBEDDING_KEY: emb})


def annotate(adata: Any, model: Any, labels: str | Sequence[str] | None = None,
             unknown_threshold: float | None = None, smooth: bool = False, k: int = SMOOTH_K,
             batch_size: int = DEFAULT_BATCH_SIZE, chunk_size: int = DEFAULT_CHUNK_SIZE, device: str = "cpu",
             precision: str = "auto", layer: str | None = None, gene_column: str | None = None,
             min_gene_coverage: float | None = None, progress: bool = False):
    """A copy of ``adata`` with the annotation obs columns and ``obsm['X_scmm']``.

    ``labels``: candidate labels (CL IDs or free text; a list, a comma-separated string or a file with one
    per line); default the training corpus's cell types stored in the model.
    """
    model, inp = _common(model, adata, layer, gene_column, min_gene_coverage)
    _candidates(model, labels)  # bad labels fail before the work
    emb = _embed_input(inp, model, batch_size, chunk_size, device, precision, progress)
    obs = annotate_embeddings(emb, model, labels, unknown_threshold, smooth, k)
    return _result_adata(adata, obs, {EMBEDDING_KEY: emb})


def describe(adata: Any, model: Any, batch_size: int = 16, chunk_size: int = DEFAULT_CHUNK_SIZE,
             device: str = "cpu", layer: str | None = None, gene_column: str | None = None,
             min_gene_coverage: float | None = None, constrained: bool = False, num_beams: int = 1,
             progress: bool = False):
    """A copy of ``adata`` with ``obs['scmm_description']`` from the model's stage 2."""
    model = load_model(model)
    model.stage2  # noqa: B018 - fail early when there is no stage 2
    model, inp = _common(model, adata, layer, gene_column, min_gene_coverage)
    texts = _describe_input(inp, model, batch_size, chunk_size, device, progress, constrained, num_beams)
    return _result_adata(adata, pd.DataFrame({DESCRIPTION: texts}), {})


def build_index(adata: Any, model: Any, label_column: str, out: str | os.PathLike, overwrite: bool = False,
                batch_size: int = DEFAULT_BATCH_SIZE, chunk_size: int = DEFAULT_CHUNK_SIZE, device: str = "cpu",
                precision: str = "auto", layer: str | None = None, gene_column: str | None = None,
                min_gene_coverage: float | None = None, progress: bool = False) -> Path:
    """Embed a labelled reference and write a FAISS index folder at ``out`` (see :mod:`scmm.index`)."""
    from scmm.index import reference_labels, write_index
    model, inp = _common(model, adata, layer, gene_column, min_gene_coverage)
    obs = inp.source.obs
    if label_column not in obs.columns:
        raise ScmmError(f"label column '{label_column}' is not in obs (columns: "
                        f"{', '.join(map(str, obs.columns)) or 'none'})")
    codes, classes = reference_labels(obs[label_column].to_numpy(), label_column)
    if not (codes >= 0).any():
        raise ScmmError(f"no reference cell has a label in column '{label_column}'")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    emb = _embed_input(inp, model, batch_size, chunk_size, device, precision, progress)
    return write_index(out, emb, codes, classes, model.fingerprint, label_column, overwrite,
                       extra={"reference": str(inp.source.path)})


def query_embeddings(index, emb: np.ndarray, k: int = INDEX_K, unknown_threshold: float | None = None):
    code, conf = index.vote(emb, k)
    classes = index.classes
    names = np.array([c["label"] for c in classes] + [UNKNOWN], dtype=object)
    ids = np.array([c["cell_type_ontology_term_id"] for c in classes] + [UNKNOWN], dtype=object)
    code = np.where(code >= 0, code, len(classes))
    cell_type, cell_id = names[code], ids[code]
    if unknown_threshold is not None:
        unknown = conf < unknown_threshold
        cell_type[unknown], cell_id[unknown] = UNKNOWN, UNKNOWN
    return _label_frame(cell_type, cell_id, conf)


def query_index(index: Any, adata: Any, model: Any, k: int = INDEX_K, unknown_threshold: float | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE, chunk_size: int = DEFAULT_CHUNK_SIZE, device: str = "cpu",
                precision: str = "auto", layer: str | None = None, gene_column: str | None = None,
                min_gene_coverage: float | None = None, progress: bool = False):
    """A copy of ``adata`` labelled by k-NN vote against a reference index (a folder or a ReferenceIndex)."""
    from scmm.index import ReferenceIndex
    model = load_model(model)
    ref = index if isinstance(index, ReferenceIndex) else ReferenceIndex.load(index)
    ref.check_model(model.fingerprint)
    model, inp = _common(model, adata, layer, gene_column, min_gene_coverage)
    emb = _embed_input(inp, model, batch_size, chunk_size, device, precision, progress)
    return _result_adata(adata, query_embeddings(ref, emb, k, unknown_threshold), {EMBEDDING_KEY: emb})


# --- file to file (the commands) --------------------------------------------------------------------
def _file_job(src, out, overwrite):
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise ScmmError(f"input file not found: {src}")
    check_output(src, out, overwrite)
    return src, out


def _read_opts(kw: dict) -> tuple[dict, dict]:
    """Split keyword options into input-reading ones and running ones."""
    read = {k: kw.pop(k, None) for k in ("layer", "gene_column", "min_gene_coverage")}
    run = {"batch_size": kw.pop("batch_size", DEFAULT_BATCH_SIZE), "chunk_size": kw.pop("chunk_size", DEFAULT_CHUNK_SIZE),
           "device": kw.pop("device", "cpu"), "precision": kw.pop("precision", "auto"),
           "progress": kw.pop("progress", False)}
    if kw:
        raise TypeError(f"unexpected options {sorted(kw)}")
    return read, run


def embed_file(src, out, model, overwrite: bool = False, **kw) -> Path:
    """``out`` = copy of the h5ad ``src`` + ``obsm['X_scmm']`` (``src`` is read chunk by chunk)."""
    src, out = _file_job(src, out, overwrite)
    read, run = _read_opts(kw)
    model, inp = _common(model, src, **read)
    emb = _embed_input(inp, model, **run)
    return write_result_h5ad(src, out, None, {EMBEDDING_KEY: emb}, overwrite)


def annotate_file(src, out, model, labels=None, unknown_threshold: float | None = None, smooth: bool = False,
                  k: int = SMOOTH_K, overwrite: bool = False, **kw) -> Path:
    """``out`` = copy of ``src`` + the annotation obs columns and ``obsm['X_scmm']``."""
    src, out = _file_job(src, out, overwrite)
    read, run = _read_opts(kw)
    model, inp = _common(model, src, **read)
    _candidates(model, labels)
    emb = _embed_input(inp, model, **run)
    obs = annotate_embeddings(emb, model, labels, unknown_threshold, smooth, k)
    return write_result_h5ad(src, out, obs, {EMBEDDING_KEY: emb}, overwrite)


def describe_file(src, out, model, overwrite: bool = False, constrained: bool = False, num_beams: int = 1,
                  **kw) -> Path:
    """``out`` = copy of ``src`` + ``obs['scmm_description']``."""
    src, out = _file_job(src, out, overwrite)
    read, run = _read_opts(kw)
    model = load_model(model)
    model.stage2  # noqa: B018 - fail early when there is no stage 2
    model, inp = _common(model, src, **read)
    run.pop("precision")
    texts = _describe_input(inp, model, run["batch_size"], run["chunk_size"], run["device"], run["progress"],
                            constrained, num_beams)
    return write_result_h5ad(src, out, pd.DataFrame({DESCRIPTION: texts}), {}, overwrite)


def query_index_file(index, src, out, model, k: int = INDEX_K, unknown_threshold: float | None = None,
                     overwrite: bool = False, **kw) -> Path:
    """``out`` = copy of ``src`` labelled by k-NN vote against the reference index."""
    from scmm.index import ReferenceIndex
    src, out = _file_job(src, out, overwrite)
    read, run = _read_opts(kw)
    if k < 1:
        raise ScmmError("--k must be at least 1")
    ref = ReferenceIndex.load(index)
    model = load_model(model)
    ref.check_model(model.fingerprint)
    model, inp = _common(model, src, **read)
    emb = _embed_input(inp, model, **run)
    return write_result_h5ad(src, out, query_embeddings(ref, emb, k, unknown_threshold), {EMBEDDING_KEY: emb},
                             overwrite)
