"""Cell tower and expression decoder: parity with upstream scGPT, checkpoint loading, numerics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scgpt_reference as ref
from scmm.model.cell_tower import CellTower, CellTowerConfig
from scmm.model.expr_decoder import ExprDecoder
from scmm.model.scgpt import decoder_from_scgpt, load_scgpt_state, tower_from_scgpt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-5


@pytest.fixture(scope="module")
def upstream():
    if not ref.scgpt_installed():
        pytest.skip("scgpt is not installed (pip install --no-deps scgpt==0.2.4): no upstream parity reference")
    return ref.upstream_module()


@pytest.fixture(scope="module")
def continuous_ckpt(upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scgpt_continuous")
    model, args, vocab = ref.make_scgpt_checkpoint(folder, input_emb_style="continuous")
    return folder, model, vocab


def small_tower(**overrides) -> CellTower:
    torch.manual_seed(0)
    cfg = dict(vocab_size=103, pad_token_id=100, d_model=32, nhead=4, d_hid=64, nlayers=2, dropout=0.0)
    cfg.update(overrides)
    return CellTower(CellTowerConfig(**cfg)).eval()


def assert_parity(upstream_model, tower, batch, decoder=None):
    gene_ids, values, padding_mask = batch
    keep = ~padding_mask
    with torch.no_grad():
        ref_hidden = upstream_model._encode(gene_ids, values, padding_mask)
        ref_out = upstream_model(gene_ids, values, padding_mask)
        hidden = tower(gene_ids, values, padding_mask)
        cell = tower.cell_embedding(gene_ids, values, padding_mask)
    assert hidden.shape == ref_hidden.shape
    assert (cell - ref_hidden[:, 0]).abs().max().item() < TOL
    assert (cell - ref_out["cell_emb"]).abs().max().item() < TOL
    assert (hidden - ref_hidden)[keep].abs().max().item() < TOL
    assert torch.all(hidden[padding_mask] == 0)
    if decoder is not None:
        with torch.no_grad():
            pred = decoder(hidden)
        assert pred.shape == gene_ids.shape
        assert (pred - ref_out["mlm_output"])[keep].abs().max().item() < TOL


# ---------------------------------------------------------------------------------------------------
# parity with upstream scGPT
# ---------------------------------------------------------------------------------------------------


def test_parity_continuous(continuous_ckpt):
    folder, upstream_model, vocab = continuous_ckpt
    tower, loaded_vocab = tower_from_scgpt(folder, allow_missing_heads=True)
    assert loaded_vocab == vocab
    assert tower.config.pad_token_id == vocab["<pad>"] == 100
    assert (tower.config.d_model, tower.config.nhead, tower.config.d_hid, tower.config.nlayers) == (64, 4, 128, 2)
    assert tower.config.input_emb_style == "continuous" and tower.config.pad_value == -2.0
    tower.eval()
    decoder = decoder_from_scgpt(folder).eval()
    batch = ref.make_batch(vocab)
    batch[1][0, 3] = 700.0  # above max_value: both clamp to 512
    assert_parity(upstream_model, tower, batch, decoder)


def test_parity_upstream_slow_path(continuous_ckpt):
    """With grad enabled upstream skips the nested-tensor fast path; compare that path too."""
    folder, upstream_model, vocab = continuous_ckpt
    tower, _ = tower_from_scgpt(folder, allow_missing_heads=True)
    tower.eval()
    gene_ids, values, padding_mask = ref.make_batch(vocab, lengths=(9, 4, 6))
    ref_hidden = upstream_model._encode(gene_ids, values, padding_mask).detach()
    hidden = tower(gene_ids, values, padding_mask).detach()
    assert (hidden - ref_hidden)[~padding_mask].abs().max().item() < TOL


def test_parity_category(upstream, tmp_path):
    upstream_model, args, vocab = ref.make_scgpt_checkpoint(tmp_path, input_emb_style="category", seed=3)
    tower, _ = tower_from_scgpt(tmp_path, allow_missing_heads=True)
    assert tower.config.input_emb_style == "category"
    assert tower.config.n_input_bins == 53 and tower.config.pad_value == 51
    tower.eval()
    assert_parity(upstream_model, tower, ref.make_batch(vocab, input_emb_style="category"),
                  decoder_from_scgpt(tmp_path))


def test_parity_wqkv_renamed_checkpoint(upstream, tmp_path):
    upstream_model, _, vocab = ref.make_scgpt_checkpoint(tmp_path, wqkv=True, seed=4)
    keys = torch.load(tmp_path / "best_model.pt", weights_only=True).keys()
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in keys
    assert not any("in_proj" in k for k in keys)
    assert load_scgpt_state(tmp_path).flash_attention
    tower, _ = tower_from_scgpt(tmp_path, allow_missing_heads=True)
    assert_parity(upstream_model, tower.eval(), ref.make_batch(vocab))


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_norm", "pre_norm"])
def test_parity_upstream_flash_layers(upstream, tmp_path, pre_norm):
    """Upstream FlashTransformerEncoderLayer (with a plain-torch FlashMHA stand-in) writes Wqkv keys itself."""
    upstream_model, args, vocab = ref.make_scgpt_checkpoint(tmp_path, flash=True, pre_norm=pre_norm, seed=5)
    assert type(upstream_model.transformer_encoder.layers[0]).__name__ == "FlashTransformerEncoderLayer"
    assert "transformer_encoder.layers.1.self_attn.Wqkv.bias" in upstream_model.state_dict()
    tower, _ = tower_from_scgpt(tmp_path, allow_missing_heads=True)
    assert tower.config.pre_norm is pre_norm
    assert_parity(upstream_model, tower.eval(), ref.make_batch(vocab, lengths=(11, 5, 8)), decoder_from_scgpt(tmp_path))


def test_expr_decoder_explicit_zero_prob_parity(upstream, tmp_path):
    upstream_model, _, vocab = ref.make_scgpt_checkpoint(tmp_path, explicit_zero_prob=True, seed=6)
    tower, _ = tower_from_scgpt(tmp_path, allow_missing_heads=True)
    decoder = decoder_from_scgpt(tmp_path)
    assert decoder.config.explicit_zero_prob
    gene_ids, values, padding_mask = ref.make_batch(vocab)
    with torch.no_grad():
        out = upstream_model(gene_ids, values, padding_mask)
        pred, zero_probs = decoder(tower.eval()(gene_ids, values, padding_mask), return_zero_probs=True)
    keep = ~padding_mask
    assert (pred - out["mlm_output"])[keep].abs().max().item() < TOL
    assert (zero_probs - out["mlm_zero_probs"])[keep].abs().max().item() < TOL


# ---------------------------------------------------------------------------------------------------
# strict loading of scGPT checkpoints
# ---------------------------------------------------------------------------------------------------


def _rewrite_state(folder: Path, edit) -> None:
    state = torch.load(folder / "best_model.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "best_model.pt")


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("args.json", "vocab.json", "best_model.pt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_strict_rejects_heads_unless_allowed(continuous_ckpt):
    folder = continuous_ckpt[0]
    with pytest.raises(ValueError) as err:
        tower_from_scgpt(folder)
    msg = str(err.value)
    assert "decoder.fc.0.weight" in msg and "mvc_decoder." in msg and "cls_decoder." in msg
    assert "allow_missing_heads" in msg
    tower, _ = tower_from_scgpt(folder, allow_missing_heads=True)
    assert isinstance(tower, CellTower)


def test_strict_unknown_key_named(continuous_ckpt, tmp_path):
    folder = _copy_ckpt(continuous_ckpt[0], tmp_path / "ckpt")
    _rewrite_state(folder, lambda s: s.__setitem__("mystery_module.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"mystery_module\.weight"):
        tower_from_scgpt(folder, allow_missing_heads=True)
    tower, _ = tower_from_scgpt(folder, strict=False)  # lenient: logged and skipped
    assert isinstance(tower, CellTower)


def test_strict_missing_key_named(continuous_ckpt, tmp_path):
    folder = _copy_ckpt(continuous_ckpt[0], tmp_path / "ckpt")
    _rewrite_state(folder, lambda s: s.pop("transformer_encoder.layers.1.norm2.bias"))
    with pytest.raises(ValueError, match=r"transformer_encoder\.layers\.1\.norm2\.bias"):
        tower_from_scgpt(folder, allow_missing_heads=True)


def test_inconsistent_args_rejected(continuous_ckpt, tmp_path):
    folder = _copy_ckpt(continuous_ckpt[0], tmp_path / "ckpt")
    args = json.loads((folder / "args.json").read_text())
    args["embsize"] = 128
    (folder / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match="d_model"):
        tower_from_scgpt(folder, allow_missing_heads=True)


def test_args_variants_and_appended_specials(upstream, tmp_path):
    """args.json with alternative key names; vocab.json without specials gets them appended (as upstream)."""
    vocab = {f"GENE{i}": i for i in range(100)}
    model = ref.build_upstream_model(ref.make_vocab(100))
    args = {"d_model": 64, "nhead": 4, "n_layers": 2, "dim_feedforward": 128, "dropout": 0.1}
    ref.write_scgpt_checkpoint(tmp_path, model.state_dict(), args, vocab)
    tower, loaded_vocab = tower_from_scgpt(tmp_path, allow_missing_heads=True, dropout=0.0)
    assert [loaded_vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [100, 101, 102]
    assert tower.config.dropout == 0.0 and tower.config.pad_value == -2.0
    assert_parity(model, tower.eval(), ref.make_batch(ref.make_vocab(100)))


# ---------------------------------------------------------------------------------------------------
# native checkpoints, config
# ---------------------------------------------------------------------------------------------------


def test_save_from_pretrained_round_trip(tmp_path):
    tower = small_tower(input_emb_style="category", n_input_bins=53, pad_value=51)
    batch = ref.make_batch(ref.make_vocab(100), input_emb_style="category")
    out = tower(*batch)
    folder = tmp_path / "tower"
    tower.save_pretrained(folder, vocab=ref.make_vocab(100))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    loaded = CellTower.from_pretrained(folder).eval()
    assert loaded.config == tower.config
    assert torch.equal(loaded(*batch), out)
    # saving again replaces the folder whole (no stale file of an earlier model survives), no temp dirs left
    (folder / "stale.txt").write_text("from an earlier model")
    tower.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["tower"]
    assert torch.equal(CellTower.from_pretrained(folder).eval()(*batch), out)


def test_from_pretrained_rejects_bad_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    tower = small_tower()
    tower.save_pretrained(tmp_path / "t")
    state = load_file(str(tmp_path / "t" / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    del state["layers.0.norm1.weight"]
    save_file(state, str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.weight.*layers\.0\.norm1\.weight"):
        CellTower.from_pretrained(tmp_path / "t")


def test_expr_decoder_round_trip(tmp_path):
    torch.manual_seed(0)
    decoder = ExprDecoder(32).eval()
    hidden = torch.randn(2, 5, 32)
    decoder.save_pretrained(tmp_path / "dec")
    assert torch.equal(ExprDecoder.from_pretrained(tmp_path / "dec")(hidden), decoder(hidden))
    assert decoder(hidden).shape == (2, 5)


def test_config_dict_round_trip_and_unknown_keys():
    from scmm.errors import ScmmError
    from scmm.model.pretrained import config_from_dict, config_to_dict
    cfg = CellTowerConfig(vocab_size=10, pad_token_id=0, d_model=16, nhead=2)
    assert config_from_dict(CellTowerConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ScmmError, match="bogus_key"):
        config_from_dict(CellTowerConfig, {**config_to_dict(cfg), "bogus_key": 1})
    with pytest.raises(ValueError, match="divisible"):
        CellTowerConfig(vocab_size=10, pad_token_id=0, d_model=30, nhead=4)
    with pytest.raises(ValueError, match="input_emb_style"):
        CellTowerConfig(vocab_size=10, pad_token_id=0, input_emb_style="scaling")


# ---------------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------------


def test_padding_rows_and_columns():
    tower = small_tower()
    vocab = ref.make_vocab(100)
    gene_ids, values, padding_mask = ref.make_batch(vocab, lengths=(6, 0, 4), max_len=9)
    out = tower(gene_ids, values, padding_mask)
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0)  # fully padded row: zeros, no NaN
    # extra all-padding columns change nothing (they are dropped before the encoder)
    short = tower(gene_ids[:, :6], values[:, :6], padding_mask[:, :6])
    assert torch.allclose(out[:, :6], short, atol=1e-6)
    # a batch of nothing but padding
    empty = tower(gene_ids[1:2], values[1:2], padding_mask[1:2])
    assert empty.shape == (1, 9, 32) and torch.all(empty == 0)
    # each cell is independent of the others in its batch
    alone = tower(gene_ids[2:3, :4], values[2:3, :4], padding_mask[2:3, :4])
    assert torch.allclose(out[2, :4], alone[0], atol=1e-5)
    # no mask given = nothing is padding
    assert torch.allclose(tower(gene_ids[:1, :6], values[:1, :6]), out[:1, :6], atol=1e-6)


def test_fully_padded_row_no_nan_in_training():
    tower = small_tower(dropout=0.1).train()
    gene_ids, values, padding_mask = ref.make_batch(ref.make_vocab(100), lengths=(5, 0))
    out = tower(gene_ids, values, padding_mask)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)


def test_bf16_autocast_close_to_fp32():
    tower = small_tower()
    batch = ref.make_batch(ref.make_vocab(100))
    with torch.no_grad():
        fp32 = tower.cell_embedding(*batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = tower.cell_embedding(*batch)
    assert torch.isfinite(bf16).all()
    assert (bf16.float() - fp32).abs().max().item() < 0.1
    cos = torch.nn.functional.cosine_similarity(bf16.float(), fp32, dim=-1)
    assert cos.min().item() > 0.99
    # weights in bf16 (inference without autocast) also runs; fp32 values are cast inside
    tower.to(torch.bfloat16)
    with torch.no_grad():
        pure = tower.cell_embedding(*batch)
    assert pure.dtype == torch.bfloat16 and (pure.float() - fp32).abs().max().item() < 0.1


def test_gradient_checkpointing_same_gradients():
    batch = ref.make_batch(ref.make_vocab(100))
    grads = []
    for ckpt in (False, True):
        tower = small_tower().train()
        if ckpt:
            tower.gradient_checkpointing_enable()
        tower(*batch).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_category_values_out_of_range():
    tower = small_tower(input_emb_style="category", n_input_bins=53, pad_value=51)
    gene_ids, values, padding_mask = ref.make_batch(ref.make_vocab(100), input_emb_style="category")
    values[0, 1] = -2
    with pytest.raises(ValueError, match="bin indices"):
        tower(gene_ids, values, padding_mask)


def test_product_does_not_import_scgpt():
    code = "import sys, scmm.model.scgpt, scmm.api, scmm.cli; sys.exit('scgpt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_inference_groups_cells_by_length_exactly():
    """Without gradient, cells of similar length run together without padding work: the same states as the
    padded path, also for padding that is not at the end of a row; every group wastes at most GROUP_WASTE."""
    from scmm.model.cell_tower import GROUP_WASTE, length_groups
    tower = small_tower()
    lengths = (40, 3, 39, 20, 1, 38, 21, 0)
    gene_ids, values, padding_mask = ref.make_batch(ref.make_vocab(100), lengths=lengths, max_len=44)
    perm = torch.randperm(44, generator=torch.Generator().manual_seed(0))  # padding scattered inside rows
    perm = torch.cat([torch.tensor([0]), perm[perm != 0]])
    gene_ids, values, padding_mask = gene_ids[:, perm], values[:, perm], padding_mask[:, perm]
    with torch.enable_grad():
        padded = tower(gene_ids, values, padding_mask).detach()
    with torch.no_grad():
        grouped = tower(gene_ids, values, padding_mask)
    assert torch.allclose(grouped, padded, atol=1e-5) and torch.all(grouped[padding_mask] == 0)
    groups = length_groups(torch.tensor(lengths), GROUP_WASTE)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    for rows in groups:
        n = torch.tensor(lengths)[rows]
        assert n.sum() >= (1 - GROUP_WASTE) * n.max() * len(n)
    assert [r.tolist() for r in groups][:2] == [[0, 2, 5], [6, 3]]
