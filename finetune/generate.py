"""Text -> pseudo-cells as an AnnData file: `scmm generate --model DIR --text "..." --n N --out OUT.h5ad [--seed S]`.

The model folder is a stage-2 folder (``runs/demo/stage2/model``) or a packaged scmm model with a stage-2 part.
The file holds ``X`` float32 ``[N, G]``: log1p-CP10k expression over the model's HVG panel (``var`` index: gene
symbols, ``var['vocab_id']``), ``obs['prompt']`` (the text), and ``uns['scmm_generate']`` (model, seed, noise,
normalisation). The same model, text, N and seed give the same file contents. Written atomically: a temporary
file beside ``OUT`` renamed into place, so bad input or a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from scmm.errors import ScmmError


def load_stage2(model_dir: str | Path):
    """A Stage2Model from a stage-2 folder or from a packaged model folder that has one."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ScmmError(f"model folder not found: {folder}")
    if (folder / "scmm_model.json").is_file():
        from scmm.model.folders import load_model
        return load_model(folder).stage2
    from scmm.model.stage2 import Stage2Model
    return Stage2Model.from_pretrained(folder)


def pseudocells_adata(model, texts: list[str], n: int, seed: int = 0, noise: float = 1.0):
    """AnnData of ``n`` pseudo-cells per text (text-major rows)."""
    import anndata as ad
    import pandas as pd
    x = model.generate_pseudocells(texts, n, seed=seed, noise=noise)
    prompts = [t for t in texts for _ in range(n)]
    obs = pd.DataFrame({"prompt": prompts, "pseudocell": np.tile(np.arange(n), len(texts))},
                       index=[f"pseudocell_{i}" for i in range(len(prompts))])
    symbols = [str(s) for s in model.hvg["symbols"]]
    var = pd.DataFrame({"feature_name": symbols, "vocab_id": np.asarray(model.hvg["vocab_ids"], dtype=np.int64)},
                       index=pd.Index(symbols, name="gene"))
    var.index = var.index.astype(str)
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var)
    adata.uns["scmm_generate"] = {"seed": int(seed), "n_per_text": int(n), "noise": float(noise),
                                  "normalization": "log1p_cp10k", "genes": "highly variable genes of the training corpus"}
    return adata


def generate_to_h5ad(model_dir: str | Path, text: str, n: int, out: str | Path, seed: int = 0,
                     noise: float = 1.0, overwrite: bool = False) -> Path:
    """Validate the inputs, generate, write ``out`` atomically; returns its path."""
    out = Path(out)
    if not isinstance(text, str) or not text.strip():
        raise ScmmError("--text must be a non-empty description")
    if n < 1:
        raise ScmmError(f"--n must be >= 1, got {n}")
    if n > 1_000_000:
        raise ScmmError(f"--n {n} is too many pseudo-cells for one file (at most 1000000)")
    if out.suffix != ".h5ad":
        raise ScmmError(f"--out must name a .h5ad file, not {out}")
    if out.exists() and not overwrite:
        raise ScmmError(f"output {out} already exists")
    if not out.parent.is_dir():
        raise ScmmError(f"output folder {out.parent} does not exist")
    if not noise >= 0:
        raise ScmmError(f"noise must be >= 0, got {noise}")
    model = load_stage2(model_dir)
    adata = pseudocells_adata(model, [" ".join(text.split())], n, seed=seed, noise=noise)
    adata.uns["scmm_generate"]["model"] = str(model_dir)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


__all__ = ["load_stage2", "pseudocells_adata", "generate_to_h5ad"]
