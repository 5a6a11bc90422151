"""The web demo in a real browser: ``python -m medv_jax.serve`` on 127.0.0.1 with a tiny random
checkpoint, driven in headless Chromium (Debian's ``chromium`` through playwright's
``executable_path``; nothing is downloaded).

Skipped, with the reason, only where Chromium or playwright is missing (``.ci/run`` installs
them). ``MEDV_SERVE_SCREENSHOT=FILE`` keeps the chat test's screenshot (of the tiny random model);
otherwise it goes to the test's temporary folder. README's picture is of a trained model
(tools/serve_screenshot.py).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.serve import engine as eng

pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")
from medv_jax.serve.app import final_text  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these Chromium's own background connections make page loads fail offline
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTINGS = ["--gen_length", "8", "--block_length", "4", "--steps", "4"]
SMALL = SamplerConfig(gen_length=8, block_length=4, steps=4)
TIMEOUT_MS = 60_000  # generous: the CI machine's two cores are shared

# Records every distinct text the denoising canvas shows (the replay is too quick to poll).
RECORD_FRAMES = """
window.__frames = [];
new MutationObserver(() => {
  const el = document.querySelector('#canvas .canvas');
  if (!el) return;
  const t = el.innerText;
  if (t && window.__frames[window.__frames.length - 1] !== t) window.__frames.push(t);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def chromium_path() -> str | None:
    path = os.environ.get("MEDV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does): browser tests skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]'): browser tests skipped")
    with sync_playwright() as p:
        # playwright gives every launch a fresh temporary profile (user data dir).
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser, tiny, tmp_path_factory):
    """Starts the demo command in a subprocess (not waiting: ``page`` does, so the expected answers
    are computed meanwhile); yields (process, URL, log file)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    cmd = [
        sys.executable, "-m", "medv_jax.serve",
        "--checkpoint", tiny["checkpoint"], "--tokenizer", tiny["tokenizer"],
        "--port", str(port), "--examples_dir", str(tmp_path_factory.mktemp("examples")),
        "--replay_seconds", "1", "--system_prompt", "none",  # short prompts: one length bucket
    ] + SETTINGS
    env = dict(os.environ, PYTHONPATH=os.getcwd(), GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    yield proc, f"http://127.0.0.1:{port}/", log
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_until_serving(proc, url: str, log, limit_s: float = 300) -> None:
    deadline = time.time() + limit_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                pytest.fail(f"the server did not answer within {limit_s} s:\n{log.read_text()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def scan(engine, tiny):
    """The uploaded file and the answers the sampler gives to the two questions asked about it
    (without a system prompt, as the server runs)."""
    path = tiny["images"] / "scan.png"
    engine = eng.Engine(dataclasses.replace(engine.model, system_prompt=None), engine.prompt_bucket)
    image = eng.load_image(engine.model, str(path))[1]
    first = engine.answer([], "Is there a fracture?", image, SMALL)
    follow = engine.answer([("Is there a fracture?", first.text)], "Which side?", image, SMALL)
    assert first.prompt_length == follow.prompt_length  # the server compiles one program only
    return path, first, follow


def open_page(browser, url: str):
    """A fresh browser context (its own session) on the demo; returns (context, page, outside
    requests seen)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
    page.add_init_script(RECORD_FRAMES)
    page.goto(url)
    page.wait_for_selector("#upload input[type=file]", state="attached")
    return context, page, outside


@pytest.fixture
def page(browser, server):
    proc, url, log = server
    wait_until_serving(proc, url, log)
    context, page, outside = open_page(browser, url)
    yield page
    context.close()
    assert not outside, f"the page reached outside the server: {outside}"
    assert "Traceback" not in log.read_text(), log.read_text()


def status_contains(page, text: str) -> None:
    # The status element may not be rendered yet right after the page loads: wait for it too.
    page.wait_for_function("t => (document.querySelector('#status')?.innerText ?? '').includes(t)", arg=text)


def bot_messages(page) -> list[str]:
    return page.eval_on_selector_all("#chat [data-testid=bot]", "els => els.map(e => e.innerText.trim())")


def ask(page, question: str, n_before: int) -> None:
    page.fill("#question textarea", question)
    page.click("#ask")
    page.wait_for_function(
        "n => document.querySelectorAll('#chat [data-testid=bot]').length > n"
        " && document.querySelector('#status').innerText.includes('Done')",
        arg=n_before,
    )


def test_chat_with_an_image_and_watch_it_unmask(server, scan, page, engine, tmp_path):
    """Upload, ask, see the canvas unmask step by step, get the sampler's answer; then a follow-up."""
    path, want, follow = scan
    page.set_input_files("#upload input[type=file]", str(path))
    status_contains(page, "Loaded scan.png")
    assert page.locator("#preview img").count() == 1

    ask(page, "Is there a fracture?", 0)
    assert bot_messages(page) == [final_text(want)]

    # The replay: frames with masked positions filling in, in order, ending with the answer.
    expected = [eng.render_frame(engine.model, f).replace("\n", "") for f in want.frames]
    seen = [f.replace("\n", "") for f in page.evaluate("window.__frames")]
    assert len(seen) >= 2, seen
    assert eng.MASK_GLYPH in seen[0] and eng.MASK_GLYPH not in seen[-1]
    assert seen[-1] == expected[-1]
    it = iter(expected)
    assert all(any(s == e for e in it) for s in seen), (seen, expected)  # a subsequence of the steps
    stats = page.inner_text("#stats")
    assert f"Steps used {want.steps_used} of 4" in stats and "tokens/s" in stats and " s" in stats
    assert "compile" not in stats  # compiled at start-up, not on the first question

    # Multi-turn: the follow-up's prompt holds the first exchange.
    ask(page, "Which side?", 1)
    assert bot_messages(page) == [final_text(want), final_text(follow)]
    assert "compile" not in page.inner_text("#stats")

    # Scrub the replay back to step 2: the canvas as it stood then (masked positions and all).
    assert len(follow.frames) >= 2
    page.fill("#replay input[type=number]", "2")
    page.press("#replay input[type=number]", "Enter")
    page.wait_for_function("() => document.querySelector('#canvas').innerText.includes('step 2 /')")
    step2 = eng.render_frame(engine.model, follow.frames[1]).replace("\n", "")
    assert page.inner_text("#canvas .canvas").replace("\n", "") == step2

    shot = os.environ.get("MEDV_SERVE_SCREENSHOT") or str(tmp_path / "serve_screenshot.png")
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000


def test_invalid_inputs_show_an_error_in_the_page(page, tiny):
    """A corrupt image, a non-image file, an empty question and impossible settings each give a
    visible error; the page keeps working afterwards (a DICOM example then loads)."""
    page.set_input_files("#upload input[type=file]", str(tiny["images"] / "corrupt.png"))
    status_contains(page, "Error: cannot read 'corrupt.png' as an image")
    assert page.locator("#preview img").count() == 0

    page.click("#upload button[aria-label=Clear]")
    page.set_input_files("#upload input[type=file]", str(tiny["images"] / "notes.txt"))
    status_contains(page, "Error: cannot read 'notes.txt' as an image")
    page.fill("#question textarea", "Is there a fracture?")
    page.click("#ask")  # refused: never answered without the image the user meant to give
    status_contains(page, "could not be read")
    assert bot_messages(page) == []

    page.click("#upload button[aria-label=Clear]")
    page.fill("#question textarea", "")
    page.click("#ask")  # no question typed
    status_contains(page, "Error: type a question first")

    page.fill("#set_gen_length input", "10")
    page.fill("#question textarea", "Is there a fracture?")
    page.click("#ask")
    status_contains(page, "gen_length=10 is not a multiple of block_length=4")
    assert bot_messages(page) == []

    page.get_by_text("CT_small.dcm").first.click()  # the pydicom CT example (soft-tissue window)
    status_contains(page, "Loaded CT_small.dcm")
    assert page.input_value("#question textarea") == "What modality is this?"


def test_two_users_at_once_each_get_their_answer(browser, server, scan, page):
    """Two sessions ask at the same moment (gradio's queue and the engine's lock serialize the
    generations): each page gets the correct answer."""
    path, want, _ = scan
    other, page2, outside = open_page(browser, server[1])
    try:
        for p in (page, page2):
            p.set_input_files("#upload input[type=file]", str(path))
            status_contains(p, "Loaded scan.png")
            p.fill("#question textarea", "Is there a fracture?")
        page.click("#ask")
        page2.click("#ask")
        for p in (page, page2):
            status_contains(p, "Done")
            assert bot_messages(p) == [final_text(want)]
    finally:
        other.close()
    assert not outside
