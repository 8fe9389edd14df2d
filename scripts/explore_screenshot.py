#!/usr/bin/env python
"""A screenshot of `scmm explore` for the README: the page on DATA and MODEL in Debian's headless chromium, after a
text search (the best matches highlighted) or a click on a legend entry, then a click on the best match.

    python scripts/explore_screenshot.py runs/demo/annotated.h5ad runs/demo/model docs/img/explore.png \\
        [--search "B cell"] [--select "B cell"]
"""
from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox", "--disable-background-networking",
        "--disable-dev-shm-usage"]


def wait(page, expression: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not page.evaluate(expression):  # page.evaluate: the page's CSP forbids wait_for_function's eval
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {expression}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--search", default=None, help="a text search to run first")
    ap.add_argument("--select", default=None, help="a legend entry (of the default colour) to select")
    ap.add_argument("--question", default="What is the cell type of this cell?")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "scmm.cli", "explore", args.data, "--model", args.model,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"open (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise SystemExit("scmm explore did not start")
        time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(url)
            wait(page, "document.body.dataset.ready === '1'")
            best = None
            if args.search:
                page.fill("#query", args.search)
                page.press("#query", "Enter")
                wait(page, "document.querySelectorAll('#matches li').length > 0")
                best = int(page.eval_on_selector("#matches li", "e => e.dataset.index"))
            if args.select:
                page.locator(".legend-item", has_text=args.select).first.click()
                wait(page, "document.querySelector('#panel-title').textContent.includes('selected')")
                wait(page, "document.querySelector('#panel-body').textContent.length > 0")
            elif best is not None:
                box = page.locator("#map").bounding_box()
                x, y = page.evaluate(f"window.scmmExplore.screenOf({best})")
                page.mouse.click(box["x"] + x, box["y"] + y)
                wait(page, "!document.querySelector('#description').textContent.includes('generating') && "
                           "document.querySelector('#panel-body').textContent.length > 0")
                page.fill("#question", args.question)
                page.press("#question", "Enter")
                wait(page, "document.querySelector('#answer').textContent.length > 0")
            page.wait_for_timeout(300)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
