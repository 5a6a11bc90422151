"""A screenshot of the web demo answering with a trained model: starts ``python -m medv_jax.serve``
on 127.0.0.1, uploads a held-out synthetic scan in headless Chromium (Debian's ``chromium`` through
playwright, nothing downloaded), asks for a findings report and a follow-up, and saves the page.

    python tools/serve_screenshot.py --checkpoint workdir/mini/stage2_instruct/model \\
        --tokenizer workdir/mini/stage2_instruct/tokenizer --out docs/serve_screenshot.png

Sampler settings are the report model's (L = 64, B = 32, N = 64), no system prompt; the scan is
drawn as the miniature recipe's are (lesions in slots).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, url: str, limit_s: float = 600) -> None:
    deadline = time.time() + limit_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"error: the server did not answer within {limit_s:.0f} s")
            time.sleep(0.5)


def ask(page, question: str, n_before: int) -> None:
    page.fill("#question textarea", question)
    page.click("#ask")
    page.wait_for_function(
        "n => document.querySelectorAll('#chat [data-testid=bot]').length > n"
        " && document.querySelector('#status').innerText.includes('Done')", arg=n_before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", default="docs/serve_screenshot.png")
    p.add_argument("--scan", type=int, default=3, help="index of the held-out synthetic scan to upload")
    p.add_argument("--question", default="Describe the findings in this image.")
    p.add_argument("--follow_up", default="How many lesions are there?")
    args = p.parse_args()
    chromium = os.environ.get("MEDV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("error: Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT))
    from medv_jax.data import synthetic

    work = Path(tempfile.mkdtemp(prefix="serve_shot_"))
    scan = work / f"synthetic_test_{args.scan}.png"
    synthetic.SyntheticMedVQA("test", args.scan + 1, task="report", layout="slots")[args.scan]["image"].save(scan)
    port = free_port()
    cmd = [sys.executable, "-m", "medv_jax.serve", "--checkpoint", args.checkpoint, "--tokenizer", args.tokenizer,
           "--system_prompt", "none", "--gen_length", "64", "--block_length", "32", "--steps", "64",
           "--port", str(port), "--examples_dir", str(work / "examples"), "--replay_seconds", "1"]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(proc, url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector("#upload input[type=file]", state="attached")
            page.set_input_files("#upload input[type=file]", str(scan))
            page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)",
                                   arg=f"Loaded {scan.name}")
            ask(page, args.question, 0)
            ask(page, args.follow_up, 1)
            time.sleep(2)  # let the replay reach its last frame
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
