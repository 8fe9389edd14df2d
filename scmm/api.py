"""scmm's Python API: AnnData in, a new AnnData out (the input is never modified), scanpy style.

    import anndata, scmm.api as scmm
    model = scmm.load_model("runs/demo/model")          # a package, a stage-2 or a stage-1 model folder
    out = scmm.embed(adata, model)                      # out.obsm['X_scmm']
    out = scmm.annotate(adata, model, labels=None, unknown_rate=None, unknown_threshold=None, smooth=False)
    out = scmm.describe(adata, model)                   # out.obs['scmm_description'] (stage-2 model)
    cells = scmm.generate(model, "A natural killer cell from the blood.", n=50)
    scmm.build_index(ref, model, "cell_type", "ref_index")
    out = scmm.query_index("ref_index", adata, model, k=15)

``data`` is an in-memory AnnData, a backed one, or an ``.h5ad`` path (read chunk by chunk). ``model`` is an opened
model (:func:`load_model`) or a folder. Every function takes keyword-only options: ``out`` (write the result to
this ``.h5ad`` instead of returning it: a copy of the input file plus the new fields, written atomically, the
expression matrix never loaded; the embeddings and descriptions written chunk by chunk, so memory is bounded by
``chunk_size``, not by the input; returns the path) with ``overwrite``, and the :class:`Options` (``batch_size``,
``chunk_size``, ``device``, ``precision``, ``layer``, ``gene_column``, ``min_gene_coverage``, ``input_scale``,
``progress``).

Input values: raw counts, linear-normalised values (CP10k, CPM, TPM), or log1p / log2(x+1) of those; the scale is
detected from a sample of the cells and logged with its evidence (:mod:`scmm.data_pipeline.scale`); ambiguous input
is an error; ``input_scale="counts"|"normalized"|"log1p"|"log2p1"`` says it instead. Genes given only as Ensembl
IDs map through the offline Ensembl-to-symbol table (:mod:`scmm.data_pipeline.vocab`).

Outputs (DESIGN.md names):

* ``obsm['X_scmm']``: the aligned, L2-normalised cell embedding (float32).
* ``obs['scmm_cell_type']``, ``obs['scmm_cell_type_ontology_term_id']`` (CL ID; "" for a free-text label
  with no CL term; "unknown" when called unknown), ``obs['scmm_confidence']`` (float32 in [0, 1]).
  - ``annotate``: each candidate label's prototype is the mean text embedding of its label texts (as in
    evaluation, :mod:`scmm.eval.annotate`); a cell's similarity to a label is the cosine between its embedding
    and the prototype. Confidence = the top-1 probability of ``softmax(cosine / T)`` over the candidates, with
    the temperature ``T`` that ``scmm eval`` fitted on the val split (a calibrated probability; see
    :mod:`scmm.eval.calibration`). A cell is "unknown" when its confidence is below the threshold, or (the
    novelty check, for a package holding ``novelty_reference.npz``) when its expression profile is unlike the
    training cells' (``obs['scmm_novelty']``, the mean cosine similarity to the nearest training cells in the
    expression PCA space of :mod:`scmm.eval.novelty`; float32, present for such a package) is below the novelty
    threshold: by default the thresholds ``scmm eval`` chose
    so that 5 % of new in-distribution cells abstain (half of the rate on each); with the novelty check the
    run also judges the file as a whole (:func:`scmm.eval.calibration.report_novelty`): the share of its cells
    below the novelty threshold is logged once (a warning when most of them are: data unlike the training data)
    and written to ``uns['scmm']['novelty_summary']``; ``unknown_rate`` picks another rate,
    ``unknown_threshold`` sets the confidence threshold (a confidence in [0, 1]) and turns the novelty check off.
    When the top candidates are within the back-off margin of each other, the answer is their lowest informative
    common ancestor in the Cell Ontology, and
    ``obs['scmm_cell_type_level']`` says how many ontology steps above the top-1 label it lies (0: no back-off;
    0 also for "unknown"). A model folder without that calibration (a bare stage-1/2 folder, or a package from
    before it) uses ``T = 1 / logit_scale`` (the contrastive temperature), no default threshold, no back-off.
    ``smooth=True``: the probability vectors are averaged over each cell's ``k`` nearest neighbours in the
    input's own embedding space (itself included; FAISS) before the choice.
  - ``query_index``: confidence = the vote share of the winner among the ``k`` nearest reference cells;
    ``unknown_threshold`` is on that vote share.
* ``obs['scmm_qc']`` (``embed``, ``annotate``, ``query_index``): "ok", or "no_expressed_gene" for a cell that
  expresses none of the model's genes. Such a cell's embedding holds no information about it: it is called
  "unknown" with confidence 0, and ``build_index`` leaves it out of the reference.
* ``obs['scmm_description']``: the stage-2 model's text for each cell. With ``cell_type`` (``scmm describe
  --cell-type``), also the LLM's answer to the cell-type question, scored over the model's candidate labels (the
  probability it gives each label as the answer), calibrated and backed off to a Cell Ontology ancestor with the
  temperature and margin ``scmm eval`` chose on val (``generation.scored``): ``obs['scmm_llm_cell_type']``,
  ``obs['scmm_llm_cell_type_ontology_term_id']``, ``obs['scmm_llm_confidence']``, ``obs['scmm_llm_cell_type_level']``.
* ``generate``: ``X`` float32 ``[n, G]`` of log1p-CP10k expression over the model's HVG panel (``var`` index: gene
  symbols, ``var['vocab_id']``), ``obs['prompt']``, ``uns['scmm_generate']`` (seed, noise, normalisation).

Several processes: under torchrun (``WORLD_SIZE`` > 1) with an ``.h5ad`` path and ``out``, ``embed``, ``annotate``
and ``query_index`` split the cells into one contiguous block per rank; rank 0 merges the ranks' parts into the
one output, equal to a single process's (:func:`_cells_on_ranks`).

Precision: the cell path (cell tower, Q-Former, heads) runs in bf16 weights with ``bf16``, in fp32 with ``fp32``, and
with ``auto`` (the default) in bf16 wherever the hardware multiplies bf16 natively: a CUDA GPU that supports it, a
CPU with AVX512-BF16 or AMX (cosine similarity to the fp32 embeddings above 0.999; BENCHMARKS.md, "Cell tower").
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from scmm.atomic import temp_file_beside
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.reader import DEFAULT_MIN_COVERAGE, detect_scale, iter_batches, open_input, plan_genes
from scmm.data_pipeline.scale import check_scale_option, to_linear
from scmm.errors import ScmmError
from scmm.eval import knn
from scmm.eval.annotate import Candidates, label_prototypes, read_labels_option
from scmm.eval.calibration import (
    Calibration,
    calibrated_answers,
    check_unknown_options,
    report_novelty,
    softmax,
)
from scmm.eval.novelty import ExpressionNovelty
from scmm.eval.stage2 import candidate_answers, scored_calibration
from scmm.index import ReferenceIndex, reference_labels, write_index
from scmm.model.folders import ScmmModel, load_model

log = logging.getLogger("scmm")

__all__ = ["load_model", "embed", "annotate", "describe", "generate", "build_index", "query_index", "Options",
           "ScmmModel", "EMBEDDING_KEY", "CELL_TYPE", "CELL_TYPE_ID", "CONFIDENCE", "LEVEL", "DESCRIPTION", "QC"]

EMBEDDING_KEY = "X_scmm"
CELL_TYPE = "scmm_cell_type"
CELL_TYPE_ID = "scmm_cell_type_ontology_term_id"
CONFIDENCE = "scmm_confidence"
LEVEL = "scmm_cell_type_level"
NOVELTY = "scmm_novelty"
UNS_KEY = "scmm"  # uns['scmm']: what a run says about the file as a whole (novelty_summary)
Labeller = Callable[[int, np.ndarray], pd.DataFrame]  # (first row, those rows' embeddings) -> label columns
DESCRIPTION = "scmm_description"
LLM_COLUMNS = {CELL_TYPE: "scmm_llm_cell_type", CELL_TYPE_ID: "scmm_llm_cell_type_ontology_term_id",
               CONFIDENCE: "scmm_llm_confidence", LEVEL: "scmm_llm_cell_type_level"}
QC = "scmm_qc"
QC_EMPTY = "no_expressed_gene"
UNKNOWN = "unknown"
SMOOTH_K = 15
INDEX_K = 15
MAX_PSEUDOCELLS = 1_000_000


@dataclass
class Options:
    """How inference runs and reads its input; every API function takes these as keyword arguments."""

    batch_size: int = 64  # cells per forward pass
    chunk_size: int = 10_000  # rows read at a time: the memory bound
    device: str = "cpu"  # cpu or cuda
    precision: str = "auto"  # auto (bf16 where native), fp32 or bf16: the cell path's weights
    layer: str | None = None  # X, raw or a layer name (default: raw counts first)
    gene_column: str | None = None  # var column of gene symbols (default feature_name, else the var names)
    min_gene_coverage: float = DEFAULT_MIN_COVERAGE
    input_scale: str = "auto"  # auto (detected from the values) or counts, normalized, log1p, log2p1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ScmmError("--chunk-size and --batch-size must be positive")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ScmmError(f"precision must be auto, fp32 or bf16, not '{self.precision}'")
        self.input_scale = check_scale_option(self.input_scale)

    @classmethod
    def of(cls, options: dict, **defaults) -> Options:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unexpected options {unknown} (known: {sorted(known)})")
        return cls(**{**defaults, **options})

    @property
    def torch_device(self) -> torch.device:
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ScmmError(f"--device {self.device}: no CUDA GPU is available (use --device cpu)")
        elif self.device != "cpu":
            raise ScmmError(f"--device must be cpu or cuda, not '{self.device}'")
        return torch.device(self.device)

    def dtype(self, device: torch.device) -> torch.dtype:
        """The weights' dtype of the cell path: bf16 with ``bf16``, and with ``auto`` wherever the hardware runs
        bf16 matrix products natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX)."""
        if self.precision != "auto":
            return torch.bfloat16 if self.precision == "bf16" else torch.float32
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else \
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else torch.float32


# --- input and the cell model -----------------------------------------------------------------------
class _Input:
    """One prepared input: chunked source, gene plan and value scale (coverage and scale checked and logged)."""

    def __init__(self, data: Any, model: ScmmModel, opts: Options):
        self.source = open_input(data, opts.layer)
        where = str(self.source.path)
        self.plan = plan_genes(self.source.var, model.vocab, model.panel_vocab_ids, opts.gene_column,
                               opts.min_gene_coverage, where=where)
        self.scale = detect_scale(self.source, opts.input_scale)
        self.model, self.opts = model, opts
        log.info("%s: %d cells, element %s, %s", where, self.source.n_obs, self.source.element, self.scale.describe())

    @property
    def n_obs(self) -> int:
        return self.source.n_obs

    def batches(self, begin: int = 0, end: int | None = None):
        return iter_batches(self.source, self.plan, self.scale, self.model.encoding, self.model.vocab,
                            self.opts.chunk_size, self.opts.batch_size, begin, end)

    def progress(self, desc: str, total: int | None = None):
        return tqdm(total=self.n_obs if total is None else total, unit="cells", desc=desc,
                    disable=None if self.opts.progress else True, smoothing=0.1)


def _embed_chunks(inp: _Input, begin: int = 0, end: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, embeddings, which cells express none of the model's genes) per chunk of the input's rows
    ``begin:end``: only one chunk is held (a cell with no expressed gene has ``<cls>`` alone as its input)."""
    end = inp.n_obs if end is None else end
    dev = inp.opts.torch_device
    aligner = inp.model.aligner.to(dev).eval()
    dtype = inp.opts.dtype(dev)
    cell_path = aligner.cell_features if dtype == torch.float32 else aligner.cell_embedder(dtype)
    dim = aligner.heads.cell_proj.out_features
    size = inp.opts.chunk_size
    n_empty, t0 = 0, time.perf_counter()
    chunk = None  # (start, embeddings, empty) of the chunk being filled

    def done(c):
        nonlocal n_empty
        n_empty += int(c[2].sum())
        return c

    with inp.progress("embed", end - begin) as bar, torch.inference_mode():
        for rows, batch in inp.batches(begin, end):
            start = begin + (int(rows[0]) - begin) // size * size  # a batch never spans two chunks
            if chunk is None or chunk[0] != start:
                if chunk is not None:
                    yield done(chunk)
                n = min(size, end - start)
                chunk = (start, np.zeros((n, dim), dtype=np.float32), np.zeros(n, dtype=bool))
            local = rows - start
            chunk[1][local] = cell_path(**{k: v.to(dev) for k, v in batch.items()}).float().cpu().numpy()
            chunk[2][local] = (~batch["padding_mask"]).sum(1).numpy() <= 1
            bar.update(len(rows))
        if chunk is not None:
            yield done(chunk)
    n, dt = end - begin, time.perf_counter() - t0
    log.info("embedded %d cells in %.1f s (%.1f cells/s, %s weights)", n, dt, n / max(dt, 1e-9),
             str(dtype).removeprefix("torch."))
    if n_empty:
        log.warning("%d of %d cells express none of the model's genes: flagged in obs['%s'] as '%s'",
                    n_empty, n, QC, QC_EMPTY)


def _embed(inp: _Input) -> tuple[np.ndarray, np.ndarray]:
    """All the cells' embeddings, and which cells express none of the model's genes (held in memory)."""
    dim = inp.model.aligner.heads.cell_proj.out_features
    out = np.zeros((inp.n_obs, dim), dtype=np.float32)
    empty = np.zeros(inp.n_obs, dtype=bool)
    for start, emb, emp in _embed_chunks(inp):
        out[start:start + len(emb)], empty[start:start + len(emb)] = emb, emp
    return out, empty


def _qc_labels(obs: pd.DataFrame, empty: np.ndarray) -> pd.DataFrame:
    """Label columns with the cells that express no model gene called unknown (confidence 0)."""
    cell_type, cell_id = (obs[c].astype(str).to_numpy(dtype=object) for c in (CELL_TYPE, CELL_TYPE_ID))
    conf = obs[CONFIDENCE].to_numpy(copy=True)
    level = obs[LEVEL].to_numpy(copy=True) if LEVEL in obs else None
    novelty = obs[NOVELTY].to_numpy(copy=True) if NOVELTY in obs else None
    cell_type[empty], cell_id[empty], conf[empty] = UNKNOWN, UNKNOWN, 0.0
    if level is not None:
        level[empty] = 0
    if novelty is not None:
        novelty[empty] = 0.0
    return _label_frame(cell_type, cell_id, conf, level, novelty)


class _Columns:
    """New obs columns gathered chunk by chunk in compact form: a categorical column as int32 codes into the
    categories seen so far (4 bytes per cell), a numeric one in its own dtype (4 bytes for the confidence, 2 for
    the level). :meth:`frame` gives what one call over all cells gives (categories: the sorted values present)."""

    def __init__(self, n: int):
        self.n = n
        self.numeric: dict[str, np.ndarray] = {}
        self.codes: dict[str, np.ndarray] = {}
        self.categories: dict[str, dict[str, int]] = {}
        self.order: list[str] = []

    def put(self, start: int, frame: pd.DataFrame) -> None:
        stop = start + len(frame)
        for col in frame.columns:
            values = frame[col]
            if isinstance(values.dtype, pd.CategoricalDtype):
                seen = self.categories.setdefault(col, {})
                local = np.array([seen.setdefault(str(c), len(seen)) for c in values.cat.categories] + [-1],
                                 dtype=np.int32)
                self.codes.setdefault(col, np.full(self.n, -1, dtype=np.int32))[start:stop] = \
                    local[values.cat.codes.to_numpy()]
            else:
                if col not in self.numeric:
                    self.numeric[col] = np.zeros(self.n, dtype=values.dtype)
                self.numeric[col][start:stop] = values.to_numpy()
        self.order = list(frame.columns)

    def frame(self) -> pd.DataFrame:
        out = pd.DataFrame(index=pd.RangeIndex(self.n))
        for col in self.order:
            if col in self.codes:
                names = np.array(list(self.categories[col]), dtype=object)
                order = np.argsort(names, kind="stable")
                remap = np.empty(len(names) + 1, dtype=np.int32)
                remap[order], remap[-1] = np.arange(len(names), dtype=np.int32), -1
                out[col] = pd.Categorical.from_codes(remap[self.codes[col]], categories=list(names[order]))
            else:
                out[col] = self.numeric[col]
        return out


# --- annotation -------------------------------------------------------------------------------------
def _candidates(model: ScmmModel, labels: str | Sequence[str] | None) -> Candidates:
    items = read_labels_option(labels)
    if items is not None:
        return Candidates.from_user(items, get_ontology())
    if not model.labels:
        raise ScmmError(f"model {model.folder} stores no candidate labels (a bare model folder whose training "
                        f"corpus was not found): pass --labels, or package the model with `scmm package`")
    return Candidates.from_labels(model.labels)


def _neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    index = knn.build_index(emb, "ip", approximate_above=knn.FLAT_MAX_CELLS)
    _, ids = knn.knn_search(index, emb, min(k, len(emb)))
    return ids


def model_calibration(model: ScmmModel, user_labels: bool, unknown_rate: float | None = None,
                      unknown_threshold: float | None = None) -> Calibration:
    """What annotation applies (:mod:`scmm.eval.calibration`): the temperature, abstention threshold and back-off
    margin that ``scmm eval`` chose on val and the package stores in its ``metrics.json``; else (a bare model
    folder, or a package from before calibration) the model's contrastive temperature, no abstention and no
    back-off. With the user's own candidate ``labels`` only the temperature is kept: the threshold and the margin
    were chosen for the training candidates (an explicit ``unknown_threshold`` still applies; ``unknown_rate``
    cannot, as the stored val confidences belong to the training candidates). The novelty check (a similarity
    threshold to the package's ``novelty_reference.npy``) is part of the stored calibration: off with ``labels``,
    with ``unknown_threshold`` and for a model without that file."""
    check_unknown_options(unknown_rate, unknown_threshold)
    stored = Calibration.from_metrics(model.metrics)
    if stored is None:
        scale = float(model.aligner.heads.get_logit_scale().detach().float().cpu())
        stored = Calibration(temperature=1.0 / scale)
    elif user_labels:
        stored = Calibration(temperature=stored.temperature)
    elif model.novelty_reference is None and stored.has_novelty:
        log.warning("model %s: its metrics record a novelty check but it holds no novelty reference: only the "
                    "confidence decides 'unknown'", model.folder)
        stored = stored.without_novelty()
    if user_labels and unknown_rate is not None:
        raise ScmmError("--unknown-rate applies to the model's own candidate labels (the val confidences it stores "
                        "belong to them); with --labels pass --unknown-threshold")
    return stored.with_options(unknown_rate, unknown_threshold)


def annotate_embeddings(emb: np.ndarray, model: ScmmModel, candidates: Candidates,
                        calibration: Calibration | None = None, smooth: bool = False,
                        k: int = SMOOTH_K) -> pd.DataFrame:
    """The annotation columns for embeddings ``emb`` (see the module docstring); ``calibration`` default
    :func:`model_calibration` for the model's own candidates. Without the cells' expression there is no novelty
    check (:func:`annotate` has one)."""
    return _annotator(model, candidates, calibration, smooth, k)(0, emb)


def _annotator(model: ScmmModel, candidates: Candidates, calibration: Calibration | None = None,
               smooth: bool = False, k: int = SMOOTH_K, inp: _Input | None = None
               ) -> Labeller:
    """(first row, embeddings of the rows from it) -> annotation columns, the label prototypes computed once.
    Without ``smooth`` each cell's answer depends on its embedding (and, with the novelty check, on its
    expression, read back from ``inp``) alone, so chunks can be annotated one at a time."""
    calibration = calibration or model_calibration(model, user_labels=False)
    with torch.inference_mode():
        protos = label_prototypes(model.aligner, candidates)
    ontology = get_ontology()
    novelty = _novelty(model, inp)

    def run(start: int, emb: np.ndarray) -> pd.DataFrame:
        similarity = novelty(start, len(emb)) if novelty is not None else None
        sim = emb @ protos.T  # cosine similarities [N, C]
        prob = softmax(sim, calibration.temperature)
        if smooth and len(emb) > 1:
            nb = _neighbours(emb, k)
            valid = nb >= 0
            w = valid / valid.sum(1, keepdims=True)
            prob = np.einsum("nk,nkc->nc", w, prob[np.maximum(nb, 0)])
        answers = calibrated_answers(sim, candidates.keys, candidates.names, candidates.cl_ids, calibration,
                                     ontology, prob=prob, novelty=similarity)
        return _label_frame(answers.names, answers.cl_ids, answers.confidence, answers.level, similarity)
    if novelty is not None:  # the file as a whole (scmm.eval.calibration.report_novelty), at the end
        run.novelty_summary = lambda sim, empty: report_novelty(sim, calibration, str(inp.source.path), empty)
    return run


def _novelty(model: ScmmModel, inp: _Input | None) -> Callable[[int, int], np.ndarray] | None:
    """(first row, number of rows) -> those input cells' novelty similarities (:mod:`scmm.eval.novelty`), read
    chunk by chunk from the input; None without a novelty reference in the model or an input to read."""
    if model.novelty_reference is None or inp is None:
        return None
    try:
        novelty = ExpressionNovelty.from_arrays(model.novelty_reference)
    except ValueError as exc:
        raise ScmmError(f"model {model.folder}: {exc}") from None
    index = novelty.index()  # built once, searched per chunk

    def similarity(start: int, n: int) -> np.ndarray:
        parts = [np.zeros(0)]
        for first, block in inp.source.iter_chunks(inp.opts.chunk_size, start, start + n):
            block = to_linear(block, inp.scale, f"{inp.source.path} (rows from {first})")[:, inp.plan.columns]
            parts.append(novelty.similarity(novelty.profiles(block, inp.plan.vocab_ids), index))
        return np.concatenate(parts)
    return similarity


def _check_threshold(value: float | None, low: float, high: float, what: str) -> None:
    if value is not None and not low <= value <= high:  # NaN fails both comparisons
        raise ScmmError(f"--unknown-threshold must be {what} in [{low:g}, {high:g}], got {value}")


def _label_frame(cell_type: np.ndarray, cell_id: np.ndarray, conf: np.ndarray,
                 level: np.ndarray | None = None, novelty: np.ndarray | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({CELL_TYPE: pd.Categorical(cell_type.astype(str)),
                          CELL_TYPE_ID: pd.Categorical(cell_id.astype(str)),
                          CONFIDENCE: np.asarray(conf, dtype=np.float32)})
    if level is not None:
        frame[LEVEL] = np.asarray(level, dtype=np.int16)
    if novelty is not None:
        frame[NOVELTY] = np.asarray(novelty, dtype=np.float32)
    return frame


def _query(index: ReferenceIndex, emb: np.ndarray, k: int, unknown_threshold: float | None) -> pd.DataFrame:
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


# --- describe ---------------------------------------------------------------------------------------
def _describe_chunks(inp: _Input, constrained: bool, num_beams: int,
                     answerer: Callable[[dict], tuple] | None = None
                     ) -> Iterator[tuple[int, np.ndarray, pd.DataFrame | None]]:
    """(first row, descriptions, the LLM's cell-type columns or None) per chunk of the input: only one chunk's
    texts are held. ``answerer``: batch -> (names, CL IDs, confidences, levels) of the LLM's scored answers."""
    dev = inp.opts.torch_device
    stage2 = inp.model.stage2.to(dev)
    size = inp.opts.chunk_size
    chunk = None  # (start, descriptions, [names, CL IDs, confidences, levels] or None)

    def done(c):
        return c[0], c[1], None if c[2] is None else \
            _label_frame(c[2][0], c[2][1], c[2][2], c[2][3]).rename(columns=LLM_COLUMNS)

    with inp.progress("describe") as bar, torch.inference_mode():
        for rows, batch in inp.batches():
            start = int(rows[0]) // size * size  # a batch never spans two chunks
            if chunk is None or chunk[0] != start:
                if chunk is not None:
                    yield done(chunk)
                n = min(size, inp.n_obs - start)
                chunk = (start, np.full(n, "", dtype=object),
                         None if answerer is None else [np.full(n, "", dtype=object), np.full(n, "", dtype=object),
                                                        np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int16)])
            batch = {k: v.to(dev) for k, v in batch.items()}
            texts = stage2.describe_cells(batch, task="describe", constrained=constrained, num_beams=num_beams)
            if len(texts) != len(rows):
                raise ScmmError(f"the stage-2 model returned {len(texts)} descriptions for {len(rows)} cells")
            chunk[1][rows - start] = [str(t) for t in texts]
            if answerer is not None:
                for column, values in zip(chunk[2], answerer(batch)):
                    column[rows - start] = values
            bar.update(len(rows))
        if chunk is not None:
            yield done(chunk)


def _llm_answerer(model: ScmmModel) -> Callable[[dict], tuple]:
    """batch -> (names, CL IDs, confidences, back-off levels) of the stage-2 LLM's answer to the cell-type question,
    scored over the model's candidate labels (:func:`scmm.eval.stage2.scored_answers`) and calibrated and backed
    off with what ``scmm eval`` chose on val (``generation.scored``; without it: temperature 1, no back-off)."""
    candidates = _candidates(model, None)
    ontology = get_ontology()
    answers = candidate_answers(candidates, ontology)
    calibration = scored_calibration(model.metrics)
    if calibration is None:
        log.warning("model %s: its metrics hold no calibration of the LLM's answers (generation.scored): "
                    "confidence at temperature 1, no back-off", model.folder)
        calibration = Calibration(temperature=1.0)

    def run(batch: dict) -> tuple:
        logp = model.stage2.answer_logprobs(batch, answers)
        a = calibrated_answers(logp, candidates.keys, candidates.names, candidates.cl_ids, calibration, ontology)
        return a.names, a.cl_ids, a.confidence, a.level
    return run


# --- results ----------------------------------------------------------------------------------------
def check_output(src: Path | None, out: Path, overwrite: bool) -> None:
    """Refuse to write over the input or, without ``overwrite``, over an existing file, or where nothing can be
    written (missing folders on the way are created when the result is written)."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ScmmError(f"cannot write --out {out}: {parent} is not a writable folder")
    if src is not None and out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ScmmError(f"--out {out} is the input file; scmm never modifies its input")
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and out.is_dir():
        raise ScmmError(f"output {out} is a folder")
    if out.suffix != ".h5ad":
        raise ScmmError(f"--out must name a .h5ad file, not {out}")


def _publish_file(tmp: Path, out: Path) -> Path:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)
    return out


def _add_obs_columns(f: h5py.File, obs: pd.DataFrame) -> None:
    """Add (or replace) the columns of ``obs`` in the file's obs table, column by column: the table already there
    is not read (an obs in an older encoding, or a new column named like its index, is read and written back)."""
    group = f["obs"]
    index_name = group.attrs.get("_index") if isinstance(group, h5py.Group) else None
    if group.attrs.get("encoding-type") != "dataframe" or index_name is None or index_name in obs.columns:
        current = ad.io.read_elem(group)
        for col in obs.columns:
            current[col] = obs[col].values
        del f["obs"]
        ad.io.write_elem(f, "obs", current)
        return
    order = [str(c) for c in group.attrs.get("column-order", [])]
    for col in obs.columns:
        if col in group:
            del group[col]
        ad.io.write_elem(group, col, obs[col].values)
        if col not in order:
            order.append(col)
    group.attrs["column-order"] = order


def _create_obsm(f: h5py.File, key: str, shape: tuple[int, int]) -> h5py.Dataset:
    """An empty float32 ``obsm[key]`` of ``shape`` in anndata's on-disk encoding (a plain 2-D array), to fill by
    rows."""
    if "obsm" not in f:
        ad.io.write_elem(f, "obsm", {})
    if key in f["obsm"]:
        del f["obsm"][key]
    ds = f["obsm"].create_dataset(key, shape=shape, dtype=np.float32)
    ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
    return ds


class _Sink:
    """Where a run's embeddings and new obs columns go. With ``out`` and an ``.h5ad`` input: a byte copy of the
    input (the expression matrices are never loaded) beside ``out``, whose ``obsm['X_scmm']`` is filled chunk by
    chunk and whose obs gets the new columns at the end, renamed into place when complete (bounded memory);
    else arrays in memory, and an AnnData copy of the input at the end."""

    def __init__(self, data: Any, out: Path | None, n: int, dim: int | None):
        self.data, self.out, self.n = data, out, n
        self.tmp: Path | None = None
        self.file: h5py.File | None = None
        self.emb: Any = None
        self.held: dict[str, np.ndarray] = {}  # text columns held until the end
        if out is not None and isinstance(data, (str, Path)):
            self.tmp = temp_file_beside(out, suffix=".h5ad")
            shutil.copyfile(data, self.tmp)
            self.file = h5py.File(self.tmp, "r+")
            if dim is not None:
                self.emb = _create_obsm(self.file, EMBEDDING_KEY, (n, dim))
        elif dim is not None:
            self.emb = np.zeros((n, dim), dtype=np.float32)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.tmp is not None and self.tmp.exists():
            self.tmp.unlink()

    def put(self, start: int, emb: np.ndarray) -> None:
        self.emb[start:start + len(emb)] = emb

    def text_column(self, name: str) -> Any:
        """A new string obs column to fill by rows: in the output file itself when its obs table allows (anndata's
        string-array encoding), else an array held until :meth:`finish`."""
        group = self.file["obs"] if self.file is not None else None
        if group is not None and group.attrs.get("encoding-type") == "dataframe" and \
                name != group.attrs.get("_index"):
            if name in group:
                del group[name]
            column = group.create_dataset(name, shape=(self.n,), dtype=h5py.string_dtype())
            column.attrs["encoding-type"], column.attrs["encoding-version"] = "string-array", "0.2.0"
            order = [str(c) for c in group.attrs.get("column-order", [])]
            group.attrs["column-order"] = order + ([name] if name not in order else [])
            return column
        column = np.full(self.n, "", dtype=object)
        self.held[name] = column
        return column

    def embeddings(self) -> np.ndarray:
        return np.asarray(self.emb[...])

    def finish(self, obs: pd.DataFrame | None):
        """The result: the output file's path, or an AnnData (``obs.attrs[UNS_KEY]`` goes to ``uns['scmm']``)."""
        uns = obs.attrs.get(UNS_KEY) if obs is not None else None
        if self.held:
            obs = pd.DataFrame(self.held) if obs is None else obs.assign(**self.held)
        if self.file is not None:
            if obs is not None and len(obs.columns):
                _add_obs_columns(self.file, obs)
            if uns:
                _add_uns(self.file, uns)
            self.file.close()
            self.file = None
            return _publish_file(self.tmp, self.out)
        data = self.data
        if isinstance(data, (str, Path)):
            adata = ad.read_h5ad(data)
        elif getattr(data, "isbacked", False):
            adata = data.to_memory()
        else:
            adata = data.copy()
        for col in (obs.columns if obs is not None else []):
            adata.obs[col] = obs[col].values
        if self.emb is not None:
            adata.obsm[EMBEDDING_KEY] = self.emb
        if uns:
            scmm_uns = adata.uns.get(UNS_KEY)
            adata.uns[UNS_KEY] = {**(dict(scmm_uns) if isinstance(scmm_uns, dict) else {}), **uns}
        return _write_adata(adata, self.out) if self.out is not None else adata


def _add_uns(file: h5py.File, uns: dict) -> None:
    """``uns['scmm'][key] = value`` for each item of ``uns`` in an open h5ad (other ``uns`` entries are kept)."""
    group = file.require_group("uns")
    if UNS_KEY in group and not isinstance(group[UNS_KEY], h5py.Group):
        del group[UNS_KEY]
    scmm_group = group.require_group(UNS_KEY)
    for g in (group, scmm_group):
        if "encoding-type" not in g.attrs:
            g.attrs["encoding-type"], g.attrs["encoding-version"] = "dict", "0.1.0"
    for key, value in uns.items():
        if key in scmm_group:
            del scmm_group[key]
        ad.io.write_elem(scmm_group, key, {k: v for k, v in value.items() if v is not None})


def _write_adata(adata: ad.AnnData, out: Path) -> Path:
    tmp = temp_file_beside(out, suffix=".h5ad")
    try:
        adata.write_h5ad(tmp)
        return _publish_file(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _with_qc(obs: pd.DataFrame | None, empty: np.ndarray) -> pd.DataFrame:
    """``obs`` (or a new frame) with the QC column (cells with no expressed gene are flagged)."""
    obs = pd.DataFrame(index=pd.RangeIndex(len(empty))) if obs is None else obs
    obs[QC] = pd.Categorical(np.where(empty, QC_EMPTY, "ok"), categories=["ok", QC_EMPTY])
    return obs


def _cells(data: Any, inp: _Input, out: Path | None, labeller: Labeller | None = None,
           whole: bool = False):
    """Embed every cell and (with ``labeller``: embeddings -> label columns) label it, chunk by chunk into a
    :class:`_Sink`: held per cell are 1 byte (the QC flag) and the compact label columns (:class:`_Columns`);
    ``whole``: the labeller needs all the embeddings at once (neighbour smoothing), read back at the end.
    Under torchrun (WORLD_SIZE > 1, an ``.h5ad`` path in, ``out`` given) the ranks split the cells
    (:func:`_cells_on_ranks`)."""
    dim = inp.model.aligner.heads.cell_proj.out_features
    if _world_size() > 1 and out is not None and isinstance(data, (str, Path)):
        return _cells_on_ranks(data, inp, out, dim, labeller, whole)
    with _Sink(data, out, inp.n_obs, dim) as sink:
        cols, empty = _fill(inp, sink, 0, inp.n_obs, None if whole else labeller)
        return sink.finish(_labels_at_end(sink, cols, empty, labeller, whole))


def _fill(inp: _Input, sink: Any, begin: int, end: int, labeller: Labeller | None
          ) -> tuple[_Columns, np.ndarray]:
    """Rows ``begin:end`` embedded into ``sink`` (rows counted from ``begin``), labelled chunk by chunk."""
    cols, empty = _Columns(end - begin), np.zeros(end - begin, dtype=bool)
    for start, emb, emp in _embed_chunks(inp, begin, end):
        sink.put(start - begin, emb)
        empty[start - begin:start - begin + len(emb)] = emp
        if labeller is not None:
            cols.put(start - begin, _qc_labels(labeller(start, emb), emp))
    return cols, empty


# --- several processes (torchrun) -----------------------------------------------------------------
def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _part_path(out: Path, rank: int) -> Path:
    run = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("MASTER_PORT", "0"))
    return out.parent / f".{out.name}.{run}.rank{rank}.part"


def _rank_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous block of rows rank ``rank`` of ``world`` embeds (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


class _PartSink:
    """One rank's share of the embeddings, written chunk by chunk to an HDF5 part file beside the output."""

    def __init__(self, path: Path, n: int, dim: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = h5py.File(path, "w")
        self.emb = self.file.create_dataset(EMBEDDING_KEY, shape=(n, dim), dtype=np.float32)

    def put(self, start: int, emb: np.ndarray) -> None:
        self.emb[start:start + len(emb)] = emb

    def finish(self, obs: pd.DataFrame | None, empty: np.ndarray) -> None:
        self.file.create_dataset("empty", data=empty)
        if obs is not None:
            ad.io.write_elem(self.file, "obs", obs)
        self.file.close()


def _cells_on_ranks(data: Any, inp: _Input, out: Path, dim: int,
                    labeller: Labeller | None, whole: bool) -> Path:
    """torchrun: each rank embeds (and, unless ``whole``, labels) a contiguous block of rows into its part file;
    after a barrier rank 0 merges the parts, in row order and chunk by chunk, into the one output (atomic, as
    with one process: the same values, labels and categories), removes the parts; a last barrier, then every
    rank leaves the process group. The ranks only synchronise (gloo; no tensor is exchanged), so the GPU or CPU
    that computes does not matter. Every rank prepared the same inputs, calibration and candidates, and the
    cells' draws are seeded by their rows, so the result equals a one-process run's."""
    own = not tdist.is_initialized()
    if own:
        tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if inp.opts.device == "cuda":  # one GPU per process on a node
        inp.opts.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    begin, end = _rank_rows(inp.n_obs, world, rank)
    part = _part_path(out, rank)
    error: BaseException | None = None
    result: Path = out
    try:
        try:
            sink = _PartSink(part, end - begin, dim)
            try:
                cols, empty = _fill(inp, sink, begin, end, None if whole else labeller)
                sink.finish(cols.frame() if labeller is not None and not whole else None, empty)
            finally:
                sink.file.close()
        except Exception as exc:  # every rank learns below that one failed, instead of waiting at a barrier
            error = exc
        if _all_ok(error) and rank == 0:
            try:
                result = _merge_parts(data, inp, out, dim, labeller, whole, world)
            except Exception as exc:
                error = exc
        if not _all_ok(error) and error is None:
            error = ScmmError("another rank failed (see its error); no output was written")
    finally:
        part.unlink(missing_ok=True)
        if own:
            tdist.barrier()
            tdist.destroy_process_group()
    if error is not None:
        raise error
    return result


def _all_ok(error: BaseException | None) -> bool:
    """True when no rank has an error (a collective: every rank calls it)."""
    flag = torch.tensor([0.0 if error is None else 1.0])
    tdist.all_reduce(flag)
    return flag.item() == 0


def _merge_parts(data: Any, inp: _Input, out: Path, dim: int, labeller: Labeller | None,
                 whole: bool, world: int) -> Path:
    n, step = inp.n_obs, inp.opts.chunk_size
    cols, empty = _Columns(n), np.zeros(n, dtype=bool)
    try:
        with _Sink(data, out, n, dim) as sink:
            for rank in range(world):
                begin, end = _rank_rows(n, world, rank)
                with h5py.File(_part_path(out, rank), "r") as f:
                    for a in range(0, end - begin, step):
                        sink.put(begin + a, f[EMBEDDING_KEY][a:a + step])
                    empty[begin:end] = f["empty"][...]
                    if labeller is not None and not whole:
                        cols.put(begin, ad.io.read_elem(f["obs"]).reset_index(drop=True))
            return sink.finish(_labels_at_end(sink, cols, empty, labeller, whole))
    finally:
        for rank in range(1, world):
            _part_path(out, rank).unlink(missing_ok=True)


def _labels_at_end(sink: Any, cols: _Columns, empty: np.ndarray,
                   labeller: Labeller | None, whole: bool) -> pd.DataFrame:
    if labeller is not None and whole:
        frame = _with_qc(_qc_labels(labeller(0, sink.embeddings()), empty), empty)
    else:
        frame = _with_qc(cols.frame() if labeller is not None else None, empty)
    summarise = getattr(labeller, "novelty_summary", None)  # the global novelty rule, once over every cell
    if summarise is not None and NOVELTY in frame:
        summary = summarise(frame[NOVELTY].to_numpy(), empty)
        if summary is not None:
            frame.attrs[UNS_KEY] = {"novelty_summary": summary}
    return frame


def _start(data: Any, model: Any, out: str | os.PathLike | None, overwrite: bool, options: dict,
           **defaults) -> tuple[ScmmModel, _Input, Path | None]:
    """Check the output, open the model and prepare the input, before any work."""
    out = Path(out) if out is not None else None
    if isinstance(data, (str, Path)) and not Path(data).is_file():
        kind = "is a folder, not an .h5ad file" if Path(data).is_dir() else "not found"
        raise ScmmError(f"input file {kind}: {data}")
    if out is not None:
        check_output(Path(data) if isinstance(data, (str, Path)) else None, out, overwrite)
    opts = Options.of(options, **defaults)
    model = load_model(model)
    return model, _Input(data, model, opts), out


def _obs_column(source: Any, column: str) -> tuple[list[str], np.ndarray | None]:
    """(obs column names, the values of ``column`` or None): from an h5ad only that column is read."""
    path = Path(str(source.path))
    if path.is_file():
        with h5py.File(path, "r") as f:
            group = f["obs"]
            if group.attrs.get("encoding-type") == "dataframe":
                columns = [str(c) for c in group.attrs.get("column-order", [])]
                if column not in columns:
                    return columns, None
                return columns, np.asarray(ad.io.read_elem(group[column]), dtype=object)
    obs = source.obs
    return list(obs.columns), obs[column].to_numpy() if column in obs.columns else None


# --- public functions -------------------------------------------------------------------------------
def embed(data: Any, model: Any, *, out: str | os.PathLike | None = None, overwrite: bool = False, **options):
    """A copy of ``data`` with ``obsm['X_scmm']`` (the aligned cell embedding)."""
    model, inp, out = _start(data, model, out, overwrite, options)
    return _cells(data, inp, out)


def annotate(data: Any, model: Any, *, labels: str | Sequence[str] | None = None,
             unknown_threshold: float | None = None, unknown_rate: float | None = None, smooth: bool = False,
             k: int = SMOOTH_K, out: str | os.PathLike | None = None, overwrite: bool = False, **options):
    """A copy of ``data`` with the annotation obs columns and ``obsm['X_scmm']``.

    ``labels``: candidate labels (CL IDs or free text; a list, a comma-separated string or a file with one per
    line); default the training corpus's cell types stored with the model. ``unknown_rate`` (the share of val
    cells allowed to abstain) or ``unknown_threshold`` (a calibrated confidence in [0, 1]) replace the stored
    abstention threshold (:func:`model_calibration`).
    """
    if smooth and k < 1:
        raise ScmmError("--k must be at least 1")
    check_unknown_options(unknown_rate, unknown_threshold)
    model, inp, out = _start(data, model, out, overwrite, options)
    candidates = _candidates(model, labels)  # bad labels fail before the work
    calibration = model_calibration(model, labels is not None, unknown_rate, unknown_threshold)
    return _cells(data, inp, out, _annotator(model, candidates, calibration, smooth, k, inp), whole=smooth)


def describe(data: Any, model: Any, *, constrained: bool = False, num_beams: int = 1, cell_type: bool = False,
             out: str | os.PathLike | None = None, overwrite: bool = False, **options):
    """A copy of ``data`` with ``obs['scmm_description']`` from the model's stage 2; with ``cell_type`` also the
    LLM's calibrated cell-type answer over the model's candidate labels, backed off like the annotation's
    (``obs['scmm_llm_cell_type']``, ``..._ontology_term_id``, ``scmm_llm_confidence``,
    ``scmm_llm_cell_type_level``; :func:`_llm_answerer`)."""
    model = load_model(model)
    model.stage2  # noqa: B018 - fail early when there is no stage 2
    model, inp, out = _start(data, model, out, overwrite, options)
    answerer = _llm_answerer(model) if cell_type else None
    cols = _Columns(inp.n_obs)
    with _Sink(data, out, inp.n_obs, None) as sink:
        column = sink.text_column(DESCRIPTION)
        for start, texts, frame in _describe_chunks(inp, constrained, num_beams, answerer):
            column[start:start + len(texts)] = texts
            if frame is not None:
                cols.put(start, frame)
        return sink.finish(cols.frame() if answerer is not None else None)


def generate(model: Any, text: str | Sequence[str], *, n: int, seed: int = 0, noise: float = 1.0,
             out: str | os.PathLike | None = None, overwrite: bool = False):
    """``n`` pseudo-cells per text from the model's stage 2, as an AnnData (text-major rows), or that file with
    ``out``. The same model, texts, n and seed give the same cells."""
    texts = [text] if isinstance(text, str) else list(text)
    texts = [" ".join(str(t).split()) for t in texts]
    if not texts or not all(texts):
        raise ScmmError("--text must be a non-empty description")
    if not 1 <= n <= MAX_PSEUDOCELLS:
        raise ScmmError(f"--n must be between 1 and {MAX_PSEUDOCELLS}, got {n}")
    if not noise >= 0:
        raise ScmmError(f"noise must be >= 0, got {noise}")
    if out is not None:
        out = Path(out)
        check_output(None, out, overwrite)
    model = load_model(model)
    stage2 = model.stage2
    x = stage2.generate_pseudocells(texts, n, seed=seed, noise=noise)
    prompts = [t for t in texts for _ in range(n)]
    obs = pd.DataFrame({"prompt": prompts, "pseudocell": np.tile(np.arange(n), len(texts))},
                       index=[f"pseudocell_{i}" for i in range(len(prompts))])
    symbols = [str(s) for s in stage2.hvg["symbols"]]
    var = pd.DataFrame({"feature_name": symbols, "vocab_id": np.asarray(stage2.hvg["vocab_ids"], dtype=np.int64)},
                       index=pd.Index(symbols, name="gene").astype(str))
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var)
    adata.uns["scmm_generate"] = {"model": str(model.folder), "seed": int(seed), "n_per_text": int(n),
                                  "noise": float(noise), "normalization": "log1p_cp10k",
                                  "genes": "highly variable genes of the training corpus"}
    return _write_adata(adata, out) if out is not None else adata


def build_index(data: Any, model: Any, label_column: str, out: str | os.PathLike, *, overwrite: bool = False,
                **options) -> Path:
    """Embed a labelled reference and write a FAISS index folder at ``out`` (see :mod:`scmm.index`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    model, inp, _ = _start(data, model, None, overwrite, options)
    columns, values = _obs_column(inp.source, label_column)
    if values is None:
        raise ScmmError(f"label column '{label_column}' is not in obs (columns: "
                        f"{', '.join(map(str, columns)) or 'none'})")
    codes, classes = reference_labels(values, label_column)
    if not (codes >= 0).any():
        raise ScmmError(f"no reference cell has a label in column '{label_column}'")
    emb, empty = _embed(inp)
    codes = np.where(empty, -1, codes)  # a cell with no expressed gene says nothing about its label
    return write_index(out, emb, codes, classes, model.fingerprint, label_column, overwrite,
                       extra={"reference": str(inp.source.path)})


def query_index(index: Any, data: Any, model: Any, *, k: int = INDEX_K, unknown_threshold: float | None = None,
                out: str | os.PathLike | None = None, overwrite: bool = False, **options):
    """A copy of ``data`` labelled by k-NN vote against a reference index (a folder or a ReferenceIndex)."""
    if k < 1:
        raise ScmmError("--k must be at least 1")
    _check_threshold(unknown_threshold, 0.0, 1.0, "a vote share")
    ref = index if isinstance(index, ReferenceIndex) else ReferenceIndex.load(index)
    model = load_model(model)
    ref.check_model(model.fingerprint)
    model, inp, out = _start(data, model, out, overwrite, options)
    return _cells(data, inp, out, lambda _, emb: _query(ref, emb, k, unknown_threshold))
