"""The OpenAI-compatible server driven by the official ``openai`` client on 127.0.0.1, on the tiny
random checkpoint: single, streamed, multi-turn and image requests, bad requests, the API key,
a full queue, and 32 concurrent clients whose answers must each equal ``model.answer`` alone."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures

import httpx
import openai
import pytest

from medv_jax.sampling import api
from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.serve import openai_compat as oc

# Two blocks, so a streamed answer arrives in more than one piece.
DEFAULTS = SamplerConfig(gen_length=8, block_length=4, steps=4)
BATCH_SIZES = (1, 4, 8)


@pytest.fixture(scope="module")
def model(tiny):
    return api.load(tiny["checkpoint"], tiny["tokenizer"])


@pytest.fixture(scope="module")
def server(model):
    batcher = oc.Batcher(model, batch_sizes=BATCH_SIZES, window_s=0.05, max_queue=64)
    batcher.warm_up(oc.default_warm_up_rows(model), DEFAULTS)
    app = oc.build_app(model, batcher, DEFAULTS, served_name="medv-tiny")
    with oc.serving(app) as url:
        yield dict(url=url, batcher=batcher)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(path, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode()


def user(text, image=None, media="image/png"):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image, media)}})
    return {"role": "user", "content": parts}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["medv-tiny"]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "medv-tiny"


def test_single_request_with_image_is_model_answer(client, model, tiny):
    scan = tiny["images"] / "scan.png"
    reply = client.chat.completions.create(model="medv-tiny", messages=[user("Is there a fracture?", scan)])
    alone = model.answer(scan, "Is there a fracture?", sampler=DEFAULTS)
    assert reply.choices[0].message.content == alone.text
    assert reply.choices[0].finish_reason == ("stop" if alone.stopped else "length")
    assert reply.usage.completion_tokens == len(alone.token_ids)
    assert reply.usage.prompt_tokens == alone.prompt_tokens
    medv = reply.model_extra["medv"]
    assert medv["token_ids"] == alone.token_ids and medv["steps"] == alone.steps and medv["seconds"] > 0
    # A JPEG, plain text content and OpenAI's max_tokens / temperature / seed.
    jpg = tiny["images"] / "scan.jpg"
    reply = client.chat.completions.create(
        model="medv-tiny", messages=[user("Which side?", jpg, "image/jpeg")],
        max_tokens=4, temperature=0.7, seed=5,
    )
    alone = model.answer(jpg, "Which side?", sampler=DEFAULTS, gen_length=4, block_length=4, steps=2,
                         temperature=0.7, seed=5)
    assert reply.choices[0].message.content == alone.text
    assert reply.model_extra["medv"]["token_ids"] == alone.token_ids


def _image_asks(tiny, tmp_path):
    """(path, media type, options): a PNG, a JPEG, a 16-bit PNG, a DICOM by its type and by its magic."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    deep = tmp_path / "deep.png"  # 16-bit grayscale: the reader's high-bit-depth rescaling
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 13)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    asks = [(tiny["images"] / "scan.png", "image/png", {}), (tiny["images"] / "scan.jpg", "image/jpeg", {}),
            (deep, "image/png", {})]
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    return asks + [(ct, "application/dicom", {"dicom_window": "lung"}), (ct, "image/png", {})]


def test_request_images_are_preprocessed_as_their_files(model, tiny, tmp_path):
    import numpy as np

    for path, media, options in _image_asks(tiny, tmp_path):
        served = oc._request_image(model, path.read_bytes(), media, options)
        alone = model.image(str(path), **options)
        np.testing.assert_array_equal(served.pixels, alone.pixels, err_msg=str(path))


def test_a_dicom_request_is_model_answer(client, model, tiny, tmp_path):
    path, media, options = _image_asks(tiny, tmp_path)[3]
    reply = client.chat.completions.create(model="medv-tiny", messages=[user("Which organ?", path, media)],
                                           extra_body=options)
    alone = model.answer(str(path), "Which organ?", sampler=DEFAULTS, **options)
    assert reply.model_extra["medv"]["token_ids"] == alone.token_ids


def test_streamed_by_block(client, model, tiny):
    scan = tiny["images"] / "scan.png"
    question = "What modality is this?"
    stream = client.chat.completions.create(
        model="medv-tiny", messages=[user(question, scan)], stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    alone = model.answer(scan, question, sampler=DEFAULTS)
    assert "".join(pieces).strip() == alone.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop" if alone.stopped else "length"]
    assert chunks[-1].usage.completion_tokens == len(alone.token_ids)
    assert chunks[-1].usage.prompt_tokens == alone.prompt_tokens
    # One piece per finished block at most (2 blocks here), plus none after the last.
    assert 1 <= len(pieces) <= DEFAULTS.num_blocks if alone.text else not pieces


def test_blocks_are_posted_as_they_finish(model, tiny):
    """The batcher posts each streaming row's text after every block, before the answer."""
    scan = tiny["images"] / "scan.png"
    batcher = oc.Batcher(model, batch_sizes=(1,), window_s=0.0)
    body = {"messages": [user("Is there a fracture?", scan)], "stream": True, "max_tokens": 12,
            "block_length": 4, "steps": 6}
    prepared = oc.prepare(model, body, DEFAULTS, "m")
    alone = model.answer(scan, "Is there a fracture?", sampler=prepared.sampler)

    async def collect():
        batcher.start()
        try:
            events = batcher.submit(prepared)
            got = []
            while not got or got[-1][0] == "block":
                got.append(await events.get())
            return got
        finally:
            batcher.stop()

    events = asyncio.run(collect())
    blocks = [value for kind, value in events if kind == "block"]
    assert events[-1][0] == "done" and events[-1][1].token_ids == alone.token_ids
    # Block b shows the answer up to the end of block b (or its stop), each a prefix of the next.
    stop = len(alone.token_ids)
    blocks_run = -(-(stop + (1 if alone.stopped else 0)) // 4)
    assert len(blocks) == min(blocks_run, 3)
    for b, ids in enumerate(blocks):
        assert ids == alone.token_ids[: min(stop, 4 * (b + 1))]


def test_multi_turn_with_system_prompt(client, model, tiny):
    scan = tiny["images"] / "scan.png"
    messages = [
        {"role": "system", "content": "You are a radiologist."},
        user("Is there a fracture?", scan),
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Which side is the lesion on?"},
    ]
    reply = client.chat.completions.create(model="medv-tiny", messages=messages)
    alone = model.answer(scan, "Which side is the lesion on?", history=[("Is there a fracture?", "No.")],
                         system_prompt="You are a radiologist.", sampler=DEFAULTS)
    assert reply.model_extra["medv"]["token_ids"] == alone.token_ids
    assert reply.choices[0].message.content == alone.text
    # The model's own system prompt differs from this one: so does the prompt.
    default = model.answer(scan, "Which side is the lesion on?", history=[("Is there a fracture?", "No.")],
                           sampler=DEFAULTS)
    assert default.prompt_tokens != alone.prompt_tokens


BAD_REQUESTS = [
    ("undecodable image", lambda img: [user("Is it?", img / "corrupt.png")], {}, "cannot read it as an image"),
    ("not an image", lambda img: [user("Is it?", img / "notes.txt", "text/plain")], {}, "cannot read it as an image"),
    ("bad base64", lambda img: [{"role": "user", "content": [
        {"type": "text", "text": "Is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,***"}}]}], {}, "base64"),
    ("an http URL", lambda img: [{"role": "user", "content": [
        {"type": "text", "text": "Is it?"},
        {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}], {}, "data: URL"),
    ("two images", lambda img: [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(img / "scan.png")}},
        {"type": "image_url", "image_url": {"url": data_url(img / "scan.png")}},
        {"type": "text", "text": "Same?"}]}], {}, "one image"),
    ("empty message", lambda img: [{"role": "user", "content": "  "}], {}, "question is empty"),
    ("no messages", lambda img: [], {}, "messages must be a non-empty list"),
    ("ends with the assistant", lambda img: [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}], {}, "last message"),
    ("unknown role", lambda img: [{"role": "tool", "content": "x"}], {}, "role 'tool'"),
    ("over-length prompt", lambda img: [{"role": "user", "content": "lesion " * 9000}], {}, "positions"),
    ("block not dividing max_tokens", lambda img: [{"role": "user", "content": "Is it?"}],
     {"max_tokens": 8, "extra_body": {"block_length": 3}}, "not a multiple of block_length"),
    ("negative max_tokens", lambda img: [{"role": "user", "content": "Is it?"}], {"max_tokens": -1}, "max_tokens"),
    ("steps as text", lambda img: [{"role": "user", "content": "Is it?"}], {"extra_body": {"steps": "many"}},
     "steps='many' must be a number"),
    ("unknown cache mode", lambda img: [{"role": "user", "content": "Is it?"}], {"extra_body": {"cache": "huge"}},
     "cache"),
    ("n = 2", lambda img: [{"role": "user", "content": "Is it?"}], {"n": 2}, "n must be 1"),
    ("bad DICOM window", lambda img: [user("Is it?", img / "scan.png")], {"extra_body": {"dicom_window": "neon"}},
     "window"),
]


@pytest.mark.parametrize("messages,options,expected", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_400_with_an_openai_error(client, tiny, messages, options, expected):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="medv-tiny", messages=messages(tiny["images"]), **options)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert expected in error["message"], error["message"]
    assert "\n" not in error["message"]


def test_bad_requests_disturb_nobody(client, model, server, tiny):
    """Good requests answered while bad ones are refused, the process serving on."""
    scan = tiny["images"] / "scan.png"

    def good(i):
        reply = client.chat.completions.create(model="medv-tiny", messages=[user(f"Is there a lesion {i}?", scan)])
        return reply.choices[0].message.content

    def bad(i):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="medv-tiny", messages=[user("Is it?", tiny["images"] / "corrupt.png")])
        return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: (good if i % 2 else bad)(i), range(8)))
    for i in range(1, 8, 2):
        assert results[i] == model.answer(scan, f"Is there a lesion {i}?", sampler=DEFAULTS).text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    raw = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_32_concurrent_clients_get_their_own_answers(client, model, server, tiny):
    images = [tiny["images"] / "scan.png", tiny["images"] / "scan.jpg", None]
    questions = ["Is there a fracture?", "Which side?", "What modality is this?", "Is it normal?"]
    asks = [(images[i % 3], questions[i % 4], i % 5) for i in range(32)]
    before = len(server["batcher"].batches_run)

    def ask(item):
        image, question, seed = item
        media = "image/jpeg" if image is not None and image.suffix == ".jpg" else "image/png"
        reply = client.chat.completions.create(
            model="medv-tiny", messages=[user(question, image, media)], seed=seed, temperature=0.5)
        return reply.model_extra["medv"]["token_ids"], reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(ask, asks))
    assert len(replies) == 32
    for (image, question, seed), (ids, text) in zip(asks, replies):
        alone = model.answer(image, question, seed=seed, temperature=0.5, sampler=DEFAULTS)
        assert (ids, text) == (alone.token_ids, alone.text), (question, seed)
    batches = server["batcher"].batches_run[before:]
    assert sum(batches) == 32 and max(batches) > 1  # batched, nothing dropped or answered twice
    assert max(batches) <= max(BATCH_SIZES)


def test_full_queue_is_503_with_retry_after(model, tiny):
    class Full(oc.Batcher):
        def submit(self, prepared):
            raise oc.QueueFull("64 requests are waiting")

    app = oc.build_app(model, Full(model, batch_sizes=(1,)), DEFAULTS, served_name="m")
    with oc.serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["type"] == "server_overloaded"


def test_the_queue_is_bounded(model):
    batcher = oc.Batcher(model, batch_sizes=(1,), max_queue=2)  # never started: nothing leaves the queue
    prepared = oc.prepare(model, {"messages": [{"role": "user", "content": "Hi"}]}, DEFAULTS, "m")

    async def fill():
        batcher.submit(prepared)
        batcher.submit(prepared)
        with pytest.raises(oc.QueueFull):
            batcher.submit(prepared)
        return batcher.queued()

    assert asyncio.run(fill()) == 2


def test_api_key(model):
    app = oc.build_app(model, oc.Batcher(model, batch_sizes=(1,)), DEFAULTS, served_name="m", api_key="s3cret")
    with oc.serving(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="s3cret").models.list().data] == ["m"]
        assert httpx.get(url + "/health").status_code == 200  # health needs no key


def test_the_command_serves_on_127_0_0_1(tiny, model):
    """python -m medv_jax.serve.api in its own process: compiles the defaults, then answers."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS="", MEDV_API_KEY="k")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medv_jax.serve.api", "--checkpoint", tiny["checkpoint"], "--tokenizer",
         tiny["tokenizer"], "--port", str(port), "--batch_sizes", "1,2", "--gen_length", "8",
         "--block_length", "4", "--steps", "4", "--served_name", "tiny"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
        scan = tiny["images"] / "scan.png"
        reply = client.chat.completions.create(model="tiny", messages=[user("Is there a fracture?", scan)])
        assert reply.model_extra["medv"]["token_ids"] == model.answer(scan, "Is there a fracture?", sampler=DEFAULTS).token_ids
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert "compiled the default settings for batch sizes [1, 2]" in output


def _readme_block(language: str, after: str) -> str:
    """The first ``language`` code block of README.md after the line holding ``after``."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start:text.index("```", start)]


def _as_here(code: str, server, scan) -> str:
    """README's example pointed at this test's server, model and scan, with the tiny model's canvas."""
    return (code.replace("http://127.0.0.1:8000", server["url"]).replace('"llada-medv"', '"medv-tiny"')
            .replace("scan.png", str(scan)).replace('"max_tokens": 128', '"max_tokens": 8')
            .replace("max_tokens=128", "max_tokens=8"))


def test_readme_examples_answer_as_model_answer(server, model, tiny, capsys):
    """README's curl and openai-client examples, run as written against this server, give the answer
    ``model.answer`` gives alone."""
    import json
    import shutil
    import subprocess

    scan = tiny["images"] / "scan.png"
    alone = model.answer(scan, "Is there a pneumothorax?", sampler=DEFAULTS)
    exec(_as_here(_readme_block("python", "or with the `openai` client"), server, scan), {})
    assert capsys.readouterr().out == alone.text + "\n"
    if shutil.which("curl") is None or shutil.which("base64") is None:
        pytest.skip("curl or base64 is not installed")
    shown = _readme_block("bash", "Through the API server")
    assert shown.startswith("curl ")
    out = subprocess.run(["bash", "-c", _as_here(shown, server, scan)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == alone.text
