"""Upstream scGPT as a parity reference for tests (never imported by the product).

scgpt 0.2.4 is installed with ``--no-deps``; importing it needs two modules that are not installed
here, so minimal stand-ins are put into ``sys.modules`` first (found by trying the import):

* ``torchtext`` / ``torchtext.vocab`` (``scgpt.tokenizer.gene_tokenizer`` subclasses
  ``torchtext.vocab.Vocab`` and calls ``torchtext.vocab.vocab``);
* ``IPython`` (``scgpt.utils.util`` imports ``get_ipython``).

Stand-ins are only added where the real module is missing (and a stand-in another test put there
first is kept). Upstream models are used for their ``TransformerModel``; nothing here touches the
tokenizer.

flash-attn is not installed either. To get genuine ``FlashTransformerEncoderLayer`` models (and
checkpoints whose attention is named ``self_attn.Wqkv.*`` by upstream itself) :func:`flash_stand_in`
temporarily gives ``scgpt.model.model`` a plain-PyTorch ``FlashMHA`` with flash-attn 1.x's parameter
layout (``Wqkv = Linear(d, 3d)`` split as ``'b s (three h d)'``, ``out_proj``) and behaviour (key padding
mask True = keep; padded query rows come back as zeros).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPECIALS = ("<pad>", "<cls>", "<eoc>")


def scgpt_installed() -> bool:
    return importlib.util.find_spec("scgpt") is not None


# --------------------------------------------------------------------------------------------------
# Importing upstream
# --------------------------------------------------------------------------------------------------


def _install_stand_ins() -> None:
    if "torchtext" not in sys.modules and importlib.util.find_spec("torchtext") is None:
        torchtext = types.ModuleType("torchtext")
        vocab_mod = types.ModuleType("torchtext.vocab")

        class Vocab:  # the base class of scgpt's GeneVocab; never instantiated here
            def __init__(self, vocab: Any = None) -> None:
                self.vocab = vocab

        def vocab(ordered_dict: Any, min_freq: int = 1, specials: Any = None, special_first: bool = True) -> Vocab:
            return Vocab(ordered_dict)

        vocab_mod.Vocab = Vocab
        vocab_mod.vocab = vocab
        torchtext.vocab = vocab_mod
        sys.modules["torchtext"] = torchtext
        sys.modules["torchtext.vocab"] = vocab_mod
    if "IPython" not in sys.modules and importlib.util.find_spec("IPython") is None:
        ipython = types.ModuleType("IPython")
        ipython.get_ipython = lambda: None
        sys.modules["IPython"] = ipython


def upstream_module() -> types.ModuleType:
    """``scgpt.model.model`` (imports scgpt with the stand-ins, which are removed again afterwards so that
    other libraries -- matplotlib probes ``IPython`` -- never see them)."""
    before = set(sys.modules)
    _install_stand_ins()
    stand_ins = {name for name in ("torchtext", "torchtext.vocab", "IPython") if name not in before}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash_attn is not installed", deprecations
            import scgpt.model.model as upstream
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return upstream


class FlashMHAStandIn(nn.Module):
    """flash-attn 1.x ``FlashMHA`` re-expressed in plain PyTorch (explicit softmax, no SDPA)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True,
                 attention_dropout: float = 0.0, causal: bool = False, device: Any = None, dtype: Any = None,
                 **kwargs: Any) -> None:
        super().__init__()
        assert batch_first and not causal
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout_p = attention_dropout
        self.Wqkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = False):
        b, s, _ = x.shape
        qkv = self.Wqkv(x).view(b, s, 3, self.num_heads, self.head_dim)  # 'b s (three h d) -> b s three h d'
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # b h s d
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if key_padding_mask is not None:  # True = keep
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        probs = F.dropout(scores.softmax(-1), self.dropout_p, self.training)
        context = (probs @ v).transpose(1, 2)  # b s h d
        if key_padding_mask is not None:  # flash unpads, so padded queries come back as zeros
            context = context.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
        return self.out_proj(context.reshape(b, s, self.embed_dim)), None


@contextlib.contextmanager
def flash_stand_in() -> Iterator[None]:
    upstream = upstream_module()
    saved = {name: getattr(upstream, name) for name in ("FlashMHA", "flash_attn_available") if hasattr(upstream, name)}
    upstream.FlashMHA = FlashMHAStandIn
    upstream.flash_attn_available = True
    try:
        yield
    finally:
        for name in ("FlashMHA", "flash_attn_available"):
            if name in saved:
                setattr(upstream, name, saved[name])
            else:
                delattr(upstream, name)


# --------------------------------------------------------------------------------------------------
# Small upstream models and checkpoint folders
# --------------------------------------------------------------------------------------------------


def make_vocab(n_genes: int = 100) -> dict[str, int]:
    """Genes first, specials last (as in scGPT's census vocab), so ``<pad>`` is not id 0."""
    vocab = {f"GENE{i}": i for i in range(n_genes)}
    for token in SPECIALS:
        vocab[token] = len(vocab)
    return vocab


def style_values(input_emb_style: str, n_bins: int = 51) -> dict[str, Any]:
    """pad/mask values and bin count per input style, following the scGPT tutorials."""
    if input_emb_style == "category":
        return {"pad_value": n_bins, "mask_value": n_bins + 1, "n_input_bins": n_bins + 2}
    return {"pad_value": -2, "mask_value": -1, "n_input_bins": n_bins}


def build_upstream_model(
    vocab: dict[str, int],
    input_emb_style: str = "continuous",
    d_model: int = 64,
    nhead: int = 4,
    d_hid: int = 128,
    nlayers: int = 2,
    n_bins: int = 51,
    dropout: float = 0.2,
    flash: bool = False,
    pre_norm: bool = False,
    explicit_zero_prob: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A small upstream ``TransformerModel`` in eval mode, every parameter randomised.

    Perturbing all parameters (LayerNorm weights, biases, the padding rows) makes a wrong key mapping
    show up in the outputs.
    """
    upstream = upstream_module()
    torch.manual_seed(seed)
    sv = style_values(input_emb_style, n_bins)
    kwargs = dict(
        ntoken=len(vocab), d_model=d_model, nhead=nhead, d_hid=d_hid, nlayers=nlayers, nlayers_cls=3, n_cls=1,
        vocab=vocab, dropout=dropout, pad_token="<pad>", pad_value=sv["pad_value"], do_mvc=True, do_dab=False,
        use_batch_labels=False, domain_spec_batchnorm=False, input_emb_style=input_emb_style,
        n_input_bins=sv["n_input_bins"], cell_emb_style="cls", explicit_zero_prob=explicit_zero_prob,
        use_fast_transformer=flash, fast_transformer_backend="flash", pre_norm=pre_norm,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if flash:
            with flash_stand_in():
                model = upstream.TransformerModel(**kwargs)
        else:
            model = upstream.TransformerModel(**kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def scgpt_args(model: nn.Module, vocab: dict[str, int], input_emb_style: str = "continuous",
               n_bins: int = 51, **extra: Any) -> dict[str, Any]:
    """args.json in upstream's style (the keys scGPT's pretraining script writes, plus noise)."""
    first_layer = model.transformer_encoder.layers[0]
    sv = style_values(input_emb_style, n_bins)
    args = {
        "data_source": "/path/to/cellxgene/scb_strict/human",
        "pad_token": "<pad>",
        "input_style": "binned",
        "input_emb_style": input_emb_style,
        "n_bins": n_bins,
        "max_seq_len": 1200,
        "mask_ratio": [0.25, 0.5, 0.75],
        "batch_size": 32,
        "lr": 0.0001,
        "fp16": True,
        "fast_transformer": bool(getattr(model, "use_fast_transformer", False)),
        "nlayers": len(model.transformer_encoder.layers),
        "nheads": first_layer.self_attn.num_heads,
        "embsize": model.d_model,
        "d_hid": first_layer.linear1.out_features,
        "dropout": first_layer.dropout.p,
        "n_layers_cls": 3,
        "mask_value": sv["mask_value"],
        "pad_value": sv["pad_value"],
        "MVC": True,
    }
    args.update(extra)
    return args


def to_wqkv_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``self_attn.in_proj_*`` to flash's ``self_attn.Wqkv.*`` (the inverse of upstream load_pretrained)."""
    return {k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight")
             .replace("self_attn.in_proj_bias", "self_attn.Wqkv.bias"): v for k, v in state.items()}


def write_scgpt_checkpoint(folder: Path, state: dict[str, Tensor], args: dict[str, Any], vocab: dict[str, int]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(args, indent=2))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2))
    torch.save({k: v.detach().clone() for k, v in state.items()}, folder / "best_model.pt")
    return folder


def make_scgpt_checkpoint(
    folder: Path,
    input_emb_style: str = "continuous",
    wqkv: bool = False,
    flash: bool = False,
    pre_norm: bool = False,
    explicit_zero_prob: bool = False,
    n_genes: int = 100,
    seed: int = 0,
    **model_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any], dict[str, int]]:
    """Build a small upstream model and write it as an scGPT checkpoint folder.

    ``wqkv=True`` renames attention keys to the flash layout; ``flash=True`` builds the model with
    upstream's ``FlashTransformerEncoderLayer`` (its keys are ``Wqkv`` natively). Returns
    ``(upstream_model, args, vocab)``.
    """
    vocab = make_vocab(n_genes)
    model = build_upstream_model(vocab, input_emb_style=input_emb_style, flash=flash, pre_norm=pre_norm,
                                 explicit_zero_prob=explicit_zero_prob, seed=seed, **model_kwargs)
    state = model.state_dict()
    if wqkv:
        state = to_wqkv_layout(state)
    extra = {"pre_norm": True} if pre_norm else {}
    args = scgpt_args(model, vocab, input_emb_style, **extra)
    write_scgpt_checkpoint(folder, state, args, vocab)
    return model, args, vocab


def make_batch(
    vocab: dict[str, int],
    lengths: tuple[int, ...] = (12, 7, 3, 10),
    input_emb_style: str = "continuous",
    n_bins: int = 51,
    max_len: int | None = None,
    seed: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """``<cls>`` + distinct random genes per cell, right-padded with ``<pad>`` / pad_value.

    Returns ``(gene_ids, values, padding_mask)``; ``lengths`` count the ``<cls>`` token.
    """
    g = torch.Generator().manual_seed(seed)
    n_genes = len(vocab) - len(SPECIALS)
    width = max_len or max(lengths)
    pad_value = style_values(input_emb_style, n_bins)["pad_value"]
    gene_ids = torch.full((len(lengths), width), vocab["<pad>"], dtype=torch.long)
    values = torch.full((len(lengths), width), float(pad_value))
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        gene_ids[row, 0] = vocab["<cls>"]
        gene_ids[row, 1:length] = torch.randperm(n_genes, generator=g)[: length - 1]
        if input_emb_style == "category":
            values[row, 0] = 0
            values[row, 1:length] = torch.randint(1, n_bins, (length - 1,), generator=g).float()
        else:
            values[row, 0] = float(pad_value)  # scGPT's cell_emb task puts pad_value at <cls>
            values[row, 1:length] = torch.rand(length - 1, generator=g) * 10
    padding_mask = gene_ids.eq(vocab["<pad>"])
    return gene_ids, values, padding_mask


__all__ = [
    "scgpt_installed",
    "upstream_module",
    "FlashMHAStandIn",
    "flash_stand_in",
    "make_vocab",
    "style_values",
    "build_upstream_model",
    "scgpt_args",
    "to_wqkv_layout",
    "write_scgpt_checkpoint",
    "make_scgpt_checkpoint",
    "make_batch",
]
