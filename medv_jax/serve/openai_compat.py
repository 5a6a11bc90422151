"""An OpenAI-compatible chat completions server over the Python API, with request batching.

Endpoints: ``POST /v1/chat/completions`` (OpenAI's message format: text parts and ``image_url``
parts carrying ``data:`` URLs, multi-turn, ``stream``), ``GET /v1/models``, ``GET /health``.

Request fields: ``max_tokens`` (or ``max_completion_tokens``) is the answer canvas
(``gen_length``); ``temperature`` and ``seed`` are OpenAI's; the diffusion sampler's own settings
are extra body fields named as the commands' flags (``block_length``, ``steps``, ``remasking``,
``cfg_scale``, ``cache``, ``cache_refresh``, ``threshold``, ``adaptive_stop``, ``stop_patience``,
``stop_entropy``) plus ``dicom_window`` / ``dicom_frame`` for a DICOM image. Unset fields take the
server's defaults (the paper's VQA schedule unless the command says otherwise). When
``max_tokens`` is given without ``block_length`` / ``steps``, the block is the default one (at
most the canvas) and the steps keep the default steps per token, rounded to whole steps per block.
A system message replaces the model's system prompt. The model reads one image: it may come in
any user message and is placed at the start of the first user turn (as in training).

Batching (``Batcher``): requests wait in one bounded queue; a worker thread takes the oldest
request and every queued request with the same sampler settings and prompt width (prompts are
padded to the model's ``prompt_bucket``), waiting up to ``window_s`` (from when the device became
free) for the last batch's clients to come back (a lone client is not delayed), and runs
them as one batch padded with inert rows to the next of ``batch_sizes``; so the programs are one
per (schedule, batch size, prompt width), compiled for the defaults at start-up (``warm_up``).
A full queue answers HTTP 503 with Retry-After; a bad request HTTP 400 with an OpenAI error body,
before it reaches the queue. Under the exact schedule a row's answer does not depend on its
batch-mates, so each answer equals ``model.answer`` asked alone.

Streaming: the sampler calls back on the host as each block is finished; every block adds a
chunk with the text it completed, then a last chunk with the finish reason and one with
``usage`` (prompt and completion tokens).
"""
# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations
# (``request: Request``) at run time, and Request is imported inside build_app.
import asyncio
import base64
import binascii
import dataclasses
import json
import os
import tempfile
import threading
import time
import uuid
from typing import Any, Mapping, Sequence

from medv_jax.sampling import api
from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.user_errors import UserError

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
MAX_IMAGE_BYTES = 32 * 1024 * 1024
BATCH_HISTORY = 10_000
# Extra body fields: the sampler's (the commands' flag names) and the DICOM display window.
SAMPLER_FIELDS = tuple(k for k in api.SAMPLER_SETTINGS if k not in ("gen_length", "temperature"))
DICOM_FIELDS = ("dicom_window", "dicom_frame")


class BadRequest(UserError):
    """A request the server refuses with HTTP 400; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: the client should retry later (HTTP 503)."""


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass
class Prepared:
    """A checked request, ready for the queue."""

    row: Any  # PromptRow
    sampler: SamplerConfig
    seed: int
    width: int
    stream: bool


def _text_of(content: Any, where: str, allow_images: bool) -> tuple[str, list[str]]:
    """(text, image URLs) of a message's content: a string or a list of parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, Mapping):
            raise BadRequest(f"{at} must be an object with a type", at)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{at}.text must be a string", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url" and allow_images:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str):
                raise BadRequest(f"{at}.image_url.url must be a string (a data: URL)", f"{at}.image_url")
            images.append(url)
        else:
            allowed = "'text' or 'image_url'" if allow_images else "'text'"
            raise BadRequest(f"{at}.type {kind!r} is not supported here: use {allowed}", f"{at}.type")
    return "\n".join(texts), images


def parse_messages(messages: Any) -> tuple[str | None, list[tuple[str, str]], str, str | None, bool]:
    """(system prompt or None, earlier (question, answer) turns, the question, the image URL or
    None, whether a system message was given) of OpenAI chat messages."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of messages", "messages")
    system, has_system, turns, images = None, False, [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise BadRequest(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role in ("system", "developer"):
            if turns:
                raise BadRequest(f"{where}: a system message must come before the conversation", f"{where}.role")
            text, _ = _text_of(message.get("content"), where, allow_images=False)
            system = text if not has_system else system + "\n" + text
            has_system = True
        elif role in ("user", "assistant"):
            want = "user" if len(turns) % 2 == 0 else "assistant"
            if role != want:
                raise BadRequest(f"{where}: expected a {want} message (user and assistant turns alternate, "
                                 "starting with user)", f"{where}.role")
            text, urls = _text_of(message.get("content"), where, allow_images=role == "user")
            images += [(where, u) for u in urls]
            turns.append(text)
        else:
            raise BadRequest(f"{where}.role {role!r} is not one of system, user, assistant", f"{where}.role")
    if not turns or len(turns) % 2 == 0:
        raise BadRequest("the last message must be a user message (the question to answer)", "messages")
    if len(images) > 1:
        raise BadRequest(f"{len(images)} images given ({', '.join(w for w, _ in images)}); the model reads one "
                         "image per conversation", images[1][0])
    history = list(zip(turns[0:-1:2], turns[1:-1:2]))
    question = turns[-1]
    if not question.replace("<image>", "").strip():
        raise BadRequest(f"messages[{len(messages) - 1}]: the question is empty", "messages")
    return system, history, question, images[0][1] if images else None, has_system


def decode_data_url(url: str) -> tuple[bytes, str]:
    """(bytes, media type) of a base64 ``data:`` URL."""
    if not url.startswith("data:"):
        raise BadRequest("image_url must be a data: URL (data:image/png;base64,...); the server fetches nothing",
                         "image_url")
    head, _, data = url[5:].partition(",")
    if not _ or ";base64" not in head:
        raise BadRequest("image_url: expected a base64 data: URL (data:<type>;base64,<data>)", "image_url")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"image_url: the image exceeds {MAX_IMAGE_BYTES // (1024 * 1024)} MiB", "image_url")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"image_url: not valid base64 ({e})", "image_url") from None
    return raw, head.split(";")[0].strip().lower()


def request_sampler(body: Mapping[str, Any], defaults: SamplerConfig) -> SamplerConfig:
    """The SamplerConfig of a request (see the module doc for the rules)."""
    settings = {k: body[k] for k in SAMPLER_FIELDS if k in body}
    gen_length = body.get("max_completion_tokens", body.get("max_tokens"))
    if gen_length is not None:
        if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length <= 0:
            raise BadRequest(f"max_tokens={gen_length!r} must be a positive integer", "max_tokens")
        settings["gen_length"] = gen_length
        if gen_length != defaults.gen_length:
            block = settings.setdefault("block_length", min(defaults.block_length, gen_length))
            if "steps" not in settings and isinstance(block, int) and block > 0 and gen_length % block == 0:
                blocks = gen_length // block
                per_block = max(1, round(defaults.steps / defaults.gen_length * block))
                settings["steps"] = blocks * per_block
    if body.get("temperature") is not None:
        settings["temperature"] = body["temperature"]
    for name, value in settings.items():
        if name in ("cache", "remasking"):
            continue
        if name == "adaptive_stop":
            if not isinstance(value, bool):
                raise BadRequest(f"adaptive_stop={value!r} must be true or false", name)
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BadRequest(f"{name}={value!r} must be a number", name)
    try:
        return api.sampler_config(defaults, **settings)
    except UserError as e:
        raise BadRequest(f"sampler settings: {e}") from None


def prepare(model: api.Model, body: Any, defaults: SamplerConfig, served_name: str) -> Prepared:
    """Check a request body and build its prompt (runs in a worker thread: images are decoded
    here). Raises BadRequest."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    name = body.get("model")
    if name is not None and name != served_name:
        raise ModelNotFound(name)
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: one answer per request", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    seed = body.get("seed", 0)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise BadRequest(f"seed={seed!r} must be an integer in [0, 2**32)", "seed")
    sampler = request_sampler(body, defaults)
    system, history, question, url, has_system = parse_messages(body.get("messages"))
    image = None
    if url is not None:
        if not model.takes_images:
            raise BadRequest("this model is a text-only LLaDA model: send no image", "messages")
        raw, media = decode_data_url(url)
        options = {k: body[k] for k in DICOM_FIELDS if body.get(k) is not None}
        if "dicom_window" in options and not isinstance(options["dicom_window"], str):
            raise BadRequest("dicom_window must be a string (auto, full, lung, ... or center,width)", "dicom_window")
        if "dicom_frame" in options and (isinstance(options["dicom_frame"], bool)
                                         or not isinstance(options["dicom_frame"], int)):
            raise BadRequest("dicom_frame must be an integer", "dicom_frame")
        image = _request_image(model, raw, media, options)
    try:
        row = model.prompt(question, image, history, system_prompt=system if has_system else api.MODEL_SYSTEM_PROMPT)
        width = model.prompt_width(len(row.tokens), sampler.gen_length)
    except UserError as e:
        raise BadRequest(str(e), "messages") from None
    return Prepared(row=row, sampler=sampler, seed=seed, width=width, stream=stream)


def _request_image(model: api.Model, raw: bytes, media: str, options: Mapping[str, Any]) -> Any:
    """The preprocessed image of a request's bytes: a picture decoded in memory, a DICOM (by its
    media type or its magic) through the DICOM file reader. Raises BadRequest."""
    if media in ("image/dicom", "application/dicom") or raw[128:132] == b"DICM":
        with tempfile.NamedTemporaryFile(suffix=".dcm", delete=False) as handle:
            handle.write(raw)
        try:
            return model.image(handle.name, name="image_url", **options)
        except UserError as e:
            raise BadRequest(str(e).replace(handle.name, "the image"), "image_url") from None
        finally:
            os.unlink(handle.name)
    try:
        return model.image(raw, name="image_url", **options)  # decoded in memory
    except UserError as e:
        raise BadRequest(str(e), "image_url") from None


class ModelNotFound(Exception):
    def __init__(self, name: Any):
        super().__init__(f"model {name!r} is not served here")
        self.name = name


# ----------------------------------------------------------------------------------------------
# Batching


@dataclasses.dataclass(eq=False)
class _Queued:
    prepared: Prepared
    events: asyncio.Queue  # ("block", ids) ..., then ("done", Answer) or ("error", exception)
    loop: asyncio.AbstractEventLoop
    arrived: float

    @property
    def group(self) -> tuple:
        return (self.prepared.sampler, self.prepared.width)

    def post(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Batcher:
    """Gathers queued requests into batches and runs them on one worker thread (the device runs
    one program at a time)."""

    def __init__(self, model: api.Model, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 window_s: float = 0.02, max_queue: int = 64):
        sizes = sorted(set(int(b) for b in batch_sizes))
        if not sizes or sizes[0] <= 0:
            raise ValueError(f"batch_sizes={list(batch_sizes)} must be positive")
        if max_queue <= 0:
            raise ValueError(f"max_queue={max_queue} must be positive")
        self.model = model
        self.batch_sizes = tuple(sizes)
        self.window_s = window_s
        self.max_queue = max_queue
        self._pending: list[_Queued] = []
        self._running: list[_Queued] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._free_since = 0.0
        self._expected = 0  # requests likely to be here soon: the last batch's and those waiting
        self._thread: threading.Thread | None = None
        self.batches_run: list[int] = []  # rows of each batch run (for tests and the health page)

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def bucket(self, rows: int) -> int:
        return next(b for b in self.batch_sizes if b >= rows)

    def start(self) -> None:
        if self._thread is None:
            self._stopped = False
            self._thread = threading.Thread(target=self._work, name="medv-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, prepared: Prepared) -> asyncio.Queue:
        """Queue a request; returns its event queue. Raises QueueFull."""
        item = _Queued(prepared, asyncio.Queue(), asyncio.get_running_loop(), time.monotonic())
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting")
            self._pending.append(item)
            self._cond.notify_all()
        return item.events

    def warm_up(self, rows: Sequence[Any], sampler: SamplerConfig) -> float:
        """Compile ``sampler`` for every batch size at the prompt widths of ``rows``; seconds."""
        t0 = time.perf_counter()
        widths = sorted({self.model.prompt_width(len(r.tokens), sampler.gen_length) for r in rows})
        for width in widths:
            row = next(r for r in rows if self.model.prompt_width(len(r.tokens), sampler.gen_length) == width)
            for size in self.batch_sizes:
                self.model.run([row], [api.row_key(0)], sampler, batch_size=size, prompt_width=width,
                               on_block=self._on_block)
        return time.perf_counter() - t0

    def _take(self) -> list[_Queued] | None:
        """The next batch: the oldest request and those like it (waits for the window)."""
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            first = self._pending[0]
            # Clients that just had their answers tend to come back: wait (up to the window,
            # counted from when the device became free) for the last batch's requesters and those
            # that were already waiting, so that alternating groups merge; a lone client is never
            # kept waiting for company.
            target = min(self._expected or self.max_batch, self.max_batch)
            deadline = max(first.arrived, self._free_since) + self.window_s
            while True:
                group = [q for q in self._pending if q.group == first.group][: self.max_batch]
                left = deadline - time.monotonic()
                if len(group) >= target or left <= 0 or self._stopped:
                    break
                self._cond.wait(left)
            taken = set(map(id, group))
            self._pending = [q for q in self._pending if id(q) not in taken]
            return group

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            first = batch[0].prepared
            self._running = batch
            try:
                answers = self.model.run(
                    [q.prepared.row for q in batch],
                    [api.row_key(q.prepared.seed) for q in batch],
                    first.sampler,
                    batch_size=self.bucket(len(batch)),
                    prompt_width=first.width,
                    on_block=self._on_block,
                )
            except Exception as e:  # a failing batch fails its own requests only
                for q in batch:
                    q.post("error", e)
            else:
                for q, answer in zip(batch, answers):
                    q.post("done", answer)
            finally:
                self._running = []
                with self._cond:
                    self._expected = len(batch) + len(self._pending)
                    self._free_since = time.monotonic()
                self.batches_run.append(len(batch))
                if len(self.batches_run) > 2 * BATCH_HISTORY:  # a long-running server keeps the recent ones
                    del self.batches_run[:BATCH_HISTORY]

    def _on_block(self, block: Any, tokens: Any, stop: Any) -> None:
        """The sampler's host callback: post each streaming row's finished text."""
        import numpy as np

        tokens, stop, block = np.asarray(tokens), np.asarray(stop), int(block)
        for i, q in enumerate(self._running):
            if q.prepared.stream:
                end = min(int(stop[i]), (block + 1) * q.prepared.sampler.block_length)
                q.post("block", [int(t) for t in tokens[i, :end]])


# ----------------------------------------------------------------------------------------------
# The app


def build_app(
    model: api.Model,
    batcher: Batcher,
    defaults: SamplerConfig,
    *,
    served_name: str | None = None,
    api_key: str | None = None,
):
    """The FastAPI app (the batcher is started with the app and stopped with it)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    name = served_name or model.name or "medv"
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="medv_jax", lifespan=lifespan)

    def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
              headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    def unauthorized(request: Request) -> JSONResponse | None:
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if given != f"Bearer {api_key}":
            return error(401, "missing or wrong API key: send Authorization: Bearer <key>",
                         "invalid_request_error", code="invalid_api_key")
        return None

    @app.get("/health")
    async def health():
        recent = batcher.batches_run[-100:]
        return {"status": "ok", "model": name, "queued": batcher.queued(),
                "recent_mean_batch": sum(recent) / len(recent) if recent else None}

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "medv_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"the request body is not JSON: {e}", "invalid_request_error")
        try:
            prepared = await run_in_threadpool(prepare, model, body, defaults, name)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error", e.param)
        except ModelNotFound as e:
            return error(404, f"{e}: use {name!r}", "invalid_request_error", "model", "model_not_found")
        try:
            events = batcher.submit(prepared)
        except QueueFull as e:
            return error(503, f"the server is busy ({e}); retry shortly", "server_overloaded",
                         headers={"Retry-After": "1"})
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if prepared.stream:
            return StreamingResponse(_stream(events, prepared, completion_id), media_type="text/event-stream")
        kind, value = await events.get()
        while kind == "block":
            kind, value = await events.get()
        if kind == "error":
            return error(500, f"generation failed: {value}", "server_error")
        return _completion(value, prepared, completion_id)

    def _usage(answer: api.Answer) -> dict:
        return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": len(answer.token_ids),
                "total_tokens": answer.prompt_tokens + len(answer.token_ids)}

    def _extra(answer: api.Answer) -> dict:
        """What ``generate --json`` reports, beside OpenAI's fields."""
        return {"token_ids": answer.token_ids, "steps": answer.steps, "seconds": answer.seconds,
                "batch_size": answer.batch_size, "stopped": answer.stopped}

    def _completion(answer: api.Answer, prepared: Prepared, completion_id: str) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": "stop" if answer.stopped else "length"}],
            "usage": _usage(answer),
            "medv": _extra(answer),
        }

    async def _stream(events: asyncio.Queue, prepared: Prepared, completion_id: str):
        def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None, extra=None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": name,
                    "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                body["usage"] = usage
            if extra is not None:
                body["medv"] = extra
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        while True:
            kind, value = await events.get()
            if kind == "block":
                text = model.tokenizer.decode(value, skip_special_tokens=True).lstrip()
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
                continue
            if kind == "error":
                yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
                break
            answer: api.Answer = value
            if answer.text.startswith(sent) and len(answer.text) > len(sent):
                yield chunk({"content": answer.text[len(sent):]})
            yield chunk({}, "stop" if answer.stopped else "length")
            yield chunk(None, usage=_usage(answer), extra=_extra(answer))
            break
        yield "data: [DONE]\n\n"

    return app


def serving(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 120.0):
    """A context manager serving ``app`` with uvicorn in a thread (tests, benchmarks); yields the
    base URL. ``port`` 0 picks a free port."""
    import contextlib
    import socket

    import uvicorn

    @contextlib.contextmanager
    def run():
        chosen = port
        if chosen == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                chosen = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=chosen, log_level="warning"))
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{chosen} did not start")
            time.sleep(0.05)
        try:
            yield f"http://{host}:{chosen}"
        finally:
            server.should_exit = True
            thread.join(timeout=60)

    return run()


def default_warm_up_rows(model: api.Model) -> list[Any]:
    """An ordinary first request: one question about one image (or none for a text-only model)."""
    image = None
    if model.takes_images:
        from PIL import Image

        size = model.image_config.crop_size
        image = model.image(Image.new("RGB", (size, size), (128, 128, 128)))
    return [model.prompt("What is shown in this image?", image)]
