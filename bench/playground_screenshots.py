"""Screenshots of the browser playground in every mode, for docs/serving.md: starts `tridlm serve` on the default
model, drives the page in headless Chromium (Debian's chromium package, through playwright), and writes
OUT/<mode>.png after the reply, the replay slider set to the last step that shows the mode at work.

    .venv/bin/python bench/playground_screenshots.py [OUT] [--dtype int4]
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

PROMPT = "Write a Python function that checks whether a number is prime."
# mode -> (block size, threshold, which steps show what the mode does: the last of them is replayed)
MODES = {
    "ar": (1, 0.9, "e => true"),
    "diffusion": (8, 0.5, "e => e.type === 'denoise' && e.block.filter(t => t === null).length >= 3"),
    "spec:linear": (8, 0.9, "e => e.type === 'verify' && e.accepted >= 2"),
    "spec:quadratic": (4, 0.9, "e => e.type === 'verify' && e.accepted >= 1"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="docs/playground")
    ap.add_argument("--dtype", default="int4")
    ap.add_argument("--port", type=int, default=8931)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tridlm", "serve", "--port", str(args.port), "--dtype", args.dtype]
    )
    try:
        for _ in range(120):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url)
            for mode, (block, threshold, pick) in MODES.items():
                page.select_option("#mode", mode)
                page.fill("#prompt", PROMPT)
                page.fill("#block-size", str(block))
                page.fill("#threshold", str(threshold))
                page.fill("#max-tokens", "96")
                page.click("#send")
                page.wait_for_function("window.playground.state !== 'running'", timeout=300_000)
                step = page.evaluate(f"window.playground.events.findLastIndex({pick})")
                page.eval_on_selector(
                    "#replay", "(el, k) => { el.value = k; el.dispatchEvent(new Event('input')); }", max(step, 0)
                )
                path = out / f"{mode.replace(':', '-')}.png"
                page.screenshot(path=str(path), full_page=True)
                print(path, page.inner_text("#status"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
