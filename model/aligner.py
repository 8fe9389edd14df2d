"""The stage-1 model: cell tower + text tower + Q-Former + heads, trained with three objectives.

One forward pass of the cell tower serves all three losses: a share of the gene values is masked
(scGPT style); the outputs at masked genes feed the reconstruction head, the outputs at the other
genes feed the Q-Former. Hiding the masked genes from the Q-Former matters: their states are trained
to predict expression, so they would become the cell's signature, which a cell at inference (nothing
masked) lacks. Masking doubles as augmentation for the contrastive and matching objectives and
halves the cost of a step compared with a second, unmasked pass. At inference nothing is masked.

Two choices make the alignment learnable on small data from scratch (without them the cell features
collapsed to one vector for all cells; BENCHMARKS.md, "Demo configuration"): text features are centred on
the mean text-tower output of the corpus's label texts before the projection (`set_text_center`), and the
cell feature adds the projected `<cls>` output of the cell tower to the mean of the projected query outputs
(`QFormerConfig.cls_shortcut`).

Saved as a folder (`save_pretrained`/`from_pretrained` of :class:`~scmm.model.pretrained.PretrainedModel`, no
DeepSpeed needed; format ``scmm-aligner`` in :data:`~scmm.model.pretrained.FORMATS`)::

    config.json           format, version, AlignerConfig with every size resolved (but the cell tower's: below)
    cell_encoding.json    how the model reads cells (CellEncoding; the one place of pad_value)
    cell_tower/           CellTower folder (config.json without pad_value, model.safetensors, vocab.json)
    text_tower/           the Hugging Face encoder and its tokenizer
    aligner.safetensors   Q-Former, heads and expression decoder
    genes.json            the training corpus's gene panel (inference reads only these genes)
    labels.json           the training corpus's cell types (annotation's default candidates)
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from scmm.data_pipeline.encoding import CellEncoding
from scmm.data_pipeline.fact_text import FACT_TEMPLATES, FACT_VIEW_PARTS, fact_view
from scmm.data_pipeline.store import Corpus
from scmm.data_pipeline.vocab import GeneVocab
from scmm.errors import ScmmError
from scmm.model.cell_tower import VOCAB_NAME, CellTower, CellTowerConfig
from scmm.model.expr_decoder import ExprDecoder, ExprDecoderConfig
from scmm.model.losses import contrastive_loss, itm_hard_negatives, itm_loss, mask_values, masked_expression_loss
from scmm.model.optim import decay_groups
from scmm.model.pretrained import PretrainedModel, read_marker, reading, write_corpus_facts
from scmm.model.qformer import AlignmentHeads, QFormer, QFormerConfig
from scmm.model.scgpt import load_scgpt_state, tower_from_scgpt
from scmm.model.text_tower import TextTower, TextTowerConfig

log = logging.getLogger(__name__)
WEIGHTS_FILE = "aligner.safetensors"
TOWER_FROM_ENCODING = ("pad_value",)  # cell-tower config keys that the cell encoding owns (saved there once)


@dataclass
class AlignerLoss:
    """The stage-1 objectives: their weights, the masking, and what the matching head sees."""

    contrastive: float = 1.0
    matching: float = 1.0
    reconstruction: float = 1.0
    mask_ratio: float = 0.25
    matching_max_length: int = 64  # text tokens seen by the matching head (the cell type comes first)
    matching_max_cells: int = 0  # cells of a batch that enter the matching loss (0: all); it is the costly part
    same_label_not_negative: bool = True
    # share of training texts replaced by their cell-specific claims alone (fact_text.fact_view): programs, marker
    # genes or both, without the cell type, so that such text is aligned too (0: the captions as they are). On the
    # demo it lifts search by program text but collapses the query states that stage 2 reads (BENCHMARKS.md)
    fact_view: float = 0.0
    # weight of the same contrastive loss on the query states alone (without the <cls> shortcut): keeps the states
    # that stage 2 reads carrying the cell when the shortcut alone could solve the task (0: off)
    query_contrastive: float = 0.0

    def __post_init__(self) -> None:
        if min(self.contrastive, self.matching, self.reconstruction, self.query_contrastive) < 0 \
                or not 0 <= self.mask_ratio <= 1:
            raise ValueError("loss weights must be >= 0 and mask_ratio in [0, 1]")
        if not 0 <= self.fact_view <= 1:
            raise ValueError("fact_view must be in [0, 1]")


@dataclass
class AlignerConfig:
    """The stage-1 model (YAML key ``model``). With ``scgpt_checkpoint`` (an scGPT checkpoint folder) the cell
    tower's shape and weights come from that checkpoint (its args.json decides; ``cell_tower.dropout`` applies)."""

    cell_tower: CellTowerConfig = field(default_factory=CellTowerConfig)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    loss: AlignerLoss = field(default_factory=AlignerLoss)
    scgpt_checkpoint: str | None = None


def _check_category_encoding(tower: CellTowerConfig, encoding: CellEncoding) -> None:
    """A category value encoder reads bin indices: pad and mask values must be bins of its table too."""
    if tower.input_emb_style != "category":
        return
    n = tower.n_input_bins
    values = (encoding.pad_value, encoding.mask_value)
    if encoding.n_bins < 2 or encoding.n_bins > n or not all(float(v).is_integer() and 0 <= v < n for v in values):
        raise ScmmError(f"input_emb_style category reads bin indices below n_input_bins ({n}): it needs "
                        f"encoding.n_bins >= 2 and at most {n}, and pad_value / mask_value among those indices "
                        f"(scGPT: n_bins, n_bins + 1 with n_input_bins = n_bins + 2); got n_bins {encoding.n_bins}, "
                        f"pad_value {encoding.pad_value}, mask_value {encoding.mask_value}")


def build_cell_tower(config: AlignerConfig, vocab: GeneVocab, encoding: CellEncoding) -> CellTower:
    """A fresh tower of ``config.cell_tower`` sized to the vocabulary, or one loaded from ``scgpt_checkpoint``,
    whose gene vocabulary and value encoding must then be the model's."""
    folder = config.scgpt_checkpoint
    if folder:
        try:
            ckpt = load_scgpt_state(folder)
        except (OSError, ValueError) as exc:
            raise ScmmError(f"cannot read the scGPT checkpoint {folder}: {exc}") from None
        if ckpt.vocab != vocab.token_to_id:
            raise ScmmError(f"the scGPT checkpoint {folder} has its own gene vocabulary; build the corpus with "
                            f"--vocab {folder}")
        for key, value in ckpt.encoding.items():
            if getattr(encoding, key) != value:
                raise ScmmError(f"the scGPT checkpoint {folder} was trained with {key} {value}, the config has "
                                f"encoding.{key}: {getattr(encoding, key)}")
        tower, _ = tower_from_scgpt(folder, allow_missing_heads=True, checkpoint=ckpt,
                                    dropout=config.cell_tower.dropout)
    else:
        tower = CellTower(replace(config.cell_tower, vocab_size=len(vocab), pad_token_id=vocab.pad_id,
                                  pad_value=encoding.pad_value))
    _check_category_encoding(tower.config, encoding)
    return tower


def _cell_features(cell_tower: CellTower, qformer: QFormer, heads: AlignmentHeads, gene_ids: torch.Tensor,
                   values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    states = cell_tower(gene_ids, values, padding_mask)
    return heads.cell_features(qformer(states, padding_mask), states[:, 0])


class CellEmbedder(nn.Module):
    """The cell path of a stage-1 model (cell tower, Q-Former, heads) copied in one dtype, for inference in
    bf16 weights without touching the model (its text tower stays as it is). Returns fp32 embeddings."""

    def __init__(self, aligner: CellTextAligner, dtype: torch.dtype):
        super().__init__()
        self.cell_tower = copy.deepcopy(aligner.cell_tower).to(dtype).eval()
        self.qformer = copy.deepcopy(aligner.qformer).to(dtype).eval()
        self.heads = copy.deepcopy(aligner.heads).to(dtype).eval()

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        features = _cell_features(self.cell_tower, self.qformer, self.heads, gene_ids, values, padding_mask)
        return nn.functional.normalize(features.float(), dim=-1)  # unit length in fp32, not just in bf16


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on any rank (just `flag` outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


class CellTextAligner(PretrainedModel, nn.Module):
    """Cell tower, text tower, Q-Former and alignment heads; `forward(batch)` returns the losses.

    ``vocab`` (the gene vocabulary, with its special-token ids) and ``encoding`` (how cells become input) are
    part of the model: saved and loaded with it, so every reader of the model encodes cells the same way.
    Folder format ``scmm-aligner`` (the module docstring; the base: :mod:`scmm.model.pretrained`).
    """

    folder_format = "scmm-aligner"

    def __init__(self, config: AlignerConfig, vocab: GeneVocab, encoding: CellEncoding,
                 cell_tower: CellTower | None = None, text_tower: TextTower | None = None):
        super().__init__()
        self.vocab, self.encoding = vocab, encoding
        self.cell_tower = cell_tower if cell_tower is not None else build_cell_tower(config, vocab, encoding)
        self.text_tower = text_tower if text_tower is not None else TextTower(config.text_tower)
        qcfg = config.qformer.resolved(self.text_tower.model.config, self.cell_tower.d_model)
        self.config = replace(config, cell_tower=self.cell_tower.config, qformer=qcfg, scgpt_checkpoint=None)
        self.qformer = QFormer(qcfg)
        if qcfg.init_from_text:
            self.qformer.init_from_bert(self.text_tower.model)
            if qcfg.freeze_word_embeddings:
                self.qformer.word_embeddings.requires_grad_(False)
        self.heads = AlignmentHeads(qcfg.hidden_size, self.text_tower.hidden_size, qcfg.embed_dim,
                                    cell_width=self.cell_tower.d_model if qcfg.cls_shortcut else None)
        self.expr_decoder = ExprDecoder(ExprDecoderConfig(d_model=self.cell_tower.d_model))
        self._text_cache: dict[str, torch.Tensor] = {}

    # --- training set-up --------------------------------------------------------------------------
    def param_groups(self, weight_decay: float, lr: float) -> list[dict]:
        """AdamW groups: weight decay on matrices only (not on biases, norms or the temperature)."""
        return decay_groups(self.named_parameters(), weight_decay, keep=("logit_scale",), lr=lr)

    def gradient_checkpointing_enable(self) -> None:
        self.cell_tower.gradient_checkpointing_enable()

    # --- encoders ---------------------------------------------------------------------------------
    def cell_states(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states of encoded cells: (per-gene cell-tower states [B,L,D], Q-Former query outputs
        [B,Q,H]). Cells are encoded before (:func:`scmm.data_pipeline.encoding.encode_cells`)."""
        states = self.cell_tower(gene_ids, values, padding_mask)
        return states, self.qformer(states, padding_mask)

    def cell_features(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """The aligned, L2-normalised cell embedding [B, embed_dim] (`obsm['X_scmm']`)."""
        return _cell_features(self.cell_tower, self.qformer, self.heads, gene_ids, values, padding_mask)

    def cell_embedder(self, dtype: torch.dtype) -> CellEmbedder:
        """The cell path alone (tower, Q-Former, heads) as a copy in ``dtype``, for fast inference."""
        return CellEmbedder(self, dtype)

    def text_pooled(self, texts: list[str]) -> torch.Tensor:
        """Pooled text-tower outputs; cached per text when the text tower is frozen (texts repeat a lot)."""
        device = next(self.heads.parameters()).device
        if not self.config.text_tower.freeze:
            tok = self.text_tower.tokenize(texts)
            return self.text_tower(tok["input_ids"].to(device), tok["attention_mask"].to(device))[0]
        missing = sorted({t for t in texts if t not in self._text_cache})
        # in a training step under ZeRO-3 a forward gathers weights, so every rank must join it; outside
        # training (e.g. rank 0 evaluating alone) there is no lockstep and no collective
        if (_any_rank(bool(missing), device) if self.training else bool(missing)):
            missing = missing or texts[:1]
            with torch.no_grad():
                tok = self.text_tower.tokenize(missing)
                pooled = self.text_tower(tok["input_ids"].to(device), tok["attention_mask"].to(device))[0]
            for t, p in zip(missing, pooled.float()):
                self._text_cache[t] = p.detach()
        return torch.stack([self._text_cache[t] for t in texts]).to(device)

    @torch.no_grad()
    def set_text_center(self, texts: list[str]) -> None:
        """Centre text features on the mean text-tower output of `texts` (e.g. every candidate label's texts)."""
        was_training = self.training
        self.eval()
        pooled = torch.cat([self.text_pooled(texts[i:i + 64]).float() for i in range(0, len(texts), 64)])
        self.heads.text_center.copy_(pooled.mean(0).to(self.heads.text_center))
        self.train(was_training)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """The aligned, L2-normalised text embedding [B, embed_dim]."""
        pooled = self.text_pooled(texts)
        return self.heads.text_features(pooled.to(self.heads.text_proj.weight.dtype))

    # --- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict, step: int = 0, rank: int = 0, world_size: int = 1, seed: int = 0) -> dict:
        """All three losses and their weighted sum for one batch; randomness is seeded by (seed, step, rank)."""
        lo = self.config.loss
        device = next(self.heads.parameters()).device
        gen = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
        dtype = self.heads.text_proj.weight.dtype  # bf16 under DeepSpeed's bf16 mode
        gene_ids, values = batch["gene_ids"].to(device), batch["values"].to(device)
        pad = batch["padding_mask"].to(device)
        labels = batch["labels"].to(device) if lo.same_label_not_negative else None
        masked, mask = mask_values(values.cpu(), pad.cpu(), lo.mask_ratio, mask_value=self.encoding.mask_value,
                                   generator=gen)
        states = self.cell_tower(gene_ids, masked.to(device, dtype), pad)
        # the Q-Former does not see the masked genes: their states are trained to predict expression and
        # would become the cell's signature, which a cell at inference (nothing masked) does not have
        query = self.qformer(states, pad | mask.to(device))
        cell_f = self.heads.cell_features(query, states[:, 0]).float()
        texts = self._text_views(batch["text"], gen)
        if labels is not None:
            # a view shares nothing with another cell's text but what the cells share: unlike two captions of one
            # type, it is a true negative for the other cells of its type (label -1: never masked)
            views = torch.tensor([t != u for t, u in zip(texts, batch["text"])], device=device)
            labels = torch.where(views, torch.full_like(labels, -1), labels)
        text_f = self.text_features(texts).float()
        out = {"contrastive": contrastive_loss(cell_f, text_f, self.heads.get_logit_scale(), labels, rank, world_size)}
        if lo.query_contrastive > 0:
            out["query_contrastive"] = contrastive_loss(self.heads.cell_features(query).float(), text_f,
                                                        self.heads.get_logit_scale(), labels, rank, world_size)
        pred = self.expr_decoder(states)
        out["reconstruction"] = masked_expression_loss(pred.float(), values.float(), mask.to(device))
        out["matching"] = torch.zeros((), device=device)
        if lo.matching > 0:
            out["matching"] = self._matching_loss(states, pad | mask.to(device), cell_f, text_f, texts,
                                                  labels, gen)
        out["loss"] = lo.contrastive * out["contrastive"] + lo.matching * out["matching"] + \
            lo.reconstruction * out["reconstruction"] + lo.query_contrastive * out.get("query_contrastive", 0.0)
        return out

    def _text_views(self, texts: list[str], gen: torch.Generator) -> list[str]:
        """Each training text, or with probability ``loss.fact_view`` its programs, its genes or both alone (each
        as likely) in a random phrasing."""
        share = self.config.loss.fact_view
        if share <= 0:
            return list(texts)
        pick = (torch.rand(len(texts), generator=gen) < share).tolist()
        phrasing = torch.randint(len(FACT_TEMPLATES), (len(texts),), generator=gen).tolist()
        parts = torch.randint(len(FACT_VIEW_PARTS), (len(texts),), generator=gen).tolist()
        return [(fact_view(t, k, FACT_VIEW_PARTS[j]) if p else "") or t
                for t, p, k, j in zip(texts, pick, phrasing, parts)]

    def _matching_loss(self, states, pad, cell_f, text_f, texts, labels, gen) -> torch.Tensor:
        """Cell–text matching on the positives plus one hard negative per cell and per text (local batch)."""
        with torch.no_grad():
            sim = cell_f.float() @ text_f.float().t()
            neg_text, neg_cell = itm_hard_negatives(sim, sim.t(), labels, generator=gen)
        tok = self.text_tower.tokenize(texts, max_length=self.config.loss.matching_max_length)
        ids, attn = tok["input_ids"].to(states.device), tok["attention_mask"].to(states.device)
        n = states.shape[0]
        idx = torch.arange(n, device=states.device)
        keep_t, keep_c = neg_text >= 0, neg_cell >= 0
        limit = self.config.loss.matching_max_cells
        if 0 < limit < n:  # positives, negative texts and negative cells for the first `limit` items only
            idx = idx[:limit]
            keep_t, keep_c = keep_t[:limit], keep_c[:limit]
            neg_text, neg_cell, n = neg_text[:limit], neg_cell[:limit], limit
        cell_idx = torch.cat([idx, idx[keep_t], neg_cell[keep_c]])
        text_idx = torch.cat([idx, neg_text[keep_t], idx[keep_c]])
        targets = torch.cat([torch.ones(n), torch.zeros(int(keep_t.sum()) + int(keep_c.sum()))]).long()
        query, _ = self.qformer(states[cell_idx], pad[cell_idx], text_mask=attn[text_idx], text_input_ids=ids[text_idx])
        return itm_loss(self.heads.itm_logits(query).float(), targets.to(states.device))

    # --- folders ---------------------------------------------------------------------------------
    def _write(self, tmp: Path, corpus: Corpus | None = None) -> None:
        """The stage-1 folder (see the module docstring); ``corpus``: the training corpus, whose gene panel and
        labels go into the folder."""
        self.cell_tower.save_pretrained(tmp / "cell_tower", vocab=self.vocab, from_parent=TOWER_FROM_ENCODING)
        self.text_tower.model.save_pretrained(tmp / "text_tower")
        self.text_tower.tokenizer.save_pretrained(tmp / "text_tower")
        self.save_weights(tmp / WEIGHTS_FILE, {k: v for k, v in self.state_dict().items()
                                               if not k.startswith(("cell_tower.", "text_tower."))})
        self.encoding.save(tmp)
        if corpus is not None:
            write_corpus_facts(tmp, corpus)
        text_tower = {**asdict(self.config.text_tower), "path": "text_tower"}  # relative to the folder
        self.write_config(tmp, exclude=("cell_tower", "text_tower"), text_tower=text_tower)  # tower: cell_tower/

    @classmethod
    def _from_folder(cls, folder: Path, raw: dict, version: int) -> CellTextAligner:
        """Load a stage-1 model folder (eval mode); anything missing or undecodable is a ScmmError naming it."""
        raw.pop("cell_tower", None)  # format 2 kept a second copy of cell_tower/config.json here
        if not isinstance(raw.get("text_tower"), dict):
            raise ScmmError(f"{folder}/config.json is not a stage-1 model config (no text_tower)")
        raw["text_tower"]["path"] = str(folder / "text_tower")
        config = cls.read_config(AlignerConfig, folder, raw)
        encoding = CellEncoding.load(folder)
        vocab = stage1_vocab(folder)
        tower_options = {k: getattr(encoding, k) for k in TOWER_FROM_ENCODING}
        with reading(folder / "cell_tower", "cell tower folder"):
            cell_tower = CellTower.from_pretrained(folder / "cell_tower", **tower_options)
        if cell_tower.config.pad_value != encoding.pad_value:
            raise ScmmError(f"{folder}: the cell tower's pad_value {cell_tower.config.pad_value} is not the cell "
                            f"encoding's {encoding.pad_value}")
        with reading(folder / "text_tower", "text tower folder"):
            text_tower = TextTower(config.text_tower)
        with reading(folder / "config.json", "model config"):
            model = cls(config, vocab, encoding, cell_tower=cell_tower, text_tower=text_tower)
        state = cls.load_weights(folder / WEIGHTS_FILE)
        own = {k for k in model.state_dict() if not k.startswith(("cell_tower.", "text_tower."))}
        missing, unexpected = own - set(state), set(state) - own
        if missing or unexpected:
            raise ScmmError(f"{folder}/{WEIGHTS_FILE} does not match the model: missing "
                            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        with reading(folder / WEIGHTS_FILE, "weights file"):
            model.load_state_dict(state, strict=False)
        return model.eval()


def stage1_vocab(folder: str | Path) -> GeneVocab:
    """The gene vocabulary of a stage-1 model folder, without loading the model (format checked)."""
    folder = Path(folder)
    read_marker(folder, CellTextAligner.folder_format)
    return GeneVocab.load(folder / "cell_tower" / VOCAB_NAME)
