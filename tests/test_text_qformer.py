"""Text tower (offline all-MiniLM-L6-v2) and the Q-Former: shapes, padding, BERT init, ITM, backward."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from scmm.model.losses import contrastive_loss, itm_loss
from scmm.model.qformer import AlignmentHeads, QFormer, QFormerConfig
from scmm.model.text_tower import TextTower, TextTowerConfig, default_text_model_path

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tower():
    return TextTower(TextTowerConfig(max_length=32))


def _small_cfg(**kw):
    base = dict(num_queries=4, num_layers=3, hidden_size=32, num_heads=4, intermediate_size=64,
                cross_attention_freq=2, encoder_width=24, embed_dim=16, vocab_size=100, max_position_embeddings=64)
    base.update(kw)
    return QFormerConfig(**base)


def _cells(b=3, length=10, width=24, lengths=(10, 6, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, length, width, generator=g)
    padding = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]
    return states, padding


# ------------------------------------------------------------------------------------------ text tower

def test_default_text_model_path_is_a_local_bert_folder():
    path = default_text_model_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_text_tower_loads_offline_and_embeds(tower):
    assert tower.hidden_size == 384 and tower.num_layers == 6
    batch = tower.tokenize(["a CD4 T cell", "a B lymphocyte from blood"])
    assert set(batch) == {"input_ids", "attention_mask"}
    pooled, tokens = tower(batch["input_ids"], batch["attention_mask"])
    assert pooled.shape == (2, 384) and tokens.shape == (2, batch["input_ids"].shape[1], 384)

    emb = tower.encode(["A T cell is a type of lymphocyte.", "T cells are lymphocytes.",
                        "The stock market fell sharply today."], batch_size=2, normalize=True)
    assert emb.shape == (3, 384)
    similar, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert similar > unrelated + 0.2


def test_text_tower_config_validation():
    with pytest.raises(ValueError):
        TextTowerConfig(pooling="max")


# ------------------------------------------------------------------------------------------ Q-Former

def test_qformer_shapes_and_cross_attention_layers():
    qf = QFormer(_small_cfg()).eval()
    states, padding = _cells()
    out = qf(states, padding)
    assert out.shape == (3, 4, 32)
    assert [layer.cross_attn is not None for layer in qf.layers] == [True, False, True]
    assert qf(states, None).shape == (3, 4, 32)


def test_cell_padding_does_not_change_qformer_output():
    qf = QFormer(_small_cfg()).eval()
    states, padding = _cells()
    out = qf(states, padding)
    noisy = states.clone()
    noisy[padding] = torch.randn(int(padding.sum()), 24) * 100
    torch.testing.assert_close(qf(noisy, padding), out, rtol=1e-5, atol=1e-6)
    # a cell alone, without any padding, gives the same output as inside the padded batch
    alone = qf(states[2:3, :3], torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(alone, out[2:3], rtol=1e-5, atol=1e-6)


def test_itm_path_with_text_tokens_and_text_padding():
    qf = QFormer(_small_cfg()).eval()
    states, padding = _cells()
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    text_mask = torch.arange(7)[None, :] < torch.tensor([7, 5, 2])[:, None]
    ids[~text_mask] = 0
    q_out, t_out = qf(states, padding, text_input_ids=ids, text_mask=text_mask.long())
    assert q_out.shape == (3, 4, 32) and t_out.shape == (3, 7, 32)
    # same through text_embeds
    q2, _ = qf(states, padding, text_embeds=qf.embed_text(ids), text_mask=text_mask)
    torch.testing.assert_close(q2, q_out)
    # text changes the queries (they attend to it), padded text tokens do not
    assert not torch.allclose(q_out, qf(states, padding))
    other = ids.clone()
    other[~text_mask] = 55
    q3, t3 = qf(states, padding, text_input_ids=other, text_mask=text_mask)
    torch.testing.assert_close(q3, q_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t3[text_mask], t_out[text_mask], rtol=1e-5, atol=1e-6)


def test_backward_through_qformer_and_heads():
    cfg = _small_cfg()
    qf = QFormer(cfg).train()
    heads = AlignmentHeads(cfg.hidden_size, text_hidden_size=20, embed_dim=cfg.embed_dim)
    states, padding = _cells()
    states.requires_grad_(True)
    cell = heads.cell_features(qf(states, padding))
    text = heads.text_features(torch.randn(3, 20))
    assert cell.shape == (3, 16) and torch.allclose(cell.norm(dim=-1), torch.ones(3))
    ids = torch.randint(1, 100, (3, 5))
    q_itm, _ = qf(states, padding, text_input_ids=ids, text_mask=torch.ones(3, 5))
    logits = heads.itm_logits(q_itm)
    assert logits.shape == (3, 2)
    loss = contrastive_loss(cell, text, heads.get_logit_scale()) + itm_loss(logits, torch.ones(3, dtype=torch.long))
    loss.backward()
    for p in (qf.query_tokens, qf.layers[0].cross_attn.key.weight, qf.layers[1].ffn_text.output.weight,
              qf.word_embeddings.weight, heads.cell_proj.weight, heads.text_proj.weight, heads.itm_head.weight,
              heads.logit_scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert (states.grad[padding] == 0).all()   # no gradient flows into padding
    # the last layer's text outputs feed nothing (only query outputs are scored): zero, not missing, gradient
    assert qf.layers[-1].ffn_text.output.weight.grad.abs().sum() == 0


def test_logit_scale_init_and_clamp():
    heads = AlignmentHeads(8, 8, 4)
    assert heads.get_logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        heads.logit_scale.fill_(10.0)
    assert heads.get_logit_scale().item() == pytest.approx(100.0, rel=1e-5)


def test_init_from_bert_copies_matching_weights(tower):
    cfg = QFormerConfig.from_text_config(tower.model.config, num_layers=2, num_queries=4, encoder_width=16)
    assert (cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (384, 12, tower.model.config.vocab_size)
    qf = QFormer(cfg).eval()
    fresh_cross = qf.layers[0].cross_attn.query.weight.clone()
    copied = qf.init_from_bert(tower.model)
    bert = tower.model.state_dict()
    assert "layers.0.self_attn.query.weight" in copied and "layers.1.ffn_text.norm.bias" in copied
    assert not any("cross_attn" in n or n == "query_tokens" for n in copied)
    assert torch.equal(qf.layers[1].self_attn.value.weight, bert["encoder.layer.1.attention.self.value.weight"])
    assert torch.equal(qf.layers[0].ffn_query.intermediate.weight, bert["encoder.layer.0.intermediate.dense.weight"])
    assert torch.equal(qf.layers[0].ffn_text.intermediate.weight, bert["encoder.layer.0.intermediate.dense.weight"])
    assert torch.equal(qf.word_embeddings.weight, bert["embeddings.word_embeddings.weight"])
    assert torch.equal(qf.layers[0].cross_attn.query.weight, fresh_cross)
    # the Q-Former's text embeddings are BERT's (token type 0 folded into positions)
    ids = tower.tokenize(["a natural killer cell"])["input_ids"]
    tower.eval()
    with torch.no_grad():
        torch.testing.assert_close(qf.embed_text(ids), tower.model.embeddings(input_ids=ids), rtol=1e-5, atol=1e-5)
    # a text-conditioned pass runs at full size
    states = torch.randn(1, 6, 16)
    q_out, t_out = qf(states, torch.zeros(1, 6, dtype=torch.bool), text_input_ids=ids)
    assert q_out.shape == (1, 4, 384) and t_out.shape == (1, ids.shape[1], 384)
    assert math.isfinite(q_out.sum().item())
