"""How inference reads its input and runs the model over it, one chunk of rows at a time: the options
(:class:`Options`), the prepared input (gene plan and value scale checked and logged), the cell path's embeddings
and the stage-2 descriptions per chunk, and the rows of a run filled into a sink (:mod:`scmm.h5ad_writer`, or a
rank's part file, :mod:`scmm.ranks`), labelled chunk by chunk (:mod:`scmm.annotation`).

Precision: the cell path (cell tower, Q-Former, heads) runs in bf16 weights with ``bf16``, in fp32 with ``fp32``,
and with ``auto`` (the default) in bf16 wherever the hardware multiplies bf16 natively: a CUDA GPU that supports
it, a CPU with AVX512-BF16 or AMX (cosine similarity to the fp32 embeddings above 0.999; BENCHMARKS.md, "Cell
tower").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scmm.annotation import Labeller, label_frame, qc_labels
from scmm.cell_facts import CellFacts, measure
from scmm.data_pipeline import reader
from scmm.data_pipeline.scale import check_scale_option
from scmm.errors import ScmmError
from scmm.h5ad_writer import ObsColumns
from scmm.model.folders import ScmmModel
from scmm.output_names import LLM_COLUMNS, NOVELTY, QC, QC_EMPTY, UNS_KEY

log = logging.getLogger("scmm")

__all__ = ["Options", "options_of", "PreparedInput", "embed_chunks", "embed_all", "describe_chunks", "fill_rows",
           "labels_at_end", "with_qc", "can_measure_facts", "measured_facts"]


@dataclass
class Options:
    """How inference runs and reads its input: the keyword-only parameters every :mod:`scmm.api` function that reads
    cells shares (documented there), checked here."""

    batch_size: int = 64  # cells per forward pass
    chunk_size: int = 10_000  # rows read at a time: the memory bound
    device: str = "cpu"  # cpu or cuda
    precision: str = "auto"  # auto (bf16 where native), fp32 or bf16: the cell path's weights
    layer: str | None = None  # X, raw or a layer name (default: raw counts first)
    gene_column: str | None = None  # var column of gene symbols (default feature_name, else the var names)
    min_gene_coverage: float = reader.DEFAULT_MIN_COVERAGE
    input_scale: str = "auto"  # auto (detected from the values) or counts, normalized, log1p, log2p1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ScmmError("--chunk-size and --batch-size must be positive")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ScmmError(f"precision must be auto, fp32 or bf16, not '{self.precision}'")
        self.input_scale = check_scale_option(self.input_scale)

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


def options_of(arguments: dict[str, Any]) -> Options:
    """The :class:`Options` among a public function's arguments (its ``locals()``): one list of fields, checked once."""
    return Options(**{f.name: arguments[f.name] for f in fields(Options)})


class PreparedInput:
    """One prepared input: chunked source, gene plan and value scale (coverage and scale checked and logged)."""

    def __init__(self, data: Any, model: ScmmModel, opts: Options):
        self.source = reader.open_input(data, opts.layer)
        where = str(self.source.path)
        self.plan = reader.plan_genes(self.source.var, model.vocab, model.panel_vocab_ids, opts.gene_column,
                                      opts.min_gene_coverage, where=where)
        self.scale = reader.detect_scale(self.source, opts.input_scale)
        self.model, self.opts = model, opts
        log.info("%s: %d cells, element %s, %s", where, self.source.n_obs, self.source.element, self.scale.describe())

    @property
    def n_obs(self) -> int:
        return self.source.n_obs

    def batches(self, begin: int = 0, end: int | None = None):
        return reader.iter_batches(self.source, self.plan, self.scale, self.model.encoding, self.model.vocab,
                                   self.opts.chunk_size, self.opts.batch_size, begin, end)

    def progress(self, desc: str, total: int | None = None):
        return tqdm(total=self.n_obs if total is None else total, unit="cells", desc=desc,
                    disable=None if self.opts.progress else True, smoothing=0.1)


def bound_heap_growth() -> None:
    """Have glibc's malloc return freed blocks of 128 KiB and more to the system at once (``mallopt``
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; a no-op elsewhere). The cell tower runs every group of cells of
    similar length at its own shape, so the bf16 kernels allocate buffers of ever new sizes; with glibc's default
    dynamic thresholds the freed ones stay in the heap, fragmented, and the peak RSS grew with the number of cells
    (about 1 KB per cell; BENCHMARKS.md, "Inference memory: what grew with the cells"). Process-wide and
    idempotent: what an inference process wants; the cost is an mmap per large allocation."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 128 * 1024)
    mallopt(m_trim_threshold, 128 * 1024)


def embed_chunks(inp: PreparedInput, begin: int = 0, end: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, embeddings, which cells express none of the model's genes) per chunk of the input's rows
    ``begin:end``: only one chunk is held (a cell with no expressed gene has ``<cls>`` alone as its input)."""
    end = inp.n_obs if end is None else end
    bound_heap_growth()
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


def embed_all(inp: PreparedInput) -> tuple[np.ndarray, np.ndarray]:
    """All the cells' embeddings, and which cells express none of the model's genes (held in memory)."""
    dim = inp.model.aligner.heads.cell_proj.out_features
    out = np.zeros((inp.n_obs, dim), dtype=np.float32)
    empty = np.zeros(inp.n_obs, dtype=bool)
    for start, emb, emp in embed_chunks(inp):
        out[start:start + len(emb)], empty[start:start + len(emb)] = emb, emp
    return out, empty


def describe_chunks(inp: PreparedInput, constrained: bool, num_beams: int,
                     answerer: Callable[[dict], tuple] | None = None
                     ) -> Iterator[tuple[int, np.ndarray, pd.DataFrame | None]]:
    """(first row, descriptions, the LLM's cell-type columns or None) per chunk of the input: only one chunk's
    texts are held. ``answerer``: batch -> (names, CL IDs, confidences, levels) of the LLM's scored answers."""
    bound_heap_growth()
    dev = inp.opts.torch_device
    stage2 = inp.model.stage2.to(dev)
    size = inp.opts.chunk_size
    chunk = None  # (start, descriptions, [names, CL IDs, confidences, levels] or None)

    def done(c):
        return c[0], c[1], None if c[2] is None else \
            label_frame(c[2][0], c[2][1], c[2][2], c[2][3]).rename(columns=LLM_COLUMNS)

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


def can_measure_facts(model: ScmmModel) -> bool:
    """Whether the model keeps how its training corpus computed per-cell facts (``facts.json``, over its gene
    panel); logs why not."""
    facts, panel = model.facts, model.panel_vocab_ids
    if facts is None or panel is None:
        log.info("model %s keeps no per-cell fact reference (facts.json; its corpus was built without facts): "
                 "descriptions are written without the cells' measured programs and markers", model.folder)
        return False
    if len(panel) != len(facts.symbols):
        log.warning("model %s: facts.json covers %d genes, its gene panel %d: the cells' programs and markers are "
                    "not measured", model.folder, len(facts.symbols), len(panel))
        return False
    return True


def measured_facts(inp: PreparedInput, start: int, end: int) -> CellFacts:
    """The measured programs and markers of the input's rows ``start:end`` (:mod:`scmm.cell_facts`; one read)."""
    assert inp.model.facts is not None and inp.model.panel_vocab_ids is not None
    blocks = reader.iter_panel_chunks(inp.source, inp.plan, inp.scale, inp.model.panel_vocab_ids, end - start, start,
                                      end)
    (_, panel), = blocks
    return measure(inp.model.facts, panel)


def fill_rows(inp: PreparedInput, sink: Any, begin: int, end: int, labeller: Labeller | None
          ) -> tuple[ObsColumns, np.ndarray]:
    """Rows ``begin:end`` embedded into ``sink`` (rows counted from ``begin``), labelled chunk by chunk."""
    cols, empty = ObsColumns(end - begin), np.zeros(end - begin, dtype=bool)
    for start, emb, emp in embed_chunks(inp, begin, end):
        sink.put(start - begin, emb)
        empty[start - begin:start - begin + len(emb)] = emp
        if labeller is not None:
            cols.put(start - begin, qc_labels(labeller(start, emb), emp))
    return cols, empty


def labels_at_end(sink: Any, cols: ObsColumns, empty: np.ndarray,
                   labeller: Labeller | None, whole: bool) -> pd.DataFrame:
    if labeller is not None and whole:
        frame = with_qc(qc_labels(labeller(0, sink.embeddings()), empty), empty)
    else:
        frame = with_qc(cols.frame() if labeller is not None else None, empty)
    summarise = getattr(labeller, "novelty_summary", None)  # the global novelty rule, once over every cell
    if summarise is not None and NOVELTY in frame:
        summary = summarise(frame[NOVELTY].to_numpy(), empty)
        if summary is not None:
            frame.attrs[UNS_KEY] = {"novelty_summary": summary}
    return frame


def with_qc(obs: pd.DataFrame | None, empty: np.ndarray) -> pd.DataFrame:
    """``obs`` (or a new frame) with the QC column (cells with no expressed gene are flagged)."""
    obs = pd.DataFrame(index=pd.RangeIndex(len(empty))) if obs is None else obs
    obs[QC] = pd.Categorical(np.where(empty, QC_EMPTY, "ok"), categories=["ok", QC_EMPTY])
    return obs
