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
expression matrix never loaded; returns the path) with ``overwrite``, and the :class:`Options` (``batch_size``,
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
    :mod:`scmm.eval.calibration`). A cell whose confidence is below the threshold is "unknown": by default the
    threshold ``scmm eval`` chose so that 5 % of val cells abstain; ``unknown_rate`` picks another rate,
    ``unknown_threshold`` sets it (a confidence in [0, 1]). When the top candidates are within the back-off
    margin of each other, the answer is their lowest informative common ancestor in the Cell Ontology, and
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
* ``obs['scmm_description']``: the stage-2 model's text for each cell.
* ``generate``: ``X`` float32 ``[n, G]`` of log1p-CP10k expression over the model's HVG panel (``var`` index: gene
  symbols, ``var['vocab_id']``), ``obs['prompt']``, ``uns['scmm_generate']`` (seed, noise, normalisation).

Precision: the cell path (cell tower, Q-Former, heads) runs in bf16 weights with ``bf16``, in fp32 with ``fp32``, and
with ``auto`` (the default) in bf16 wherever the hardware multiplies bf16 natively: a CUDA GPU that supports it, a
CPU with AVX512-BF16 or AMX (cosine similarity to the fp32 embeddings above 0.999; BENCHMARKS.md, "Cell tower").
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scmm.atomic import temp_file_beside
from scmm.data_pipeline.ontology import get_ontology
from scmm.data_pipeline.reader import DEFAULT_MIN_COVERAGE, detect_scale, iter_batches, open_input, plan_genes
from scmm.data_pipeline.scale import check_scale_option
from scmm.errors import ScmmError
from scmm.eval import knn
from scmm.eval.annotate import Candidates, label_prototypes, read_labels_option
from scmm.eval.calibration import Calibration, calibrated_answers, check_unknown_options, softmax
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
DESCRIPTION = "scmm_description"
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

    def batches(self):
        return iter_batches(self.source, self.plan, self.scale, self.model.encoding, self.model.vocab,
                            self.opts.chunk_size, self.opts.batch_size)

    def progress(self, desc: str):
        return tqdm(total=self.n_obs, unit="cells", desc=desc, disable=None if self.opts.progress else True,
                    smoothing=0.1)


def _embed(inp: _Input) -> tuple[np.ndarray, np.ndarray]:
    """The cells' embeddings, and which cells express none of the model's genes (their input is ``<cls>`` alone)."""
    dev = inp.opts.torch_device
    aligner = inp.model.aligner.to(dev).eval()
    dtype = inp.opts.dtype(dev)
    cell_path = aligner.cell_features if dtype == torch.float32 else aligner.cell_embedder(dtype)
    out = np.zeros((inp.n_obs, aligner.heads.cell_proj.out_features), dtype=np.float32)
    empty = np.zeros(inp.n_obs, dtype=bool)
    t0 = time.perf_counter()
    with inp.progress("embed") as bar, torch.inference_mode():
        for rows, batch in inp.batches():
            out[rows] = cell_path(**{k: v.to(dev) for k, v in batch.items()}).float().cpu().numpy()
            empty[rows] = (~batch["padding_mask"]).sum(1).numpy() <= 1
            bar.update(len(rows))
    dt = time.perf_counter() - t0
    log.info("embedded %d cells in %.1f s (%.1f cells/s, %s weights)", inp.n_obs, dt, inp.n_obs / max(dt, 1e-9),
             str(dtype).removeprefix("torch."))
    if empty.any():
        log.warning("%d of %d cells express none of the model's genes: flagged in obs['%s'] as '%s'",
                    int(empty.sum()), inp.n_obs, QC, QC_EMPTY)
    return out, empty


def _qc(obs: pd.DataFrame | None, empty: np.ndarray) -> pd.DataFrame:
    """``obs`` (or a new frame) with the QC column; cells with no expressed gene are called unknown (confidence 0)."""
    if obs is None:
        obs = pd.DataFrame(index=pd.RangeIndex(len(empty)))
    elif CELL_TYPE in obs:
        cell_type, cell_id = (obs[c].astype(str).to_numpy(dtype=object) for c in (CELL_TYPE, CELL_TYPE_ID))
        conf = obs[CONFIDENCE].to_numpy(copy=True)
        level = obs[LEVEL].to_numpy(copy=True) if LEVEL in obs else None
        cell_type[empty], cell_id[empty], conf[empty] = UNKNOWN, UNKNOWN, 0.0
        if level is not None:
            level[empty] = 0
        obs = _label_frame(cell_type, cell_id, conf, level)
    obs[QC] = pd.Categorical(np.where(empty, QC_EMPTY, "ok"), categories=["ok", QC_EMPTY])
    return obs


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
    cannot, as the stored val confidences belong to the training candidates)."""
    check_unknown_options(unknown_rate, unknown_threshold)
    stored = Calibration.from_metrics(model.metrics)
    if stored is None:
        scale = float(model.aligner.heads.get_logit_scale().detach().float().cpu())
        stored = Calibration(temperature=1.0 / scale)
    elif user_labels:
        stored = Calibration(temperature=stored.temperature)
    if user_labels and unknown_rate is not None:
        raise ScmmError("--unknown-rate applies to the model's own candidate labels (the val confidences it stores "
                        "belong to them); with --labels pass --unknown-threshold")
    return stored.with_options(unknown_rate, unknown_threshold)


def annotate_embeddings(emb: np.ndarray, model: ScmmModel, candidates: Candidates,
                        calibration: Calibration | None = None, smooth: bool = False,
                        k: int = SMOOTH_K) -> pd.DataFrame:
    """The annotation columns for embeddings ``emb`` (see the module docstring); ``calibration`` default
    :func:`model_calibration` for the model's own candidates."""
    calibration = calibration or model_calibration(model, user_labels=False)
    with torch.inference_mode():
        protos = label_prototypes(model.aligner, candidates)
    sim = emb @ protos.T  # cosine similarities [N, C]
    prob = softmax(sim, calibration.temperature)
    if smooth and len(emb) > 1:
        nb = _neighbours(emb, k)
        valid = nb >= 0
        w = valid / valid.sum(1, keepdims=True)
        prob = np.einsum("nk,nkc->nc", w, prob[np.maximum(nb, 0)])
    answers = calibrated_answers(sim, candidates.keys, candidates.names, candidates.cl_ids, calibration,
                                 get_ontology(), prob=prob)
    return _label_frame(answers.names, answers.cl_ids, answers.confidence, answers.level)


def _check_threshold(value: float | None, low: float, high: float, what: str) -> None:
    if value is not None and not low <= value <= high:  # NaN fails both comparisons
        raise ScmmError(f"--unknown-threshold must be {what} in [{low:g}, {high:g}], got {value}")


def _label_frame(cell_type: np.ndarray, cell_id: np.ndarray, conf: np.ndarray,
                 level: np.ndarray | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({CELL_TYPE: pd.Categorical(cell_type.astype(str)),
                          CELL_TYPE_ID: pd.Categorical(cell_id.astype(str)),
                          CONFIDENCE: np.asarray(conf, dtype=np.float32)})
    if level is not None:
        frame[LEVEL] = np.asarray(level, dtype=np.int16)
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
def _describe(inp: _Input, constrained: bool, num_beams: int) -> list[str]:
    dev = inp.opts.torch_device
    stage2 = inp.model.stage2.to(dev)
    out: list[str] = [""] * inp.n_obs
    with inp.progress("describe") as bar, torch.inference_mode():
        for rows, batch in inp.batches():
            texts = stage2.describe_cells({k: v.to(dev) for k, v in batch.items()}, task="describe",
                                          constrained=constrained, num_beams=num_beams)
            if len(texts) != len(rows):
                raise ScmmError(f"the stage-2 model returned {len(texts)} descriptions for {len(rows)} cells")
            for r, t in zip(rows, texts):
                out[int(r)] = str(t)
            bar.update(len(rows))
    return out


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


def _write_copy(src: Path, out: Path, obs: pd.DataFrame | None, obsm: dict[str, np.ndarray]) -> Path:
    """``out`` = a byte copy of the file ``src`` with obs columns added and obsm arrays written (obs is read and
    written back; the expression matrices are never loaded), renamed into place when complete."""
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
        return _publish_file(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_adata(adata: ad.AnnData, out: Path) -> Path:
    tmp = temp_file_beside(out, suffix=".h5ad")
    try:
        adata.write_h5ad(tmp)
        return _publish_file(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _result(data: Any, obs: pd.DataFrame | None, obsm: dict[str, np.ndarray], out: Path | None):
    """A copy of the input with the new fields: an AnnData, or, with ``out``, that file (returns its path)."""
    if out is not None and isinstance(data, (str, Path)):
        return _write_copy(Path(data), out, obs, obsm)
    if isinstance(data, (str, Path)):
        adata = ad.read_h5ad(data)
    elif getattr(data, "isbacked", False):
        adata = data.to_memory()
    else:
        adata = data.copy()
    for col in (obs.columns if obs is not None else []):
        adata.obs[col] = obs[col].values
    for key, value in obsm.items():
        adata.obsm[key] = value
    return _write_adata(adata, out) if out is not None else adata


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


# --- public functions -------------------------------------------------------------------------------
def embed(data: Any, model: Any, *, out: str | os.PathLike | None = None, overwrite: bool = False, **options):
    """A copy of ``data`` with ``obsm['X_scmm']`` (the aligned cell embedding)."""
    model, inp, out = _start(data, model, out, overwrite, options)
    emb, empty = _embed(inp)
    return _result(data, _qc(None, empty), {EMBEDDING_KEY: emb}, out)


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
    emb, empty = _embed(inp)
    obs = annotate_embeddings(emb, model, candidates, calibration, smooth, k)
    return _result(data, _qc(obs, empty), {EMBEDDING_KEY: emb}, out)


def describe(data: Any, model: Any, *, constrained: bool = False, num_beams: int = 1,
             out: str | os.PathLike | None = None, overwrite: bool = False, **options):
    """A copy of ``data`` with ``obs['scmm_description']`` from the model's stage 2."""
    model = load_model(model)
    model.stage2  # noqa: B018 - fail early when there is no stage 2
    model, inp, out = _start(data, model, out, overwrite, options)
    texts = _describe(inp, constrained, num_beams)
    return _result(data, pd.DataFrame({DESCRIPTION: texts}), {}, out)


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
    obs = inp.source.obs
    if label_column not in obs.columns:
        raise ScmmError(f"label column '{label_column}' is not in obs (columns: "
                        f"{', '.join(map(str, obs.columns)) or 'none'})")
    codes, classes = reference_labels(obs[label_column].to_numpy(), label_column)
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
    emb, empty = _embed(inp)
    return _result(data, _qc(_query(ref, emb, k, unknown_threshold), empty), {EMBEDDING_KEY: emb}, out)
