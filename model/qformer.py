"""BLIP-2-style Q-Former between the cell tower and the text / LLM side, and the stage-1 alignment heads.

Design (one choice each, kept simple):

* ``num_queries`` learned query tokens [Q, H] go through BERT-style post-LN layers. Every layer has
  self-attention and a feed-forward block; every ``cross_attention_freq``-th layer (layers 0, 2, 4, ... for 2)
  also has cross-attention from the queries to the cell tower's per-gene outputs. Attention is
  ``torch.nn.functional.scaled_dot_product_attention``.
* Cell features (contrastive, retrieval, FAISS): only queries are in the sequence. Cross-attention never
  attends to cell padding (``cell_padding_mask`` True = pad); columns that are padding in every row are
  trimmed before any compute.
* Cell–text matching (ITM): the sequence is [queries; text tokens] with the BLIP-2 ITM bidirectional mask:
  every position attends to all queries and to all real (non-padding) text tokens. Only the queries
  cross-attend to the cell. Queries and text tokens have separate feed-forward blocks (``ffn_query`` and
  ``ffn_text``, both initialised from BERT's FFN), as in BLIP-2.
* Text tokens for ITM come from the Q-Former's own embedding layer (word + absolute position embeddings +
  LayerNorm), initialised from the text tower's BERT embeddings by ``init_from_bert`` (BLIP-2 does the same);
  ``embed_text(input_ids)`` gives them, or pass ``text_input_ids=`` to ``forward``. The token ids are the text
  tower's tokenizer's ids, so the Q-Former's vocabulary must match the text tower's (``from_text_config``).
  The queries get the same embedding LayerNorm (BLIP-2 normalises [queries; text] together).
* Heads (``AlignmentHeads``, also here): ``cell_proj`` over query outputs, ``text_proj`` over the text tower's
  pooled output, ``itm_head`` over query outputs, learnable ``logit_scale``. The cell feature is the
  L2-normalised MEAN over queries of the projected query outputs (one vector per cell, which FAISS can index);
  the ITM logit is the mean over queries of ``itm_head`` (as BLIP-2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QFormerConfig:
    """The Q-Former's shape. Sizes at 0 are taken from the text tower (BERT width, heads, FFN, vocabulary,
    positions) and ``encoder_width`` from the cell tower when the stage-1 model is built
    (:meth:`resolved`)."""

    num_queries: int = 32
    num_layers: int = 6
    cross_attention_freq: int = 2     # cross-attention in layers 0, freq, 2*freq, ...
    embed_dim: int = 256              # contrastive projection dim
    dropout: float = 0.1
    init_from_text: bool = True       # copy the text tower's BERT weights where shapes match (BLIP-2)
    # with init_from_text, the token embedding table stays the text tower's: only the captions' few hundred tokens
    # would learn, while AdamW rewrites the whole table (30k x 384 for MiniLM) every step (BENCHMARKS.md)
    freeze_word_embeddings: bool = True
    cls_shortcut: bool = True         # add the projected <cls> output to the cell feature (see AlignmentHeads)
    hidden_size: int = 0              # 0: the text tower's (all-MiniLM-L6-v2: 384)
    num_heads: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0               # text embedding table (must match the text tower's tokenizer)
    max_position_embeddings: int = 0
    layer_norm_eps: float = 1e-12     # BERT's
    encoder_width: int = 0            # 0: the cell tower's d_model
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError("cross_attention_freq must be >= 1")
        if self.num_queries < 1 or self.num_layers < 1:
            raise ValueError("num_queries and num_layers must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def resolved(self, text_config, encoder_width: int) -> QFormerConfig:
        """A copy with the unset sizes taken from a transformers BERT config and the cell tower's width."""
        derived = dict(hidden_size=text_config.hidden_size, num_heads=text_config.num_attention_heads,
                       intermediate_size=text_config.intermediate_size, vocab_size=text_config.vocab_size,
                       max_position_embeddings=text_config.max_position_embeddings, encoder_width=encoder_width)
        return replace(self, **{k: v for k, v in derived.items() if not getattr(self, k)})

    @classmethod
    def from_text_config(cls, text_config, **overrides) -> QFormerConfig:
        """Match a transformers BERT config (``text_tower.model.config``), its layer count included;
        ``overrides`` win (e.g. encoder_width, num_queries)."""
        overrides.setdefault("num_layers", text_config.num_hidden_layers)
        return cls(**overrides).resolved(text_config, overrides.get("encoder_width", 0))

    def to_dict(self) -> dict:
        return asdict(self)


def _key_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, K] bool (True = may be attended) -> [B, 1, 1, K] SDPA mask. A row with no valid key attends to all
    of them instead (finite output instead of NaN; such rows carry no information anyway)."""
    valid = valid | ~valid.any(dim=-1, keepdim=True)
    return valid[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention + output dense + dropout + residual + post-LayerNorm (BERT's BertAttention)."""

    def __init__(self, hidden: int, kv_width: int, heads: int, dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        return x.view(b, n, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        a = a.transpose(1, 2).reshape(x.shape)
        return self.norm(x + F.dropout(self.dense(a), p, self.training))


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear -> dropout -> residual -> post-LayerNorm (BERT's intermediate + output)."""

    def __init__(self, hidden: int, intermediate: int, dropout: float, eps: float):
        super().__init__()
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.output(F.gelu(self.intermediate(x)))
        return self.norm(x + F.dropout(y, self.dropout, self.training))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross: bool):
        super().__init__()
        h, eps, p = cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout
        self.self_attn = Attention(h, h, cfg.num_heads, p, eps)
        self.cross_attn = Attention(h, cfg.encoder_width, cfg.num_heads, p, eps) if has_cross else None
        self.ffn_query = FeedForward(h, cfg.intermediate_size, p, eps)
        self.ffn_text = FeedForward(h, cfg.intermediate_size, p, eps)

    def forward(self, x, num_queries, self_mask, cell_states, cell_mask):
        x = self.self_attn(x, x, self_mask)
        q, t = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            q = self.cross_attn(q, cell_states, cell_mask)
        q = self.ffn_query(q)
        if t.shape[1] == 0:
            return q
        return torch.cat([q, self.ffn_text(t)], dim=1)


class QFormer(nn.Module):
    """Learned queries that read the cell tower's per-gene outputs (see the module docstring)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        if not (config.hidden_size and config.num_heads and config.intermediate_size and config.vocab_size
                and config.max_position_embeddings and config.encoder_width):
            raise ValueError("the Q-Former config has unset sizes: resolve it against the text tower first")
        self.config = cfg = config
        self.query_tokens = nn.Parameter(torch.zeros(cfg.num_queries, cfg.hidden_size))
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, has_cross=(i % cfg.cross_attention_freq == 0)) for i in range(cfg.num_layers))
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=cfg.initializer_range)

    def _init_weights(self, m: nn.Module):
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text token ids [B, T] -> Q-Former text embeddings [B, T, H] (word + position, LayerNorm, dropout)."""
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"text length {t} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        return F.dropout(self.embed_norm(x), self.config.dropout, self.training)

    def forward(self, cell_states: torch.Tensor, cell_padding_mask: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                text_input_ids: torch.Tensor | None = None):
        """Run the Q-Former.

        cell_states [B, L, encoder_width]: the cell tower's per-gene outputs.
        cell_padding_mask [B, L] bool, True = padding (never attended). None = no padding.
        text_embeds [B, T, H] (from ``embed_text``) or text_input_ids [B, T]: optional text for the ITM path.
        text_mask [B, T]: 1/True = real token (the tokenizer's attention_mask); None = all real.

        Returns query_out [B, Q, H] without text, or (query_out [B, Q, H], text_out [B, T, H]) with text.
        """
        cfg = self.config
        b = cell_states.shape[0]
        if cell_padding_mask is not None:
            cell_padding_mask = cell_padding_mask.to(torch.bool)
            # never compute on columns that are padding in every row (right padding is the common case)
            used = (~cell_padding_mask).any(dim=0).nonzero()
            keep = int(used.max()) + 1 if used.numel() else 1
            if keep < cell_states.shape[1]:
                cell_states, cell_padding_mask = cell_states[:, :keep], cell_padding_mask[:, :keep]
            cell_mask = _key_mask(~cell_padding_mask)
        else:
            cell_mask = None

        queries = self.query_tokens.unsqueeze(0).expand(b, -1, -1)
        x = F.dropout(self.embed_norm(queries), cfg.dropout, self.training)
        has_text = text_embeds is not None or text_input_ids is not None
        self_mask = None
        if has_text:
            if text_embeds is None:
                text_embeds = self.embed_text(text_input_ids)
            t = text_embeds.shape[1]
            x = torch.cat([x, text_embeds.to(x.dtype)], dim=1)
            if text_mask is not None:
                valid = torch.cat([torch.ones(b, cfg.num_queries, dtype=torch.bool, device=x.device),
                                   text_mask.to(device=x.device, dtype=torch.bool)], dim=1)
                self_mask = _key_mask(valid)
        for layer in self.layers:
            x = layer(x, cfg.num_queries, self_mask, cell_states, cell_mask)
        if not has_text:
            return x
        return x[:, :cfg.num_queries], x[:, cfg.num_queries:cfg.num_queries + t]

    @torch.no_grad()
    def init_from_bert(self, bert_model) -> list[str]:
        """Copy a transformers BERT encoder's weights where shapes match; returns the Q-Former parameter names
        that were copied. Copied: text embeddings (word, position, LayerNorm; BERT's token-type-0 embedding is
        folded into the position table, so embeddings equal BERT's), and per layer ``i < bert layers``:
        self-attention (q, k, v, output dense, LayerNorm) and the FFN into both ``ffn_query`` and ``ffn_text``.
        Query tokens and cross-attention stay freshly initialised."""
        sd = {k: v for k, v in bert_model.state_dict().items()}
        if any(k.startswith("bert.") for k in sd):  # a BertFor... model: use its encoder's keys
            sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
        pairs: dict[str, torch.Tensor] = {}
        pairs["word_embeddings.weight"] = sd.get("embeddings.word_embeddings.weight")
        pos = sd.get("embeddings.position_embeddings.weight")
        tt = sd.get("embeddings.token_type_embeddings.weight")
        if pos is not None and tt is not None:
            pos = pos + tt[0]
        pairs["position_embeddings.weight"] = pos
        pairs["embed_norm.weight"] = sd.get("embeddings.LayerNorm.weight")
        pairs["embed_norm.bias"] = sd.get("embeddings.LayerNorm.bias")
        for i in range(len(self.layers)):
            src = f"encoder.layer.{i}."
            for dst, s in [("self_attn.query", "attention.self.query"), ("self_attn.key", "attention.self.key"),
                           ("self_attn.value", "attention.self.value"), ("self_attn.dense", "attention.output.dense"),
                           ("self_attn.norm", "attention.output.LayerNorm")]:
                for p in ("weight", "bias"):
                    pairs[f"layers.{i}.{dst}.{p}"] = sd.get(f"{src}{s}.{p}")
            for ffn in ("ffn_query", "ffn_text"):
                for dst, s in [("intermediate", "intermediate.dense"), ("output", "output.dense"),
                               ("norm", "output.LayerNorm")]:
                    for p in ("weight", "bias"):
                        pairs[f"layers.{i}.{ffn}.{dst}.{p}"] = sd.get(f"{src}{s}.{p}")
        own = dict(self.named_parameters())
        copied = []
        for name, value in pairs.items():
            if value is not None and name in own and own[name].shape == value.shape:
                own[name].copy_(value.to(own[name].dtype))
                copied.append(name)
        return copied


class AlignmentHeads(nn.Module):
    """Stage-1 heads: contrastive projections, ITM classifier and the learnable temperature.

    ``cell_features(query_out)``: L2-normalised mean over queries of ``cell_proj(query_out)`` -> [B, embed_dim].
    ``text_features(text_pooled)``: L2-normalised ``text_proj(text tower pooled output)`` -> [B, embed_dim].
    ``itm_logits(query_out_itm)``: mean over queries of ``itm_head`` -> [B, 2] (class 1 = matching pair).
    ``logit_scale``: log(1/0.07) at init; ``get_logit_scale()`` = exp(logit_scale) clamped at 100 (CLIP).
    """

    def __init__(self, hidden_size: int, text_hidden_size: int, embed_dim: int = 256,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, cell_width: int | None = None):
        super().__init__()
        self.cell_proj = nn.Linear(hidden_size, embed_dim)
        # the cell tower's <cls> output, projected and added to the query features: a direct path that carries
        # the cell's identity from the first steps, while the freshly initialised cross-attention catches up
        # (without it, a from-scratch tower + Q-Former collapsed to one feature for all cells on small data)
        self.cls_proj = nn.Linear(cell_width, embed_dim) if cell_width else None
        self.text_proj = nn.Linear(text_hidden_size, embed_dim)
        # subtracted from the text tower's output before the projection: sentence embeddings of texts from one
        # domain share a large common component (cosine ~0.9 between cell types), which a fresh projection
        # would otherwise spend many steps learning to ignore; set by CellTextAligner.set_text_center
        self.register_buffer("text_center", torch.zeros(text_hidden_size))
        self.itm_head = nn.Linear(hidden_size, 2)
        # shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as bytes, which 0-dim tensors cannot be
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def cell_features(self, query_out: torch.Tensor, cell_cls: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.cell_proj(query_out).mean(dim=1)
        if self.cls_proj is not None and cell_cls is not None:
            feats = feats + self.cls_proj(cell_cls)
        return F.normalize(feats, dim=-1)

    def text_features(self, text_pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_pooled - self.text_center.to(text_pooled.dtype)), dim=-1)

    def itm_logits(self, query_out: torch.Tensor) -> torch.Tensor:
        return self.itm_head(query_out).mean(dim=1)

    def get_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp().squeeze(0)
