"""The stage-2 model: the frozen stage-1 aligner, a causal LLM (LoRA or full), the bridge and a gene panel.

Cell -> text: the aligner's Q-Former query states ``[B, n, d_q]`` (with ``bridge.cell_embedding``, each joined with
the cell tower's ``<cls>`` embedding) pass through :class:`~scmm.model.bridge.CellProjector` and replace the input
embeddings of the ``<cell_i>`` slot tokens between ``<cell>`` and ``</cell>``; the LLM is trained on the answer
tokens only (``lm`` loss).

With ``bridge.programs`` the prompt after the cell block is also told the cell's :data:`CONTEXT_PROGRAMS` most active
hallmark programs as :class:`~scmm.model.bridge.ProgramReader` predicts them from its expression (a ridge regression
fitted on the training cells' per-cell scores before stage 2 trains), as text ("Programs read from its expression:
..."; :func:`~scmm.data_pipeline.fact_text.program_context`), in training and at inference alike;
:meth:`Stage2Model.predict_programs` returns the whole prediction. **Why text**: the same prediction joined to each
soft token as numbers was ignored by the demo LLM (val: its descriptions named the same two programs for every
cell, its likeliest programs at chance, with the reader itself at AUROC 0.999; BENCHMARKS.md, "Telling the LLM each
cell's programs"); a pretrained LLM can restate what its context says, and a user can read what the LLM was told.
The demo's 4-layer LLM does not restate it, so the demo leaves the option off. With ``bridge.markers`` the prompt is
told the cell's :data:`CONTEXT_MARKERS` most over-expressed genes with their NCBI names the same way
(:class:`~scmm.model.bridge.MarkerReader`, the corpus's marker statistic on the cell's own values; "Genes
over-expressed in it: ..."; :func:`~scmm.data_pipeline.fact_text.marker_context`), after the programs;
:meth:`Stage2Model.cell_contexts` gives both.

Text -> cell: the LLM reads ``description <cell> <cell_0..n-1> </cell>``; its last hidden states at the slots pass
through :class:`~scmm.model.bridge.TextToCellHead` into the query space, trained against the paired real cell's query
states (``t2c``, stop-gradient on the target). :class:`~scmm.model.bridge.PseudoCellDecoder` maps query states to a
log1p-CP10k profile over the HVG panel (a hurdle model: each gene's chance of being zero, and its value when
detected); it is trained on the real states (``decode_real``) and on the LLM-mapped ones (``decode_llm``, which also
fits the sampling noise), so that generation from text works at inference.

Saved folder (``save_pretrained``, atomic; ``Stage2Model.from_pretrained`` needs no DeepSpeed; the base is
:class:`~scmm.model.pretrained.PretrainedModel`, format ``scmm-stage2`` in :data:`~scmm.model.pretrained.FORMATS`)::

    config.json          format "scmm-stage2", version, Stage2Config, cell token ids
    lora/                the peft LoRA adapter with the trained rows of the new tokens (peft's trainable tokens;
                         absent under full fine-tuning: lm/ then holds the whole tuned LLM)
    bridge.safetensors   projector, text->cell head and decoder
    tokenizer/           the tokenizer with the cell tokens added
    hvg.json             the gene panel: corpus gene indices, symbols, vocabulary ids
    reader.json          with ``bridge.programs``/``markers``: the readers' gene panels (vocabulary ids), the program
                         names, the marker panel's symbols and NCBI names (their fitted statistics are in
                         bridge.safetensors)
    lm/                  the base LLM folder (copied), so the folder is self-contained
    stage1/              the stage-1 aligner folder (copied, or re-saved when it was trained); a package stores
                         it once, beside stage2/, and passes the loaded aligner to ``from_pretrained``
    genes.json           the training corpus's gene panel (inference reads only these genes)
    labels.json          the training corpus's cell types (annotation's default candidates)
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scmm.config import read_json
from scmm.data_pipeline.fact_text import marker_context, program_context
from scmm.data_pipeline.facts import MIN_DETECTION as MARKER_MIN_DETECTION
from scmm.data_pipeline.facts import gene_names
from scmm.data_pipeline.instructions import prompt_for
from scmm.data_pipeline.store import Corpus
from scmm.errors import ScmmError
from scmm.model.aligner import CellTextAligner
from scmm.model.bridge import (
    BridgeOptions,
    CellProjector,
    MarkerReader,
    ProgramReader,
    PseudoCellDecoder,
    QueryNorm,
    TextToCellHead,
    decoder_loss,
    t2c_loss,
)
from scmm.model.constrained import cell_ontology_trie
from scmm.model.llm import LoraOptions, add_cell_tokens, apply_lora, load_lm, optimizer_param_groups, save_adapter
from scmm.model.optim import decay_groups
from scmm.model.pretrained import PretrainedModel, reading, write_corpus_facts
from scmm.model.sequences import PROMPT_FORMATS, SequenceBuilder

log = logging.getLogger("scmm.stage2")
BRIDGE_FILE = "bridge.safetensors"
HVG_FILE = "hvg.json"
STAGE1_TRAIN = ("none", "qformer", "all")
LOSSES = ("lm", "t2c", "decode_real", "decode_llm")
READER_FILE = "reader.json"
CONTEXT_PROGRAMS = 3  # programs named in the prompt's context with bridge.programs
CONTEXT_MARKERS = 3  # genes named in the prompt's context with bridge.markers (as many as captions name)
LM_MEANS = ("token", "answer")  # how the answer loss averages (Stage2Loss.lm_mean)
NO_REPEAT_NGRAM_SIZE = 4  # decoding default: no token 4-gram twice in one answer (0: the raw decoder)
MAX_DESCRIPTION_TOKENS = 192  # decoding default: the longest description generated


PSEUDOCELL_BLOCK = 4096  # rows of pseudo-cells drawn from one generator


def _block_seed(seed: int, block: int) -> int:
    """The sampling generator's seed of block ``block`` of pseudo-cells: ``seed`` for the first, else a draw of
    a seed sequence of (seed, block), so that blocks do not share their noise."""
    return seed if block == 0 else int(np.random.SeedSequence((seed, block)).generate_state(1, np.uint64)[0] >> 1)


def length_groups(lengths: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Split right-padded sequences of ``lengths`` into at most two groups of similar length, the split that pads
    least: (row indices, the group's longest length) for each non-empty group."""
    order = torch.argsort(lengths, stable=True)
    sorted_len = lengths[order]
    n = len(order)
    cost = [k * int(sorted_len[k - 1]) + (n - k) * int(sorted_len[-1]) for k in range(1, n)]
    cut = 1 + int(np.argmin(cost)) if cost else n
    return [(idx, int(lengths[idx].max())) for idx in (order[:cut], order[cut:]) if len(idx)]


@dataclass
class Stage2Loss:
    """The weights of the stage-2 losses, and how the answer loss averages."""

    lm: float = 1.0
    t2c: float = 1.0
    decode_real: float = 1.0
    decode_llm: float = 1.0
    # token: the answer loss averages over all answer tokens of the batch, so a 60-token description outweighs
    # a 5-token cell-type answer twelvefold; answer: each answer's tokens are averaged first, so every answer
    # counts once and data.task_weights alone sets the mixture of tasks
    lm_mean: str = "token"

    def __post_init__(self) -> None:
        if self.lm_mean not in LM_MEANS:
            raise ValueError(f"loss.lm_mean must be one of {', '.join(LM_MEANS)}, not '{self.lm_mean}'")
        if min(self.lm, self.t2c, self.decode_real, self.decode_llm) < 0:
            raise ValueError("loss weights must be >= 0")


@dataclass
class Stage2Config:
    """The stage-2 model (YAML key ``model``; saved in the model folder's config.json)."""

    lora: LoraOptions = field(default_factory=LoraOptions)
    bridge: BridgeOptions = field(default_factory=BridgeOptions)
    loss: Stage2Loss = field(default_factory=Stage2Loss)
    max_length: int = 256  # LLM tokens per sequence
    train_stage1: str = "none"  # none | qformer | all (stage-1 weights frozen by default)
    lm_dtype: str = "float32"
    # how the LLM is prompted (model.sequences): auto = through the tokenizer's chat template when it has one
    # (an instruction-tuned model), else plain
    prompt_format: str = "auto"

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, not '{self.prompt_format}'")
        if self.train_stage1 not in STAGE1_TRAIN:
            raise ValueError(f"train_stage1 must be one of {', '.join(STAGE1_TRAIN)}, not '{self.train_stage1}'")
        if self.lm_dtype not in _DTYPES:
            raise ValueError(f"lm_dtype must be one of {', '.join(_DTYPES)}, not '{self.lm_dtype}'")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _unwrap(lm) -> nn.Module:
    """The underlying transformers model of a peft wrapper (or the model itself)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class _Named:
    """A stand-in exposing `named_parameters()` over a list of (name, parameter)."""

    def __init__(self, items):
        self.items = items

    def named_parameters(self):
        return iter(self.items)


class Stage2Model(PretrainedModel, nn.Module):
    """Aligner (stage 1) + LLM + bridge; ``forward(batch)`` returns the losses (see the module docstring)."""

    folder_format = "scmm-stage2"

    def __init__(self, config: Stage2Config, aligner: CellTextAligner, lm, tokenizer, cell_tokens, hvg: dict,
                 lm_path: str | Path, stage1_path: str | Path, reader: dict | None = None):
        super().__init__()
        self.config = config
        self.aligner, self.lm, self.tokenizer, self.cell_tokens = aligner, lm, tokenizer, cell_tokens
        self.hvg = {"indices": [int(i) for i in hvg["indices"]], "symbols": [str(s) for s in hvg["symbols"]],
                    "vocab_ids": [int(i) for i in hvg["vocab_ids"]]}
        self.lm_path, self.stage1_path = Path(lm_path), Path(stage1_path)
        self.n_slots = len(cell_tokens.slot_ids)
        d_q = aligner.qformer.hidden_size
        if aligner.qformer.num_queries != self.n_slots:
            raise ScmmError(f"the LLM has {self.n_slots} cell slot tokens, the Q-Former {aligner.qformer.num_queries} "
                            f"queries")
        d_llm = _unwrap(lm).config.hidden_size
        b = config.bridge
        emb = _unwrap(lm).get_input_embeddings().weight
        self.qnorm = QueryNorm(self.n_slots, d_q)
        self.reader, self.program_names, self.markers, self.marker_genes = None, [], None, []
        if (b.programs or b.markers) and reader is None:
            option = "bridge.programs" if b.programs else "bridge.markers"
            raise ScmmError(f"{option} needs a training corpus with per-cell facts (`scmm data build`)")
        if b.programs:
            self.program_names = [str(n) for n in reader["programs"]]
            self.reader = ProgramReader(reader["vocab_ids"], len(self.program_names))
        if b.markers:
            panel = reader["markers"]
            self.marker_genes = [(str(s), str(n) or None) for s, n in zip(panel["symbols"], panel["names"])]
            self.markers = MarkerReader(panel["vocab_ids"], float(panel["min_detection"]))
        d_in = d_q + (aligner.cell_tower.d_model if b.cell_embedding else 0)
        self.projector = CellProjector(d_in, d_llm, b.projector_hidden, b.dropout,
                                       embed_std=float(emb.detach().float().std()))
        self.t2c_head = TextToCellHead(d_llm, d_q, b.t2c_hidden, b.dropout)
        self.decoder = PseudoCellDecoder(self.n_slots, d_q, len(self.hvg["indices"]), b.decoder_hidden, b.dropout,
                                         b.min_log_std, b.max_log_std, b.zero_inflated)
        self.builder = SequenceBuilder(tokenizer, cell_tokens, config.max_length, config.prompt_format)
        self._set_stage1_trainable()

    # --- set-up -----------------------------------------------------------------------------------
    def _set_stage1_trainable(self) -> None:
        mode = self.config.train_stage1
        for name, p in self.aligner.named_parameters():
            p.requires_grad = mode == "all" or (mode == "qformer" and name.startswith("qformer."))
        if mode == "all":  # the text tower is never used in stage 2
            for p in self.aligner.text_tower.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.train_stage1 == "none":
            self.aligner.eval()  # frozen: no dropout, states are a function of the cell
        return self

    @classmethod
    def build(cls, config: Stage2Config, stage1: str | Path, lm_path: str | Path, hvg: dict,
              init_profiles: torch.Tensor | None = None, reader: dict | None = None) -> Stage2Model:
        """A fresh stage-2 model for training from a stage-1 folder and a base LLM folder; ``reader``: the corpus
        gene panel's vocabulary ids and program names (:func:`reader_info`), for ``bridge.programs``."""
        aligner = CellTextAligner.from_pretrained(stage1).float()
        lm, tokenizer = load_lm(str(lm_path), _DTYPES[config.lm_dtype])
        cell_tokens = add_cell_tokens(tokenizer, lm, aligner.qformer.num_queries)
        lm = apply_lora(lm, config.lora, cell_tokens.all_ids)
        model = cls(config, aligner, lm, tokenizer, cell_tokens, hvg, lm_path, stage1, reader)
        if init_profiles is not None:
            model.decoder.init_from_profiles(init_profiles)
        return model

    # --- pieces -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.projector.mlp[1].weight.device

    def encode(self, gene_ids: torch.Tensor, values: torch.Tensor,
               padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the aligner's Q-Former query states [B, n, d_q], standardised by `QueryNorm`; the cell tower's <cls>
        embedding [B, d_cell]), without gradient when stage 1 is frozen."""
        device = self.device
        args = (gene_ids.to(device), values.to(device), padding_mask.to(device))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_stage1 != "none"):
            states, query = self.aligner.cell_states(*args)
        return self.qnorm(query), states[:, 0]

    @torch.no_grad()
    def predict_programs(self, batch: dict) -> np.ndarray:
        """[B, P] the program reader's predicted activities (standardised like the corpus's scores, in the order
        of ``program_names``) of a loader-style batch; needs ``bridge.programs``."""
        if self.reader is None:
            raise ScmmError("this stage-2 model has no program reader (bridge.programs)")
        device = self.device
        return self.reader(batch["gene_ids"].to(device), batch["values"].to(device),
                           batch["padding_mask"].to(device)).float().cpu().numpy()

    @torch.no_grad()
    def predict_markers(self, batch: dict, k: int = CONTEXT_MARKERS) -> list[list[tuple[str, str | None]]]:
        """Each cell's ``k`` most over-expressed genes as the marker reader reads them, (symbol, NCBI full name or
        None) pairs, fewer where fewer qualify; needs ``bridge.markers``."""
        if self.markers is None:
            raise ScmmError("this stage-2 model has no marker reader (bridge.markers)")
        device = self.device
        cols = self.markers(batch["gene_ids"].to(device), batch["values"].to(device),
                            batch["padding_mask"].to(device), k).cpu().tolist()
        return [[self.marker_genes[j] for j in row if j >= 0] for row in cols]

    @property
    def has_context(self) -> bool:
        """Whether prompts are told what the readers read from each cell (``bridge.programs``/``markers``)."""
        return self.reader is not None or self.markers is not None

    def cell_contexts(self, batch: dict) -> list[str]:
        """What each cell's prompt is told first: its :data:`CONTEXT_PROGRAMS` highest programs as the program reader
        predicts them, then its :data:`CONTEXT_MARKERS` most over-expressed genes as the marker reader picks them
        (:func:`~scmm.data_pipeline.fact_text.program_context`, :func:`~scmm.data_pipeline.fact_text.marker_context`;
        each only with its option; "" with neither)."""
        parts: list[list[str]] = [[] for _ in range(len(batch["gene_ids"]))]
        if self.reader is not None:
            top = np.argsort(-self.predict_programs(batch), axis=1, kind="stable")[:, :CONTEXT_PROGRAMS]
            for out, row in zip(parts, top):
                out.append(program_context([self.program_names[j] for j in row]))
        if self.markers is not None:
            for out, genes in zip(parts, self.predict_markers(batch)):
                out.append(marker_context(genes))
        return [" ".join(p for p in out if p) for out in parts]

    def cell_prompts(self, batch: dict, prompt: str) -> list[str]:
        """Each cell's prompt: ``prompt``, after the cell's context (:meth:`cell_contexts`) when it has one."""
        if not self.has_context:
            return [prompt] * len(batch["gene_ids"])
        return [with_context(context, prompt) for context in self.cell_contexts(batch)]

    @torch.no_grad()
    def fit_readers(self, batches, scores) -> dict[str, dict]:
        """Fit the program reader (:meth:`ProgramReader.fit`) and the marker reader (:meth:`MarkerReader.fit`),
        those the options ask for, on loader batches of training cells (a re-iterable: one pass per reader);
        ``scores``: cell IDs -> their program scores ``[b, P]`` (the corpus's, in the order of ``program_names``).
        Returns each fit's summary by reader ("programs", "markers")."""
        device, out = self.device, {}

        def values(module, b):
            return module.panel_values(b["gene_ids"].to(device), b["values"].to(device), b["padding_mask"].to(device))

        if self.reader is not None:
            out["programs"] = self.reader.fit((values(self.reader, b), scores(b["cell_id"])) for b in batches)
        if self.markers is not None:
            out["markers"] = self.markers.fit(values(self.markers, b) for b in batches)
        return out

    @torch.no_grad()
    def set_query_stats(self, batches) -> None:
        """Fix the z-space statistics from loader batches of training cells (in eval mode, like stage 1 frozen)."""
        was = self.training
        self.eval()
        device = self.device
        states = torch.cat([self.aligner.cell_states(b["gene_ids"].to(device), b["values"].to(device),
                                                      b["padding_mask"].to(device))[1].float() for b in batches])
        self.qnorm.set_stats(states)
        self.train(was)

    def _embed_with_cells(self, input_ids: torch.Tensor, slot_positions: torch.Tensor, query: torch.Tensor,
                          cell: torch.Tensor) -> torch.Tensor:
        """Input embeddings with the projected cell (query states [B, n, d_q], <cls> embedding [B, d_cell])
        written at the slot positions."""
        embeds = _unwrap(self.lm).get_input_embeddings()(input_ids)
        if self.config.bridge.cell_embedding:
            query = torch.cat([query, cell[:, None].expand(-1, query.shape[1], -1).to(query.dtype)], dim=-1)
        soft = self.projector(query.to(self.projector.mlp[1].weight.dtype)).to(embeds.dtype)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
        embeds = embeds.clone()
        embeds[rows, slot_positions] = soft
        return embeds

    def _hidden(self, **kwargs) -> torch.Tensor:
        """The LLM's last hidden states [B, T, H] (after the final norm), without the vocabulary head."""
        base = _unwrap(self.lm)
        body = base.get_decoder() if hasattr(base, "get_decoder") else None
        if body is not None and body is not base:
            return body(use_cache=False, **kwargs).last_hidden_state
        return self.lm(output_hidden_states=True, use_cache=False, **kwargs).hidden_states[-1]

    def slot_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    slot_positions: torch.Tensor) -> torch.Tensor:
        """The LLM's last hidden states at the slot tokens, mapped to the query space: [B, n, d_q]."""
        hidden = self._hidden(input_ids=input_ids, attention_mask=attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
        h = hidden[rows, slot_positions]
        return self.t2c_head(h.to(self.t2c_head.mlp[1].weight.dtype))

    def answer_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy on the labelled (answer) tokens, averaged as ``loss.lm_mean`` says; the
        vocabulary head runs on those tokens only."""
        total, units = self._answer_loss_sum(embeds, attention_mask, labels)
        return total / units

    def _answer_loss_sum(self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed answer loss, the count it is averaged over: answer tokens, or answers with ``lm_mean`` answer)."""
        hidden = self._hidden(inputs_embeds=embeds, attention_mask=attention_mask)
        target = labels[:, 1:]
        keep = target != -100
        head = _unwrap(self.lm).get_output_embeddings()
        logits = head(hidden[:, :-1][keep])
        per_token = torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="none")
        if self.config.loss.lm_mean == "token":
            return per_token.sum(), keep.sum()
        n_tokens = keep.sum(1)
        weight = 1.0 / n_tokens[keep.nonzero()[:, 0]]  # each answer's tokens share one unit of weight
        return (per_token * weight).sum(), (n_tokens > 0).sum()

    def _grouped_answer_loss(self, c2t: dict[str, torch.Tensor], query: torch.Tensor, cell: torch.Tensor
                             ) -> torch.Tensor:
        """:meth:`answer_loss` of right-padded cell -> text sequences run as two groups of similar length, each
        cut to its own longest sequence: short answers (cell type, tissue) no longer pad to the descriptions'
        length. The same loss as one padded batch (padding after a causal sequence changes nothing before it),
        at about two thirds of the LLM's work on the demo's task mix (BENCHMARKS.md)."""
        total = units = 0
        for idx, width in length_groups(c2t["attention_mask"].sum(1)):
            ids = c2t["input_ids"][idx, :width]
            embeds = self._embed_with_cells(ids, c2t["slot_positions"][idx], query[idx], cell[idx])
            s, u = self._answer_loss_sum(embeds, c2t["attention_mask"][idx, :width], c2t["labels"][idx, :width])
            total, units = total + s, units + u
        return total / units

    def _grouped_slot_states(self, t2c: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`slot_states` of right-padded text -> cell sequences run as two groups of similar length (the
        same states as one padded batch): a cell's full caption is several times longer than the short program
        queries it is mixed with."""
        groups = length_groups(t2c["attention_mask"].sum(1))
        states = [self.slot_states(t2c["input_ids"][idx, :width], t2c["attention_mask"][idx, :width],
                                   t2c["slot_positions"][idx]) for idx, width in groups]
        return torch.cat(states)[torch.argsort(torch.cat([idx for idx, _ in groups]))]  # back to the batch's order

    # --- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        """Losses ``lm``, ``t2c``, ``decode_real``, ``decode_llm`` and their weighted sum ``loss``.

        batch: the loader's cell tensors (gene_ids, values, padding_mask), ``hvg`` [B, G] target profiles,
        ``c2t`` (collated cell->text items: input_ids, attention_mask, labels, slot_positions) and ``t2c``
        (collated text->cell items: input_ids, attention_mask, slot_positions), optionally of distinct
        descriptions only, with ``t2c_index`` [B] giving each cell's row.
        """
        device, w, b = self.device, self.config.loss, self.config.bridge
        query, cell = self.encode(batch["gene_ids"], batch["values"], batch["padding_mask"])
        target = batch["hvg"].to(device)
        out = {}
        c2t = {k: v.to(device) for k, v in batch["c2t"].items()}
        if w.lm > 0:
            out["lm"] = self._grouped_answer_loss(c2t, query, cell)
        t2c = {k: v.to(device) for k, v in batch["t2c"].items()}
        mapped = self._grouped_slot_states(t2c)
        if "t2c_index" in batch:  # each distinct description ran once; back to one row per cell
            mapped = mapped[batch["t2c_index"].to(device)]
        out["t2c"] = t2c_loss(mapped, query, b.t2c_loss)
        out["decode_real"] = decoder_loss(self.decoder(query.detach().to(mapped.dtype)), target)
        out["decode_llm"] = decoder_loss(self.decoder(mapped), target, b.nll_weight)
        zero = torch.zeros((), device=device)
        out.setdefault("lm", zero)
        out["loss"] = sum(getattr(w, k) * out[k] for k in LOSSES)
        return out

    def gradient_checkpointing_enable(self) -> None:
        _unwrap(self.lm).gradient_checkpointing_enable()

    def param_groups(self, weight_decay: float, lr: float) -> list[dict]:
        """AdamW groups: LLM/stage-1 weights as `model.llm.optimizer_param_groups` (no decay on embeddings),
        the bridge modules at `lr * bridge.lr_scale`."""
        bridge = {id(p) for m in (self.projector, self.t2c_head, self.decoder) for p in m.parameters()}
        rest = [(n, p) for n, p in self.named_parameters() if id(p) not in bridge]
        groups = []
        for g in optimizer_param_groups(_Named(rest), weight_decay):
            if g["params"]:
                groups.append({**g, "lr": lr})
        scale = self.config.bridge.lr_scale
        bridge_params = [(n, p) for m in (self.projector, self.t2c_head, self.decoder) for n, p in m.named_parameters()]
        groups += [g for g in decay_groups(bridge_params, weight_decay, lr=lr * scale) if g["params"]]
        return groups

    # --- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def describe_cells(self, batch: dict, task: str = "describe", constrained: bool = False, num_beams: int = 1,
                       max_new_tokens: int | None = None, template: int = 0, prompt: str | None = None,
                       no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE) -> list[str]:
        """Generated answers for a loader-style batch of cells (greedy or beam search).

        ``constrained`` (cell_type task): decoding follows a prefix tree over the Cell Ontology's labels and
        synonyms, so the answer is always a valid CL term. ``prompt`` replaces the task's phrasing ``template``.
        Decoding defaults are what a reader wants: no token n-gram of ``no_repeat_ngram_size`` (default
        :data:`NO_REPEAT_NGRAM_SIZE`; 0 = the raw decoder) twice in one answer, and at most
        :data:`MAX_DESCRIPTION_TOKENS` new tokens for a description (32 for the other tasks) unless
        ``max_new_tokens`` says otherwise.
        """
        self.eval()
        device = self.device
        query, cell = self.encode(batch["gene_ids"], batch["values"], batch["padding_mask"])
        prompt = prompt_for(task, template) if prompt is None else prompt
        items = [self.builder.cell_to_text(p, None) for p in self.cell_prompts(batch, prompt)]
        enc = self.builder.collate(items, padding_side="left")
        ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        embeds = self._embed_with_cells(ids, enc["slot_positions"].to(device), query, cell)
        if max_new_tokens is None:
            max_new_tokens = 32 if task in ("cell_type", "tissue") else \
                min(MAX_DESCRIPTION_TOKENS, max(16, self.config.max_length - ids.shape[1]))
        kwargs = dict(inputs_embeds=embeds, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                      num_beams=num_beams, pad_token_id=self._pad_id(), eos_token_id=self.tokenizer.eos_token_id)
        if no_repeat_ngram_size > 0 and not constrained:
            kwargs["no_repeat_ngram_size"] = int(no_repeat_ngram_size)
        if num_beams > 1:
            kwargs["early_stopping"] = True
        if constrained:
            kwargs["prefix_allowed_tokens_fn"] = self.label_trie().prefix_allowed_tokens_fn(0)
        gen = self.lm.generate(**kwargs)
        if gen.shape[1] >= ids.shape[1] and torch.equal(gen[:, :ids.shape[1]], ids):  # some versions echo the prompt
            gen = gen[:, ids.shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(gen, skip_special_tokens=True)]

    @torch.no_grad()
    def answer_logprobs(self, batch: dict, answers: Sequence[str], task: str = "cell_type",
                        template: int = 0) -> np.ndarray:
        """[B, len(answers)]: the log-probability the LLM gives each answer (its tokens and eos, read with teacher
        forcing) to the task's question about each cell of a loader-style batch. Over a list of candidate names
        this makes the LLM a classifier whose scores can be calibrated and backed off like the annotation's
        (:mod:`scmm.eval.stage2`)."""
        self.eval()
        device = self.device
        query, cell = self.encode(batch["gene_ids"], batch["values"], batch["padding_mask"])
        n = query.shape[0]
        prompts = self.cell_prompts(batch, prompt_for(task, template))
        head = _unwrap(self.lm).get_output_embeddings()
        out = torch.zeros(n, len(answers), dtype=torch.float64)
        for j, answer in enumerate(answers):
            enc = self.builder.collate([self.builder.cell_to_text(p, answer) for p in prompts])
            ids = enc["input_ids"].to(device)
            embeds = self._embed_with_cells(ids, enc["slot_positions"].to(device), query, cell)
            hidden = self._hidden(inputs_embeds=embeds, attention_mask=enc["attention_mask"].to(device))
            target = enc["labels"][:, 1:].to(device)
            keep = target != -100
            logp = torch.log_softmax(head(hidden[:, :-1][keep]).float(), dim=-1)
            token = logp.gather(1, target[keep][:, None])[:, 0].double().cpu()
            out[:, j].index_add_(0, keep.nonzero()[:, 0].cpu(), token)
        return out.numpy()

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def label_trie(self):
        """The Cell Ontology prefix tree over this tokenizer (built once)."""
        if getattr(self, "_trie", None) is None:
            self._trie = cell_ontology_trie(self.tokenizer)
        return self._trie

    def answer_to_cl(self, text: str) -> str | None:
        """The CL ID that a generated answer names (label or synonym), or None."""
        return self.label_trie().lookup(text)

    @torch.no_grad()
    def mapped_states(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """LLM-mapped query states [len(texts), n, d_q] for descriptions; batches of texts of similar length
        (the order of ``texts`` is kept in the result)."""
        self.eval()
        device, outs = self.device, []
        items = [self.builder.text_to_cell(t) for t in texts]
        order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
        for i in range(0, len(order), batch_size):
            enc = self.builder.collate([items[j] for j in order[i:i + batch_size]], padding_side="right")
            outs.append(self.slot_states(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                         enc["slot_positions"].to(device)).float())
        return torch.cat(outs)[torch.argsort(torch.tensor(order))]

    @torch.no_grad()
    def generate_pseudocells(self, texts: Sequence[str], n: int, seed: int = 0, noise: float = 1.0,
                             rows: tuple[int, int] | None = None) -> np.ndarray:
        """``n`` pseudo-cells per text: log1p-CP10k profiles over the HVG panel, ``[len(texts) * n, G]`` float32;
        with ``rows=(start, stop)`` only those rows of it (to write a large number in chunks).

        Rows are text-major (the n cells of texts[0] first). Sampling noise is drawn per block of
        ``PSEUDOCELL_BLOCK`` rows from a generator seeded by ``seed`` and the block's number only (the first block:
        ``seed`` itself), so the same model, texts, n and seed give the same cells, whole or in parts.
        """
        if n < 1:
            raise ScmmError(f"the number of pseudo-cells must be >= 1, got {n}")
        if not texts or any(not str(t).strip() for t in texts):
            raise ScmmError("pseudo-cell generation needs non-empty texts")
        total = len(texts) * n
        start, stop = (0, total) if rows is None else (max(0, rows[0]), min(total, rows[1]))
        if stop <= start:
            return np.zeros((0, len(self.hvg["indices"])), dtype=np.float32)
        mapped = self.mapped_states([str(t) for t in texts]).to(self.decoder.mean_head.weight.dtype)
        parts = []
        for block in range(start // PSEUDOCELL_BLOCK, (stop - 1) // PSEUDOCELL_BLOCK + 1):
            first, last = block * PSEUDOCELL_BLOCK, min((block + 1) * PSEUDOCELL_BLOCK, total)
            gen = torch.Generator().manual_seed(_block_seed(int(seed), block))
            states = mapped[(torch.arange(first, last) // n).to(mapped.device)]
            x = self.decoder.sample(states, generator=gen, noise=noise).cpu().numpy().astype(np.float32)
            parts.append(x[max(start, first) - first:min(stop, last) - first])
        return np.concatenate(parts)

    # --- folders ----------------------------------------------------------------------------------
    def _bridge_parts(self) -> list[tuple[str, nn.Module]]:
        parts = [("projector.", self.projector), ("t2c_head.", self.t2c_head), ("decoder.", self.decoder),
                 ("qnorm.", self.qnorm)]
        return parts + ([("reader.", self.reader)] if self.reader is not None else []) + \
            ([("markers.", self.markers)] if self.markers is not None else [])

    def bridge_state(self) -> dict[str, torch.Tensor]:
        """Projector, text->cell head, decoder and program reader weights (the new token rows live in the peft
        adapter, or in lm/ under full fine-tuning)."""
        state = {}
        for prefix, module in self._bridge_parts():
            state.update({prefix + k: v for k, v in module.state_dict().items()})
        return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}

    def _write(self, tmp: Path, corpus: Corpus | None = None) -> None:
        """The stage-2 folder (see the module docstring); ``corpus``: the training corpus, whose gene panel and
        labels go into the folder."""
        if self.config.train_stage1 == "none":
            shutil.copytree(self.stage1_path, tmp / "stage1", ignore=shutil.ignore_patterns(".*"))
        else:
            self.aligner.save_pretrained(tmp / "stage1")
        if self.config.lora.full_finetune:
            _unwrap(self.lm).save_pretrained(tmp / "lm")
            self.tokenizer.save_pretrained(str(tmp / "lm"))
        else:
            if self.lm is _unwrap(self.lm):
                raise ScmmError("this stage-2 model's LoRA adapter was merged into the LLM when it was loaded; "
                                "load it with merge_lora=False to save it")
            shutil.copytree(self.lm_path, tmp / "lm")
            save_adapter(self.lm, tmp / "lora")
        self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        self.save_weights(tmp / BRIDGE_FILE, self.bridge_state())
        (tmp / HVG_FILE).write_text(json.dumps(self.hvg))
        if self.has_context:
            panels: dict = {}
            if self.reader is not None:
                panels.update(vocab_ids=self.reader.vocab_ids(), programs=self.program_names)
            if self.markers is not None:
                panels["markers"] = {"vocab_ids": self.markers.vocab_ids(),
                                     "symbols": [s for s, _ in self.marker_genes],
                                     "names": [n or "" for _, n in self.marker_genes],
                                     "min_detection": self.markers.min_detection}
            (tmp / READER_FILE).write_text(json.dumps(panels))
        if corpus is not None:
            write_corpus_facts(tmp, corpus)
        ct = self.cell_tokens
        self.write_config(tmp, cell_tokens={"start_id": int(ct.start_id), "end_id": int(ct.end_id),
                                            "slot_ids": [int(i) for i in ct.slot_ids]})

    @classmethod
    def _from_folder(cls, folder: Path, raw: dict, version: int, aligner: CellTextAligner | None = None,
                     stage1_folder: str | Path | None = None, dtype: torch.dtype = torch.float32,
                     merge_lora: bool = True) -> Stage2Model:
        """Load a stage-2 folder for inference (eval mode, no DeepSpeed). Its stage-1 model is ``stage1_folder``
        (default: the folder's ``stage1/``; a package stores it beside the stage-2 folder), or ``aligner`` when
        already loaded from there. ``merge_lora``: fold the LoRA adapter into the LLM's weights (one matmul per
        projection instead of three: generation about 1.5x faster on CPU, BENCHMARKS.md); ``False`` keeps the
        adapter, as a model that will be saved again needs."""
        stage1 = Path(stage1_folder) if stage1_folder is not None else folder / "stage1"
        if version == 3 and isinstance(raw.get("bridge"), dict):
            raw["bridge"].setdefault("zero_inflated", False)
        saved_tokens = raw.pop("cell_tokens", None)
        config = cls.read_config(Stage2Config, folder, raw)
        if aligner is None:
            aligner = CellTextAligner.from_pretrained(stage1)
        hvg = read_json(folder / HVG_FILE, "gene panel of the pseudo-cells")
        with reading(folder / "lm", "language model folder"):
            lm, tokenizer = load_lm(str(folder / "lm"), dtype)
            cell_tokens = add_cell_tokens(tokenizer, lm, aligner.qformer.num_queries)
        with reading(folder / "config.json", "stage-2 model config"):
            if cell_tokens.all_ids != [saved_tokens["start_id"], saved_tokens["end_id"], *saved_tokens["slot_ids"]]:
                raise ScmmError(f"{folder}: the cell tokens got other ids than in training")
        if not config.lora.full_finetune:
            from peft import PeftModel  # noqa: PLC0415 - peft imports transformers: seconds, paid by LLM loads
            with reading(folder / "lora", "LoRA adapter folder"):
                lm = PeftModel.from_pretrained(lm, str(folder / "lora"), is_trainable=False)
                if merge_lora:
                    lm = lm.merge_and_unload()
        state = cls.load_weights(folder / BRIDGE_FILE)
        reader = None
        if config.bridge.programs or config.bridge.markers:
            raw_reader = read_json(folder / READER_FILE, "readers' gene panels")
            with reading(folder / READER_FILE, "readers' gene panels"):
                reader = {}
                if config.bridge.programs:
                    reader.update(vocab_ids=[int(i) for i in raw_reader["vocab_ids"]],
                                  programs=[str(p) for p in raw_reader["programs"]])
                if config.bridge.markers:
                    m = raw_reader["markers"]
                    reader["markers"] = {"vocab_ids": [int(i) for i in m["vocab_ids"]],
                                         "symbols": [str(x) for x in m["symbols"]],
                                         "names": [str(x) for x in m["names"]],
                                         "min_detection": float(m["min_detection"])}
        with reading(folder / HVG_FILE, "gene panel of the pseudo-cells"):
            model = cls(config, aligner.float(), lm, tokenizer, cell_tokens, hvg, folder / "lm", stage1, reader)
        with reading(folder / BRIDGE_FILE, "weights file"):
            model._load_bridge_state(state)
        return model.to(dtype).eval() if dtype != torch.float32 else model.eval()

    @torch.no_grad()
    def _load_bridge_state(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in self._bridge_parts():
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(sub, strict=True)


def reader_info(corpus: Corpus) -> dict | None:
    """What the readers read and name on ``corpus`` (None: a corpus without per-cell facts):
    :class:`~scmm.model.bridge.ProgramReader` the vocabulary ids of the panel genes in its programs' sets
    (``vocab_ids``) and the program names (``programs``); :class:`~scmm.model.bridge.MarkerReader` (``markers``) the
    whole gene panel's vocabulary ids, symbols and NCBI full names ("" where the table has none), and the corpus's
    detection floor for a marker."""
    if corpus.facts is None:
        return None
    genes = np.unique(corpus.fact_arrays()["program_genes"])
    symbols = [str(s) for s in corpus.gene_symbols]
    names = gene_names(symbols)
    return {"vocab_ids": [int(i) for i in corpus.gene_vocab_ids[genes]],
            "programs": list(corpus.facts["programs"]["names"]),
            "markers": {"vocab_ids": [int(i) for i in corpus.gene_vocab_ids], "symbols": symbols,
                        "names": [names.get(s, "") for s in symbols],
                        "min_detection": float(corpus.facts["markers"].get("min_detection", MARKER_MIN_DETECTION))}}


def with_context(context: str, prompt: str) -> str:
    """A prompt told ``context`` first (training pairs and inference write it the same way)."""
    return f"{context} {prompt}" if context else prompt


__all__ = ["Stage2Model", "Stage2Config", "Stage2Loss", "LOSSES", "LM_MEANS", "reader_info", "with_context"]
