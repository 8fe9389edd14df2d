"""`scmm explore`'s HTTP routes through starlette's TestClient: every route's answer checked against what the
Python API computes on the same cells, and every refusal (a 4xx JSON error, nothing done)."""
from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from explore_fixtures import XSS, aligned_embeddings, build_package, explore_adata

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient

TOKEN = "a-test-token-of-24-chars"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("explore")


@pytest.fixture(scope="module")
def models(work: Path) -> tuple[Path, Path]:
    return build_package(work / "model")


@pytest.fixture(scope="module")
def data(work: Path, models) -> Path:
    """The explore h5ad with obsm['X_umap'] and an aligned obsm['X_scmm']."""
    from scmm.api import load_model
    adata = explore_adata()
    adata.obsm["X_scmm"] = aligned_embeddings(load_model(models[0]), list(adata.obs["cell_type"].astype(str)))
    path = work / "data" / "cells.h5ad"
    path.parent.mkdir()
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def session(data: Path, models):
    from scmm.explore.session import ExploreSession
    return ExploreSession(data, models[0], chunk_size=50)


@pytest.fixture(scope="module")
def client(session):
    from scmm.explore.server import create_app
    return TestClient(create_app(session))


def unframe(r) -> tuple[dict, bytes]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    (n,) = struct.unpack("<I", r.content[:4])
    return json.loads(r.content[4:4 + n]), r.content[4 + n:]


def assert_refused(r, status: int, words: str) -> None:
    """The response is a refusal: ``status``, a JSON body whose error names ``words``."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["error"], r.json()


# --- the page and the map --------------------------------------------------------------------------
def test_page_and_its_files_are_served_with_a_strict_content_security_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and '<script src="/static/app.js">' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "<script>" not in r.text  # no inline script: the policy forbids it
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    app = client.get("/static/app.js").text
    assert "innerHTML" not in app and "insertAdjacentHTML" not in app and "eval(" not in app
    assert_refused(client.get("/api/nothing"), 404, "no such route")
    assert_refused(client.get("/static/..%2f..%2fsetup.py"), 404, "no such route")


def test_info_lists_the_columns_programs_and_sources(client, data):
    info = client.get("/api/info").json()
    assert info["n_cells"] == 120 and info["n_genes"] == 20
    assert "program_interferon" in info["programs"] and "program_interferon" not in info["obs_columns"]
    assert {"cell_type", "note", "n_counts"} <= set(info["obs_columns"])
    assert info["label_column"] == "cell_type" and info["has_stage2"] is True
    assert info["map_source"] == "obsm['X_umap'] of the input"
    assert sorted(p.name for p in data.parent.iterdir()) == ["cells.h5ad"]  # nothing cached: nothing needed


def test_map_is_the_inputs_umap_as_binary_float32(client, data):
    meta, body = unframe(client.get("/api/map"))
    xy = np.frombuffer(body, dtype="<f4").reshape(-1, 2)
    expected = ad.read_h5ad(data).obsm["X_umap"]
    np.testing.assert_array_equal(xy, expected)
    assert meta["n"] == 120
    assert meta["bounds"] == pytest.approx([*expected.min(0), *expected.max(0)])


# --- colours ------------------------------------------------------------------------------------------
def test_colour_by_a_categorical_column_sends_uint16_codes_and_counts(client, data):
    meta, body = unframe(client.get("/api/colour", params={"obs": "cell_type"}))
    codes = np.frombuffer(body, dtype="<u2")
    obs = ad.read_h5ad(data).obs
    assert meta["kind"] == "categorical" and meta["categories"] == list(obs["cell_type"].cat.categories)
    np.testing.assert_array_equal(codes, obs["cell_type"].cat.codes.to_numpy())
    assert meta["counts"] == [30, 30, 30, 30]
    meta, _ = unframe(client.get("/api/colour", params={"obs": "note"}))
    assert XSS in meta["categories"]  # sent as data; the page puts it on screen as text


def test_colour_by_a_numeric_column_and_a_program(client, data):
    obs = ad.read_h5ad(data).obs
    meta, body = unframe(client.get("/api/colour", params={"obs": "n_counts"}))
    values = np.frombuffer(body, dtype="<f4")
    np.testing.assert_array_equal(values, obs["n_counts"].to_numpy())
    assert meta["kind"] == "continuous" and meta["min"] == pytest.approx(values.min())
    meta, body = unframe(client.get("/api/colour", params={"obs": "program_interferon"}))
    assert meta["source"] == "program" and np.frombuffer(body, dtype="<f4")[-1] == pytest.approx(1.0)


def test_colour_by_a_gene_is_log1p_cp10k_of_the_counts(client, data):
    x = ad.read_h5ad(data).X.toarray()
    expected = np.log1p(x[:, 4] / x.sum(1) * 1e4)  # MS4A1 is gene 4
    for name in ("MS4A1", "ms4a1", "ENSG90000000004"):
        meta, body = unframe(client.get("/api/colour", params={"gene": name}))
        np.testing.assert_allclose(np.frombuffer(body, dtype="<f4"), expected, rtol=1e-5)
        assert meta["unit"] == "log1p(CP10k)"
    assert client.get("/api/genes", params={"prefix": "cd"}).json()["genes"] == \
        ["CD14", "CD3D", "CD3E", "CD4", "CD79A", "CD8A"]


def test_colour_refusals(client):
    assert_refused(client.get("/api/colour", params={"obs": "nope"}), 404, "obs has no column 'nope'")
    assert_refused(client.get("/api/colour", params={"gene": "NOTAGENE"}), 404, "gene 'NOTAGENE' is not")
    assert_refused(client.get("/api/colour", params={"gene": "CD4", "obs": "note"}), 400, "name one of")
    assert_refused(client.get("/api/colour"), 400, "name one of")
    assert_refused(client.get("/api/colour", params={"gene": "x" * 400}), 400, "longer than 300")
    assert_refused(client.get("/api/genes", params={"prefix": ""}), 400, "gene is empty")


# --- search ---------------------------------------------------------------------------------------------
def test_search_scores_every_cell_by_the_text_towers_embedding_of_the_query(client, session, data):
    meta, body = unframe(client.post("/api/search", json={"query": "B cell", "top": 30}))
    sims = np.frombuffer(body, dtype="<f4")
    emb = ad.read_h5ad(data).obsm["X_scmm"]
    with torch.inference_mode():
        q = torch.nn.functional.normalize(session.model.aligner.text_features(["B cell"]).float(), dim=-1)[0]
    np.testing.assert_allclose(sims, emb @ q.numpy(), atol=1e-5)
    top = [m["index"] for m in meta["matches"]]
    assert top == list(np.argsort(-sims, kind="stable")[:30]) or \
        np.allclose(sims[top], np.sort(sims)[::-1][:30], atol=1e-7)
    labels = [m["label"] for m in meta["matches"]]
    assert labels.count("B cell") == 30  # the embeddings sit near their label's text: all 30 B cells first
    assert meta["matches"][0]["cell_id"] == f"cell_{top[0]}"


def test_search_refusals(client):
    assert_refused(client.post("/api/search", json={"query": "   "}), 400, "query is empty")
    assert_refused(client.post("/api/search", json={"query": "x" * 301}), 400, "longer than 300")
    assert_refused(client.post("/api/search", json={"query": 5}), 400, "must be a string")
    assert_refused(client.post("/api/search", json={"query": "B cell", "top": 0}), 400, "top must be")
    assert_refused(client.post("/api/search", json={"query": "B cell", "top": True}), 400, "top must be")
    assert_refused(client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}), 400,
            "not valid JSON")
    assert_refused(client.post("/api/search", json=[1, 2]), 400, "JSON object")
    assert_refused(client.post("/api/search", content=b"x" * 70_000, headers={"content-type": "application/json"}), 413,
            "at most")
    assert_refused(client.get("/api/search"), 405, "GET is not allowed")


# --- a cell, a selection -------------------------------------------------------------------------------
def test_cell_gives_its_labels_the_annotation_computed_by_the_api_and_no_stored_description(client, session, data):
    from scmm.api import annotate
    c = client.get("/api/cell/5").json()
    assert c["cell_id"] == "cell_5" and c["obs"]["cell_type"] == "B cell"
    assert c["obs"]["note"] == XSS and c["description"] is None and c["can_describe"] is True
    one = ad.read_h5ad(data)[5:6].to_memory()
    expected = annotate(one, session.model, input_scale="counts").obs.iloc[0]
    a = c["annotation"]
    assert a["cell_type"] == expected["scmm_cell_type"]
    assert a["confidence"] == pytest.approx(float(expected["scmm_confidence"]), abs=1e-6)
    assert a["level"] == int(expected["scmm_cell_type_level"]) and a["qc"] == "ok"
    assert a["source"] == "computed now with scmm annotate"


def test_cell_refusals(client):
    assert_refused(client.get("/api/cell/abc"), 400, "non-negative integer")
    assert_refused(client.get("/api/cell/-1"), 400, "non-negative integer")
    assert_refused(client.get("/api/cell/120"), 404, "cell numbers must be in [0, 119]")
    assert_refused(client.get("/api/cell/" + "9" * 40), 400, "non-negative integer")


def test_selection_counts_labels_from_json_or_binary_cell_lists(client):
    cells = [1, 5, 9, 13, 2]  # four B cells and one NK cell
    s = client.post("/api/selection", json={"cells": cells}).json()
    assert s["n_cells"] == 5
    assert dict(map(tuple, s["columns"]["cell_type"])) == {"B cell": 4, "natural killer cell": 1}
    binary = client.post("/api/selection", content=np.array(cells, dtype="<u4").tobytes(),
                         headers={"content-type": "application/octet-stream"}).json()
    assert binary == s


def test_selection_refusals(client):
    assert_refused(client.post("/api/selection", json={"cells": []}), 400, "no cells")
    assert_refused(client.post("/api/selection", json={"cells": [0, 500]}), 404, "must be in [0, 119]")
    assert_refused(client.post("/api/selection", json={"cells": ["1"]}), 400, "integer cell numbers")
    assert_refused(client.post("/api/selection", json={"cells": [1.5]}), 400, "integer cell numbers")
    assert_refused(client.post("/api/selection", json={"nothing": 1}), 400, "integer cell numbers")
    octets = {"content-type": "application/octet-stream"}
    assert_refused(client.post("/api/selection", content=b"abc", headers=octets), 400, "multiple of 4")
    assert_refused(client.post("/api/selection", content=b"1,2", headers={"content-type": "text/plain"}), 415,
                   "send cells")
    big = np.zeros(20_000, dtype="<u4").tobytes()  # over 4 bytes per cell + 64 KiB
    assert_refused(client.post("/api/selection", content=big, headers=octets), 413, "at most")


# --- the LLM: describe, ask ----------------------------------------------------------------------------
def test_describe_generates_with_stage2_for_a_cell_and_a_sample_of_a_selection(client, session, data):
    from scmm.api import describe
    d = client.post("/api/describe", json={"cells": [3]}).json()
    expected = describe(ad.read_h5ad(data)[3:4].to_memory(), session.model, input_scale="counts")
    assert d["descriptions"] == [{"index": 3, "text": expected.obs["scmm_description"].iloc[0]}]
    d = client.post("/api/describe", json={"cells": list(range(40))}).json()
    assert d["n_cells"] == 40 and d["n_described"] == 16 and len(d["descriptions"]) == 16
    assert d["descriptions"][0]["index"] == 0 and d["descriptions"][-1]["index"] == 39


def test_ask_a_cell_type_question_gives_the_calibrated_scored_answer(client, session, data):
    from scmm.api import describe
    a = client.post("/api/ask", json={"cells": [7], "question": "What is the cell type of this cell?"}).json()
    expected = describe(ad.read_h5ad(data)[7:8].to_memory(), session.model, cell_type=True,
                        input_scale="counts").obs.iloc[0]
    assert a["kind"] == "cell_type"
    assert a["answer"] == expected["scmm_llm_cell_type"]
    assert a["confidence"] == pytest.approx(float(expected["scmm_llm_confidence"]), abs=1e-6)
    assert a["unknown"] == (a["answer"] == "unknown") and a["share"] == 1.0


def test_ask_another_question_gives_the_llms_text(client):
    a = client.post("/api/ask", json={"cells": [7, 8], "question": "Which tissue does this cell come from?"}).json()
    assert a["kind"] == "free" and isinstance(a["answer"], str) and a["n_asked"] == 2
    assert len(a["answers"]) == 2


def test_ask_refusals(client, data, models):
    from scmm.explore.server import create_app
    from scmm.explore.session import ExploreSession
    assert_refused(client.post("/api/ask", json={"cells": [1], "question": ""}), 400, "question is empty")
    assert_refused(client.post("/api/ask", json={"cells": [1]}), 400, "question must be a string")
    assert_refused(client.post("/api/ask", json={"cells": [1], "question": "q" * 400}), 400, "longer than 300")
    assert_refused(client.post("/api/ask", content=np.zeros(1, "<u4").tobytes(),
                        headers={"content-type": "application/octet-stream"}), 415, "application/json")
    bare = TestClient(create_app(ExploreSession(data, models[1])))  # a stage-1 folder: no LLM
    assert_refused(bare.post("/api/ask", json={"cells": [1], "question": "What is this?"}), 409, "no stage 2")
    assert_refused(bare.post("/api/describe", json={"cells": [1]}), 409, "no stage 2")


# --- export ------------------------------------------------------------------------------------------------
def test_export_csv_lists_the_cell_ids(client):
    r = client.post("/api/export", params={"format": "csv"}, json={"cells": [9, 2, 2, 40]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="cells_selection.csv"' in r.headers["content-disposition"]
    assert r.text == "cell_id\ncell_2\ncell_9\ncell_40\n"


def test_export_h5ad_streams_a_subset_and_removes_its_temporary(client, data, tmp_path):
    import tempfile
    before = set(Path(tempfile.gettempdir()).glob("scmm-explore-export-*"))
    r = client.post("/api/export", params={"format": "h5ad"},
                    content=np.array([3, 1, 77], dtype="<u4").tobytes(),
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and 'filename="cells_selection.h5ad"' in r.headers["content-disposition"]
    out = tmp_path / "sub.h5ad"
    out.write_bytes(r.content)
    sub, full = ad.read_h5ad(out), ad.read_h5ad(data)
    assert list(sub.obs_names) == ["cell_1", "cell_3", "cell_77"]
    np.testing.assert_array_equal(sub.X.toarray(), full.X[[1, 3, 77]].toarray())
    np.testing.assert_array_equal(sub.obsm["X_scmm"], full.obsm["X_scmm"][[1, 3, 77]])
    assert sub.obs["note"].astype(str).tolist() == full.obs["note"].astype(str).iloc[[1, 3, 77]].tolist()
    assert set(Path(tempfile.gettempdir()).glob("scmm-explore-export-*")) == before


def test_export_refusals(client):
    assert_refused(client.post("/api/export", params={"format": "../../etc/passwd"}, json={"cells": [1]}), 400,
            "format must be csv or h5ad")
    assert_refused(client.post("/api/export", params={"format": "csv"}, json={"cells": []}), 400, "no cells")


# --- safety: token, host, read-only input, cache beside it -----------------------------------------------------
def test_a_token_is_required_on_every_request_when_set(session):
    from scmm.explore.server import create_app
    guarded = TestClient(create_app(session, token=TOKEN))
    for path in ("/", "/static/app.js", "/api/info", "/api/map", "/api/cell/1"):
        assert_refused(guarded.get(path), 401, "needs its token")
    assert_refused(guarded.get("/api/info", headers={"x-scmm-token": "wrong-token-of-24-chars!"}), 401,
                   "needs its token")
    # only the page takes ?token
    assert_refused(guarded.get("/api/info", params={"token": TOKEN}), 401, "needs its token")
    assert guarded.get("/api/info", headers={"x-scmm-token": TOKEN}).status_code == 200
    page = guarded.get("/", params={"token": TOKEN})
    assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
    assert guarded.get("/api/info").status_code == 200  # the cookie the page set


def test_a_loopback_server_refuses_other_host_names(session):
    from scmm.explore.server import create_app
    local = TestClient(create_app(session, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1")
    assert local.get("/api/info").status_code == 200
    assert local.get("/api/info", headers={"host": "evil.example"}).status_code == 400


def test_an_input_without_umap_or_embedding_is_untouched_and_its_cache_sits_beside_it(tmp_path, models):
    from scmm.explore.session import ExploreSession
    adata = explore_adata(n_cells=40)
    del adata.obsm["X_umap"]
    path = tmp_path / "plain.h5ad"
    adata.write_h5ad(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.chmod(0o444)
    s = ExploreSession(path, models[0])
    assert s.map_source.startswith("UMAP of X_scmm (computed now") and s.coords.shape == (40, 2)
    assert np.isfinite(s.coords).all()
    cache = tmp_path / ".plain.h5ad.scmm-explore"
    assert sorted(p.name for p in cache.iterdir()) == ["embedded.h5ad", "embedded.h5ad.json", "umap.npy",
                                                       "umap.npy.json"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    again = ExploreSession(path, models[0])
    assert again.map_source.startswith("UMAP of X_scmm (cached")
    np.testing.assert_array_equal(again.coords, s.coords)
    meta, body = unframe(TestClient(__import__("scmm.explore.server", fromlist=["x"]).create_app(again))
                         .post("/api/search", json={"query": "T cell"}))
    assert len(np.frombuffer(body, dtype="<f4")) == 40


def test_cli_refuses_bad_options_with_one_error_line(data, models):
    from conftest import run_cli
    r = run_cli("explore", str(data), "--model", str(models[0]), "--port", "70000")
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: scmm explore: argument --port: must be an integer from 1 to 65535, got '70000'", r.stderr
    r = run_cli("explore", str(data), "--model", str(models[0]), "--token", "short")
    assert r.returncode == 2 and "--token must be at least 16" in r.stderr
    r = run_cli("explore", str(data.parent / "missing.h5ad"), "--model", str(models[0]))
    assert r.returncode == 2 and r.stderr.startswith("error: input file not found") and "Traceback" not in r.stderr


def test_binary_frames_are_aligned_for_typed_arrays(client):
    r = client.get("/api/colour", params={"obs": "cell_type"})
    (n,) = struct.unpack("<I", r.content[:4])
    assert (4 + n) % 4 == 0
    json.load(io.BytesIO(r.content[4:4 + n]))


def test_cli_on_another_host_generates_a_token_and_refuses_requests_without_it(data, models):
    import os
    import re
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "scmm.cli", "explore", str(data), "--model", str(models[0]),
                             "--host", "0.0.0.0", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            m = re.search(r"open http://0\.0\.0\.0:\d+/\?token=(\S+)", line)
            if m:
                break
        else:
            raise AssertionError("no address with a token was printed")
        token = m.group(1)
        assert len(token) >= 32
        base = f"http://127.0.0.1:{port}/api/info"
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        with pytest.raises(urllib.error.HTTPError) as refused_:
            urllib.request.urlopen(base, timeout=30)
        assert refused_.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(base, headers={"X-Scmm-Token": token}), timeout=30) as r:
            assert json.loads(r.read())["n_cells"] == 120
    finally:
        proc.terminate()
        proc.wait(timeout=30)
