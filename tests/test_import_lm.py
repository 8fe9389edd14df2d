"""`scmm finetune import-lm`: a GGUF Llama (written here with the `gguf` package, as llama.cpp's converter does)
becomes a Hugging Face folder with the same weights, tokenizer and chat template."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from scmm.errors import ScmmError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["A T cell that expresses CD8 and is found in the blood of a healthy donor.",
         "A monocyte that expresses CD14, isolated from the blood.", "What is the cell type of this cell?",
         "A natural killer cell that can kill a variety of target cells."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's order of the rows of q/k projections (rotary halves interleaved), which transformers undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, architecture: str = "llama"):
    """A 2-layer Llama with tied embeddings and a byte-level BPE tokenizer with a ChatML template, as GGUF (F32);
    returns (the transformers model, the `tokenizers` tokenizer) it was written from."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=vocab["<|im_start|>"],
                         eos_token_id=vocab["<|im_end|>"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHATML)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                t = _permute(t, 4 if gg == "attn_q" else 2)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    model, tok = write_tiny_gguf(folder / "tiny.Q.gguf")
    return folder / "tiny.Q.gguf", model, tok


def test_import_keeps_weights_tokenizer_and_chat_template(tiny_gguf, tmp_path):
    from scmm.finetune.import_lm import SUMMARY_NAME, import_gguf
    from scmm.model.llm import load_lm
    path, original, tok = tiny_gguf
    out = import_gguf(path, tmp_path / "lm")
    model, tokenizer = load_lm(out)
    ref = original.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=0, msg=name)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    for text in TEXTS[:4] + ["an unseen phrasing: B lymphocytes?"]:
        assert tokenizer.encode(text, add_special_tokens=False) == tok.encode(text).ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["architecture"] == "llama" and summary["chat_template"] and "smoke_answer" in summary
    assert summary["parameters"] == sum(p.numel() for p in original.parameters())
    with torch.no_grad():  # the same logits as the model the file was written from
        ids = torch.tensor([tok.encode(TEXTS[0]).ids])
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_import_in_bfloat16_and_bad_input(tiny_gguf, tmp_path):
    from scmm.finetune.import_lm import import_gguf
    from scmm.model.llm import load_lm
    path, original, _ = tiny_gguf
    out = import_gguf(path, tmp_path / "lm16", dtype="bfloat16")
    model, _ = load_lm(out, torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.get_input_embeddings().weight.float(),
                               original.get_input_embeddings().weight.to(torch.bfloat16).float())
    with pytest.raises(ScmmError, match="exists"):
        import_gguf(path, tmp_path / "lm16")
    with pytest.raises(ScmmError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "x")
    (tmp_path / "text.gguf").write_text("not a gguf file")
    with pytest.raises(ScmmError, match="cannot read"):
        import_gguf(tmp_path / "text.gguf", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_import_lm(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    r = run_cli("finetune", "import-lm", "--gguf", str(path), "--out", str(tmp_path / "lm"))
    assert r.returncode == 0, r.stderr
    assert "wrote language model" in r.stdout and (tmp_path / "lm" / "config.json").is_file()
    r = run_cli("finetune", "import-lm", "--gguf", str(path), "--out", str(tmp_path / "lm"), "--dtype", "int8")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    r = run_cli("finetune")
    assert r.returncode == 2 and "needs --config" in r.stderr


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory):
    from scmm.finetune.import_lm import import_gguf
    return import_gguf(tiny_gguf[0], tmp_path_factory.mktemp("imported") / "lm")


def test_chat_layout_token_by_token(imported):
    """An instruction-tuned tokenizer: the question is the user's turn with the cell block in it, the answer the
    assistant's turn ended by eos (<|im_end|>); text -> cell puts the description in the user's turn and the cell
    block as the assistant's answer. `plain` keeps the base-model layout."""
    from scmm.model.llm import add_cell_tokens, load_lm
    from scmm.model.sequences import IGNORE_INDEX, SequenceBuilder
    model, tok = load_lm(imported)
    cells = add_cell_tokens(tok, model, 2)
    block = [cells.start_id, *cells.slot_ids, cells.end_id]

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    builder = SequenceBuilder(tok, cells, 64)
    assert builder.chat and tok.eos_token_id == end
    item = builder.cell_to_text("What type?", "A T cell")
    head = [start, *enc("user\n"), *block, *enc("What type?"), end, *enc("\n"), start, *enc("assistant\n")]
    assert item["input_ids"] == head + enc("A T cell") + [end]
    assert item["labels"] == [IGNORE_INDEX] * len(head) + enc("A T cell") + [end]
    assert [item["input_ids"][p] for p in item["slot_positions"]] == cells.slot_ids
    assert builder.cell_to_text("What type?", None)["input_ids"] == head  # the generation prompt
    t2c = builder.text_to_cell("A B cell.")
    assert t2c["input_ids"] == [start, *enc("user\n"), *enc("A B cell."), end, *enc("\n"), start,
                                *enc("assistant\n"), *block]
    assert [t2c["input_ids"][p] for p in t2c["slot_positions"]] == cells.slot_ids
    long = builder.text_to_cell("A cell. " * 100)  # the description is cut, never the template or the block
    assert len(long["input_ids"]) == 64 and long["input_ids"][-len(block):] == block
    plain = SequenceBuilder(tok, cells, 64, "plain").cell_to_text("What type?", "A T cell")
    assert not SequenceBuilder(tok, cells, 64, "plain").chat
    assert plain["input_ids"][:len(block) + 1] == [tok.bos_token_id, *block]
    with pytest.raises(ScmmError, match="prompt_format"):
        SequenceBuilder(tok, cells, 64, "chatml")


def test_tied_embeddings_train_the_cell_tokens_in_both_places(imported):
    """SmolLM2 ties its input embedding and output head: after adding the cell tokens and LoRA they stay tied, and
    a step moves the new rows of both (the same rows), none of the old ones."""
    from scmm.model.llm import LoraOptions, add_cell_tokens, apply_lora, load_lm, optimizer_param_groups
    from scmm.model.sequences import SequenceBuilder
    model, tok = load_lm(imported)
    n_old = model.get_input_embeddings().weight.shape[0]
    cells = add_cell_tokens(tok, model, 2)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.shape[0] == n_old + 4
    model = apply_lora(model, LoraOptions(r=2, alpha=4, dropout=0.0), cells.all_ids)
    builder = SequenceBuilder(tok, cells, 64)
    batch = builder.collate([builder.cell_to_text("What type?", "<cell_0> T cell")])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()

    def rows():
        with torch.no_grad():
            return emb(torch.arange(n_old + 4)[None])[0].clone(), head(torch.eye(32)).T.clone()
    e0, h0 = rows()
    opt = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.0), lr=1e-2)
    model.train()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    opt.step()
    e1, h1 = rows()
    assert torch.equal(e1[:n_old], e0[:n_old]) and torch.equal(h1[:n_old], h0[:n_old])
    assert (e1[n_old:] != e0[n_old:]).any(1).all() and torch.equal(e1[n_old:], h1[n_old:])
