"""`scmm explore` end to end in a real browser: the command serves the page, Debian's chromium (headless, WebGL on
SwiftShader) driven by the pinned Playwright loads it, draws the map, searches, opens a cell, asks a question;
an HTML label stays text; a request without the token is refused. Skipped, with the reason, where
/usr/bin/chromium or the playwright package is missing (`.ci/run` installs chromium with apt as root).

``test_demo_search_precision`` runs the same search on `make demo`'s trained model and annotated PBMCs when
``runs/demo`` holds them (SCMM_DEMO=DIR points elsewhere), and asks for a top-50 precision of at least 0.8.
"""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from explore_fixtures import XSS, aligned_embeddings, build_package, explore_adata

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "browser-test-token-0123456789"
ARGS = ["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox", "--disable-background-networking",
        "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"]

if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install chromium; .ci/run does it as root)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`scmm explore` in a subprocess, until stopped; ``url`` is the address it printed."""

    def __init__(self, data: Path, model: Path, token: str | None = None, timeout: float = 300):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "scmm.cli", "explore", str(data), "--model", str(model), "--port",
               str(self.port)] + (["--token", token] if token else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=ROOT)
        self.started = time.perf_counter()
        deadline = time.time() + timeout
        self.log = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"open (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.log))
        if not hasattr(self, "url"):
            self.stop()
            raise AssertionError("the server stopped:\n" + "".join(self.log))
        self._wait_listening()

    def _wait_listening(self) -> None:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("the server does not listen")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def fixture_server(tmp_path_factory):
    from scmm.api import load_model
    work = tmp_path_factory.mktemp("explore_browser")
    package, _ = build_package(work / "model")
    adata = explore_adata()
    adata.obsm["X_scmm"] = aligned_embeddings(load_model(package), list(adata.obs["cell_type"].astype(str)))
    data = work / "cells.h5ad"
    adata.write_h5ad(data)
    server = Server(data, package, token=TOKEN)
    yield server, adata
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 860})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    return page, dialogs, errors


def _wait(page, expression: str, timeout: float = 30_000) -> None:
    """Poll a JavaScript expression until it is true (page.evaluate runs through the DevTools protocol, which the
    page's Content-Security-Policy does not restrict, unlike wait_for_function's eval)."""
    deadline = time.time() + timeout / 1000
    while not page.evaluate(expression):
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.1)


def _coloured_pixels(png: bytes) -> int:
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(img - 255).sum(-1) > 60).sum())


def _search(page, query: str, n: int = 50) -> list[int]:
    page.fill("#query", query)
    page.press("#query", "Enter")
    _wait(page, f"document.querySelectorAll('#matches li').length === {n}", timeout=120_000)
    return [int(v) for v in page.eval_on_selector_all("#matches li", "els => els.map(e => e.dataset.index)")]


def test_the_page_draws_the_map_searches_opens_a_cell_and_answers(fixture_server, browser, tmp_path):
    server, adata = fixture_server
    t0 = time.perf_counter()
    page, dialogs, errors = _open(browser, server.url)
    first_map = time.perf_counter() - t0
    shot = page.locator("#map").screenshot()
    (tmp_path / "map.png").write_bytes(page.screenshot())
    assert _coloured_pixels(shot) > 2000, "the WebGL canvas is blank"
    assert "120 cells" in page.text_content("#dataset")

    # search: the 30 B cells come first (their embeddings sit near the text embedding of "B cell")
    top = _search(page, "B cell", n=50)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    assert list(labels[top[:30]]) == ["B cell"] * 30
    assert "cells kept" in page.text_content("#search-count")
    (tmp_path / "search.png").write_bytes(page.screenshot())

    # click the best match on the map: its annotation, labels and a description generated by stage 2
    box = page.locator("#map").bounding_box()
    x, y = page.evaluate(f"window.scmmExplore.screenOf({top[0]})")
    page.mouse.click(box["x"] + x, box["y"] + y)
    _wait(page, "document.querySelector('#panel-title').textContent.startsWith('Cell cell_')")
    assert page.text_content("#panel-title") == f"Cell {adata.obs_names[top[0]]}"
    _wait(page, "!document.querySelector('#description').textContent.includes('generating')",
                           timeout=120_000)
    panel = page.text_content("#panel-body")
    assert "scmm annotation" in panel and "confidence" in panel and "B cell" in panel
    assert page.text_content("#description").strip()

    # a question: the calibrated cell-type answer with its confidence
    page.fill("#question", "What is the cell type of this cell?")
    page.press("#question", "Enter")
    _wait(page, "document.querySelector('#answer').dataset.kind === 'cell_type'", timeout=120_000)
    assert "confidence" in page.text_content("#answer")
    (tmp_path / "cell.png").write_bytes(page.screenshot())
    assert not errors and not dialogs
    print(f"first map {first_map:.2f} s; screenshots in {tmp_path}")


def test_an_html_label_renders_as_text(fixture_server, browser):
    server, adata = fixture_server
    page, dialogs, errors = _open(browser, server.url)
    page.select_option("#colour-obs", "note")
    _wait(page, "document.querySelector('#legend').textContent.includes('onerror')")
    assert XSS in page.text_content("#legend")
    assert page.locator("#legend img").count() == 0 and page.locator("img").count() == 0
    # the cell panel too (cell 0 carries the label)
    page.evaluate("document.querySelector('#colour-obs').value")
    box = page.locator("#map").bounding_box()
    x, y = page.evaluate("window.scmmExplore.screenOf(0)")
    page.mouse.click(box["x"] + x, box["y"] + y)
    _wait(page, "document.querySelector('#panel-body').textContent.includes('onerror')",
                           timeout=60_000)
    assert page.locator("img").count() == 0
    page.wait_for_timeout(300)
    assert not dialogs and not errors


def test_requests_without_the_token_are_refused(fixture_server, browser):
    server, _ = fixture_server
    base = server.url.split("?")[0]
    context = browser.new_context()
    page = context.new_page()
    r = page.goto(base)
    assert r.status == 401 and "needs its token" in page.content()
    assert context.request.get(base + "api/map").status == 401
    assert context.request.get(base + "api/info", headers={"X-Scmm-Token": TOKEN}).status == 200
    context.close()


def _demo_folder() -> Path:
    return Path(os.environ.get("SCMM_DEMO", ROOT / "runs" / "demo"))


@pytest.mark.skipif(not (_demo_folder() / "annotated.h5ad").is_file() or not (_demo_folder() / "model").is_dir(),
                    reason="no `make demo` output (runs/demo/annotated.h5ad and runs/demo/model)")
def test_demo_search_precision(browser, tmp_path):
    demo = _demo_folder()
    server = Server(demo / "annotated.h5ad", demo / "model")
    try:
        page, dialogs, errors = _open(browser, server.url)
        top = _search(page, "B cell")
        obs = ad.read_h5ad(demo / "annotated.h5ad", backed="r").obs
        column = "cell_type" if "cell_type" in obs else "bulk_labels"
        labels = obs[column].astype(str).to_numpy()[top]
        precision = float(np.mean([("B cell" in lab) or ("CD19+ B" in lab) for lab in labels]))
        (tmp_path / "demo_search.png").write_bytes(page.screenshot())
        print(f"demo: top-50 precision of 'B cell' = {precision:.2f}")
        assert precision >= 0.8
    finally:
        server.stop()
