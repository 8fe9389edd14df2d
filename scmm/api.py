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
model (:func:`load_model`) or a folder. Every option is a keyword-only parameter, typed and documented in each
function's signature: ``out`` (write the result to this ``.h5ad`` instead of returning it: a copy of the input file
plus the new fields, written atomically, the expression matrix never loaded; the embeddings, labels and
descriptions written chunk by chunk, so memory is bounded by ``chunk_size``, not by the input; returns the path)
with ``overwrite``, and how the cells are read and run (``batch_size``, ``chunk_size``, ``device``, ``precision``,
``layer``, ``gene_column``, ``min_gene_coverage``, ``input_scale``, ``progress``).

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
one output, equal to a single process's (:mod:`scmm.ranks`).

The work is done by modules named for what they hold: :mod:`scmm.inference` (options, the prepared input, the
model run chunk by chunk; precision), :mod:`scmm.annotation` (the annotation policy), :mod:`scmm.h5ad_writer`
(AnnData on disk), :mod:`scmm.ranks` (torchrun), :mod:`scmm.output_names` (the names above).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from scmm.annotation import (
    SMOOTH_K,
    Labeller,
    annotate_embeddings,
    annotator,
    candidates_of,
    check_threshold,
    llm_answerer,
    model_calibration,
    vote_labels,
)
from scmm.data_pipeline.reader import DEFAULT_MIN_COVERAGE
from scmm.errors import ScmmError
from scmm.eval.calibration import check_unknown_options
from scmm.h5ad_writer import ObsColumns, PseudocellWriter, Sink, check_output
from scmm.index import ReferenceIndex, reference_labels, write_index
from scmm.inference import (
    Options,
    PreparedInput,
    can_measure_facts,
    describe_chunks,
    embed_all,
    fill_rows,
    labels_at_end,
    measured_facts,
    options_of,
)
from scmm.model.folders import ScmmModel, load_model
from scmm.output_names import (
    CELL_TYPE,
    CELL_TYPE_ID,
    CLAIMS_SUPPORTED,
    CONFIDENCE,
    DESCRIPTION,
    EMBEDDING_KEY,
    LEVEL,
    LLM_COLUMNS,
    MARKERS,
    NOVELTY,
    PROGRAMS,
    QC,
    UNKNOWN,
)
from scmm.ranks import cells_on_ranks, world_size

log = logging.getLogger("scmm")

__all__ = ["load_model", "embed", "annotate", "describe", "generate", "build_index", "query_index",
           "annotate_embeddings", "model_calibration", "Options", "ScmmModel", "EMBEDDING_KEY", "CELL_TYPE",
           "CELL_TYPE_ID", "CONFIDENCE", "LEVEL", "NOVELTY", "DESCRIPTION", "LLM_COLUMNS", "QC", "UNKNOWN",
           "MAX_PSEUDOCELLS"]

INDEX_K = 15
MAX_PSEUDOCELLS = 1_000_000
GENERATE_CHUNK = 8192  # pseudo-cells drawn and written at a time: the memory bound of generate(out=...)

Data = Any  # an AnnData (in memory or backed) or an .h5ad path
Model = Any  # a ScmmModel (load_model) or a model folder
PathLike = str | os.PathLike
Precision = Literal["auto", "fp32", "bf16"]
InputScale = Literal["auto", "counts", "normalized", "log1p", "log2p1"]

_DOCS = {
    "data": """data
    The cells: an AnnData in memory, a backed AnnData, or an ``.h5ad`` path (read chunk by chunk; never
    modified).""",
    "model": """model
    An opened model (:func:`load_model`), or a folder: a package (``scmm package``), a stage-2 or a stage-1
    model folder.""",
    "out": """out
    Write the result to this ``.h5ad`` (atomically; a copy of the input file plus the new fields, its expression
    matrix never loaded) and return its path, instead of returning an AnnData.
overwrite
    Replace an existing ``out``.""",
    "options": """batch_size
    Cells per forward pass.
chunk_size
    Rows read, run and written at a time: with ``out``, the memory bound (not the size of the input).
device
    ``"cpu"`` or ``"cuda"`` (``"cuda:N"``; under torchrun each rank takes its ``LOCAL_RANK``'s GPU).
precision
    The cell path's weights: ``"fp32"``, ``"bf16"``, or ``"auto"`` (bf16 where the CPU or GPU multiplies bf16
    natively; :mod:`scmm.inference`).
layer
    The expression to read: ``"X"``, ``"raw"`` or a layer name (default: raw counts first: ``layers['counts']``,
    ``raw.X``, then ``X``).
gene_column
    The var column of gene symbols (default ``feature_name``, else the var names; Ensembl IDs are mapped).
min_gene_coverage
    Refuse the input when a smaller share of its genes maps to the model's gene vocabulary.
input_scale
    What the values are: ``"counts"``, ``"normalized"`` (CP10k, CPM, TPM, ...), ``"log1p"``, ``"log2p1"``, or
    ``"auto"`` (detected from a sample of the cells and logged with its evidence; ambiguous input is an error).
progress
    Show a progress bar.""",
}


def _doc(function: Callable) -> Callable:
    """Fill the shared parameter sections (``{data}``, ``{model}``, ``{out}``, ``{options}``) of a docstring."""
    function.__doc__ = function.__doc__.format(**{k: v.replace("\n", "\n    ") for k, v in _DOCS.items()})
    return function


def _start(data: Data, model: Model, out: PathLike | None, overwrite: bool, opts: Options
           ) -> tuple[ScmmModel, PreparedInput, Path | None]:
    """Check the output, open the model and prepare the input, before any work."""
    out = Path(out) if out is not None else None
    if isinstance(data, (str, Path)) and not Path(data).is_file():
        kind = "is a folder, not an .h5ad file" if Path(data).is_dir() else "not found"
        raise ScmmError(f"input file {kind}: {data}")
    if out is not None:
        check_output(Path(data) if isinstance(data, (str, Path)) else None, out, overwrite)
    model = load_model(model)
    return model, PreparedInput(data, model, opts), out


def _cells(data: Data, inp: PreparedInput, out: Path | None, labeller: Labeller | None = None,
           whole: bool = False):
    """Embed every cell and (with ``labeller``: embeddings -> label columns) label it, chunk by chunk into a
    :class:`~scmm.h5ad_writer.Sink`: held per cell are 1 byte (the QC flag) and the compact label columns
    (:class:`~scmm.h5ad_writer.ObsColumns`); ``whole``: the labeller needs all the embeddings at once (neighbour
    smoothing), read back at the end. Under torchrun (WORLD_SIZE > 1, an ``.h5ad`` path in, ``out`` given) the
    ranks split the cells (:func:`scmm.ranks.cells_on_ranks`)."""
    dim = inp.model.aligner.heads.cell_proj.out_features
    if world_size() > 1 and out is not None and isinstance(data, (str, Path)):
        return cells_on_ranks(data, inp, out, dim, labeller, whole)
    with Sink(data, out, inp.n_obs, dim) as sink:
        cols, empty = fill_rows(inp, sink, 0, inp.n_obs, None if whole else labeller)
        return sink.finish(labels_at_end(sink, cols, empty, labeller, whole))


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
@_doc
def embed(data: Data, model: Model, *, out: PathLike | None = None, overwrite: bool = False,
          batch_size: int = 64, chunk_size: int = 10_000, device: str = "cpu", precision: Precision = "auto",
          layer: str | None = None, gene_column: str | None = None,
          min_gene_coverage: float = DEFAULT_MIN_COVERAGE, input_scale: InputScale = "auto",
          progress: bool = False) -> ad.AnnData | Path:
    """The aligned cell embedding of every cell.

    Parameters
    ----------
    {data}
    {model}
    {out}
    {options}

    Returns
    -------
    A copy of ``data`` with ``obsm['X_scmm']`` and ``obs['scmm_qc']``, or the path ``out``.
    """
    model, inp, out = _start(data, model, out, overwrite, options_of(locals()))
    return _cells(data, inp, out)


@_doc
def annotate(data: Data, model: Model, *, labels: str | Sequence[str] | None = None,
             unknown_threshold: float | None = None, unknown_rate: float | None = None, smooth: bool = False,
             k: int = SMOOTH_K, out: PathLike | None = None, overwrite: bool = False,
             batch_size: int = 64, chunk_size: int = 10_000, device: str = "cpu", precision: Precision = "auto",
             layer: str | None = None, gene_column: str | None = None,
             min_gene_coverage: float = DEFAULT_MIN_COVERAGE, input_scale: InputScale = "auto",
             progress: bool = False) -> ad.AnnData | Path:
    """Zero-shot cell types by text, calibrated, backed off to a Cell Ontology ancestor or "unknown" (the module
    docstring; :mod:`scmm.annotation`).

    Parameters
    ----------
    {data}
    {model}
    labels
        Candidate labels (CL IDs or free text): a list, a comma-separated string or a file with one per line;
        default the training corpus's cell types stored with the model.
    unknown_threshold
        A calibrated confidence in [0, 1] below which a cell is "unknown"; replaces the stored threshold and
        turns the novelty check off.
    unknown_rate
        The share of val cells allowed to abstain, in [0, 1): sets the thresholds from the val quantiles the
        package stores (:func:`model_calibration`).
    smooth
        Average each cell's probabilities over its ``k`` nearest neighbours in the input's own embedding space
        before the choice (needs every embedding at once).
    k
        Neighbours for ``smooth``.
    {out}
    {options}

    Returns
    -------
    A copy of ``data`` with the annotation obs columns, ``obs['scmm_qc']`` and ``obsm['X_scmm']``, or the path
    ``out``.
    """
    if smooth and k < 1:
        raise ScmmError("--k must be at least 1")
    check_unknown_options(unknown_rate, unknown_threshold)
    model, inp, out = _start(data, model, out, overwrite, options_of(locals()))
    candidates = candidates_of(model, labels)  # bad labels fail before the work
    calibration = model_calibration(model, labels is not None, unknown_rate, unknown_threshold)
    return _cells(data, inp, out, annotator(model, candidates, calibration, smooth, k, inp), whole=smooth)


@_doc
def describe(data: Data, model: Model, *, constrained: bool = False, num_beams: int = 1, cell_type: bool = False,
             out: PathLike | None = None, overwrite: bool = False,
             batch_size: int = 64, chunk_size: int = 10_000, device: str = "cpu", precision: Precision = "auto",
             layer: str | None = None, gene_column: str | None = None,
             min_gene_coverage: float = DEFAULT_MIN_COVERAGE, input_scale: InputScale = "auto",
             progress: bool = False) -> ad.AnnData | Path:
    """A text description of every cell from the model's stage 2.

    Parameters
    ----------
    {data}
    {model}
    constrained
        Constrain the cell-type words of the descriptions to known labels.
    num_beams
        Beams of the beam search (1: greedy).
    cell_type
        Also the LLM's cell-type answer, scored over the model's candidate labels, calibrated and backed off like
        the annotation's (``obs['scmm_llm_cell_type']``, ``..._ontology_term_id``, ``scmm_llm_confidence``,
        ``scmm_llm_cell_type_level``; :func:`scmm.annotation.llm_answerer`).
    {out}
    {options}

    Returns
    -------
    A copy of ``data`` with ``obs['scmm_description']`` (and the LLM's columns), or the path ``out``. With a model
    whose corpus had per-cell facts, also each cell's measured programs and markers and the share of its
    description's claims they support (``obs['scmm_programs']``, ``obs['scmm_markers']``,
    ``obs['scmm_claims_supported']``; :mod:`scmm.cell_facts`).
    """
    opts = options_of(locals())
    model = load_model(model)
    model.stage2  # noqa: B018 - fail early when there is no stage 2
    model, inp, out = _start(data, model, out, overwrite, opts)
    answerer = llm_answerer(model) if cell_type else None
    checking = can_measure_facts(model)
    cols, claims = ObsColumns(inp.n_obs), []
    with Sink(data, out, inp.n_obs, None) as sink:
        column = sink.text_column(DESCRIPTION)
        fact_columns = {name: sink.text_column(name) for name in (PROGRAMS, MARKERS)} if checking else {}
        for start, texts, frame in describe_chunks(inp, constrained, num_beams, answerer):
            column[start:start + len(texts)] = texts
            if checking:
                checked = measured_facts(inp, start, start + len(texts)).columns(texts)
                for name, values in fact_columns.items():
                    values[start:start + len(texts)] = checked[name]
                frame = (pd.DataFrame(index=pd.RangeIndex(len(texts))) if frame is None else frame).assign(
                    **{CLAIMS_SUPPORTED: checked[CLAIMS_SUPPORTED]})
                claims.append(checked[CLAIMS_SUPPORTED])
            if frame is not None:
                cols.put(start, frame)
        if checking:
            _log_claims(np.concatenate(claims) if claims else np.zeros(0, dtype=np.float32))
        return sink.finish(cols.frame() if answerer is not None or checking else None)


def _log_claims(supported: np.ndarray) -> None:
    made = supported[~np.isnan(supported)]
    log.info("%d of %d descriptions claim programs or marker genes; %.1f%% of their claims hold for the cells' "
             "measured facts (obs['%s'])", len(made), len(supported), 100 * float(made.mean()) if len(made) else 0.0,
             CLAIMS_SUPPORTED)


def generate(model: Model, text: str | Sequence[str], *, n: int, seed: int = 0, noise: float = 1.0,
             out: PathLike | None = None, overwrite: bool = False) -> ad.AnnData | Path:
    """Pseudo-cells from text with the model's stage 2: log1p-CP10k expression over its HVG panel.

    Parameters
    ----------
    model
        A stage-2 model folder, a package with a stage-2 part, or an opened one (:func:`load_model`).
    text
        One description, or several (``n`` pseudo-cells each, text-major rows).
    n
        Pseudo-cells per text, 1 to 1,000,000.
    seed
        Seed of the sampling noise: the same model, texts, ``n`` and seed give the same cells, written in
        chunks or not.
    noise
        Scale of the sampling noise (0: the expected profiles).
    out
        Write the pseudo-cells to this ``.h5ad``, chunk by chunk (memory set by the chunk, not by ``n``), and
        return its path, instead of returning an AnnData.
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    An AnnData: ``X`` float32 ``[len(texts) * n, G]``, ``obs['prompt']``, ``obs['pseudocell']``, ``var`` the HVG
    symbols with ``var['vocab_id']``, ``uns['scmm_generate']``; or the path ``out``.
    """
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
    symbols = [str(s) for s in stage2.hvg["symbols"]]
    var = pd.DataFrame({"feature_name": symbols, "vocab_id": np.asarray(stage2.hvg["vocab_ids"], dtype=np.int64)},
                       index=pd.Index(symbols, name="gene").astype(str))
    uns = {"scmm_generate": {"model": str(model.folder), "seed": int(seed), "n_per_text": int(n),
                             "noise": float(noise), "normalization": "log1p_cp10k",
                             "genes": "highly variable genes of the training corpus"}}
    total = len(texts) * n
    if out is not None:
        with PseudocellWriter(out, texts, n, var, uns) as writer:
            for start in range(0, total, GENERATE_CHUNK):
                stop = min(start + GENERATE_CHUNK, total)
                writer.put(start, stage2.generate_pseudocells(texts, n, seed=seed, noise=noise, rows=(start, stop)))
            return writer.finish()
    x = stage2.generate_pseudocells(texts, n, seed=seed, noise=noise)
    obs = pd.DataFrame({"prompt": [t for t in texts for _ in range(n)],
                        "pseudocell": np.tile(np.arange(n), len(texts))},
                       index=[f"pseudocell_{i}" for i in range(total)])
    return ad.AnnData(X=x.astype(np.float32), obs=obs, var=var, uns=uns)


@_doc
def build_index(data: Data, model: Model, label_column: str, out: PathLike, *, overwrite: bool = False,
                batch_size: int = 64, chunk_size: int = 10_000, device: str = "cpu", precision: Precision = "auto",
                layer: str | None = None, gene_column: str | None = None,
                min_gene_coverage: float = DEFAULT_MIN_COVERAGE, input_scale: InputScale = "auto",
                progress: bool = False) -> Path:
    """Embed a labelled reference and write a FAISS index folder (:mod:`scmm.index`) for :func:`query_index`.

    Parameters
    ----------
    {data}
    {model}
    label_column
        The obs column of the reference labels (CL IDs or free text); unlabelled cells and cells with no
        expressed model gene are left out.
    out
        The index folder to write (atomically).
    overwrite
        Replace an existing index folder.
    {options}

    Returns
    -------
    The path ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists (pass --overwrite to replace it)")
    model, inp, _ = _start(data, model, None, overwrite, options_of(locals()))
    columns, values = _obs_column(inp.source, label_column)
    if values is None:
        raise ScmmError(f"label column '{label_column}' is not in obs (columns: "
                        f"{', '.join(map(str, columns)) or 'none'})")
    codes, classes = reference_labels(values, label_column)
    if not (codes >= 0).any():
        raise ScmmError(f"no reference cell has a label in column '{label_column}'")
    emb, empty = embed_all(inp)
    codes = np.where(empty, -1, codes)  # a cell with no expressed gene says nothing about its label
    return write_index(out, emb, codes, classes, model.fingerprint, label_column, overwrite,
                       extra={"reference": str(inp.source.path)})


@_doc
def query_index(index: ReferenceIndex | PathLike, data: Data, model: Model, *, k: int = INDEX_K,
                unknown_threshold: float | None = None, out: PathLike | None = None, overwrite: bool = False,
                batch_size: int = 64, chunk_size: int = 10_000, device: str = "cpu", precision: Precision = "auto",
                layer: str | None = None, gene_column: str | None = None,
                min_gene_coverage: float = DEFAULT_MIN_COVERAGE, input_scale: InputScale = "auto",
                progress: bool = False) -> ad.AnnData | Path:
    """Label cells by the k-NN vote of a reference index's cells (:func:`build_index`).

    Parameters
    ----------
    index
        An index folder or an opened :class:`~scmm.index.ReferenceIndex`, built with the same model.
    {data}
    {model}
    k
        Reference cells that vote.
    unknown_threshold
        The vote share in [0, 1] below which a cell is "unknown".
    {out}
    {options}

    Returns
    -------
    A copy of ``data`` with the label columns (the confidence is the winner's vote share), ``obs['scmm_qc']``
    and ``obsm['X_scmm']``, or the path ``out``.
    """
    if k < 1:
        raise ScmmError("--k must be at least 1")
    check_threshold(unknown_threshold, 0.0, 1.0, "a vote share")
    opts = options_of(locals())
    ref = index if isinstance(index, ReferenceIndex) else ReferenceIndex.load(index)
    model = load_model(model)
    ref.check_model(model.fingerprint)
    model, inp, out = _start(data, model, out, overwrite, opts)
    return _cells(data, inp, out, lambda _, emb: vote_labels(ref, emb, k, unknown_threshold))
