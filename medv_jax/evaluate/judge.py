"""A judge model behind any OpenAI-compatible chat endpoint, scoring two answers 1..10.

LLaVA-Med's open-conversation protocol (its ``eval_multimodal_chat_gpt_score.py``; wording
re-typed here, see :data:`INSTRUCTION`): the judge sees the figure caption and its in-text
mentions, the question, the reference answer as "Assistant 1" and the candidate as "Assistant 2",
and writes the two overall scores on its first line.

Client behaviour (standard library only: ``urllib`` and ``concurrent.futures``):

* ``POST {base_url}/chat/completions`` with ``{"model", "messages", "temperature": 0}`` and a
  bearer key; the reply is ``choices[0].message.content``.
* Transport failures (connection errors, timeouts, HTTP 408/409/429/5xx, a body that is not a chat
  completion) are retried up to ``max_retries`` times, waiting ``backoff * 2**k`` seconds (capped,
  and at least the server's ``Retry-After``). Other HTTP errors (401, 404, ...) are not retried.
* A reply whose first line does not hold two scores is asked again up to ``parse_retries`` times
  (same request); if it stays malformed the question is reported, not scored.
* Every parsed judgement is cached on disk under the SHA-256 of the full request (URL and JSON
  body, not the key), one file each, written atomically: a rerun with the same prompts, model and
  endpoint sends nothing; questions that failed are asked again.
* Requests run on ``concurrency`` threads.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "SYSTEM_PROMPT",
    "INSTRUCTION",
    "JudgeConfig",
    "JudgeParseError",
    "Judgement",
    "judge_user_prompt",
    "judge_messages",
    "request_body",
    "cache_key",
    "parse_scores",
    "judge_request",
    "judge_all",
]

# LLaVA-Med's system message. (Its source has a stray leading quote, "'You are ...", an artefact
# of a triple-quoted string; it is left out here.)
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."

# LLaVA-Med's instruction, including the two-space indents of its continuation lines.
INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above. The user asks the question on observing an image. For "
    "your reference, the visual content in the image is represented with caption describing the "
    "same image.\n"
    "  Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\n"
    "  Please first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent "
    "line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment."
)

_RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5  # transport retries per request
    parse_retries: int = 2  # extra asks when the first line is malformed
    backoff: float = 1.0  # first wait in seconds, doubled each retry
    max_backoff: float = 60.0
    concurrency: int = 4
    cache_dir: str | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        if not self.base_url:
            raise ValueError("judge base URL is empty (pass --judge_base_url or set OPENAI_BASE_URL)")
        if not self.model:
            raise ValueError("judge model is empty (pass --judge_model)")
        for name in ("timeout", "concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"judge {name}={getattr(self, name)} must be positive")
        for name in ("max_retries", "parse_retries", "backoff", "max_backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"judge {name}={getattr(self, name)} must be >= 0")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


class JudgeParseError(ValueError):
    """The judge's first line does not hold the two scores."""


class _Retryable(Exception):
    """A failed request worth repeating; ``wait`` is the server's Retry-After, if any."""

    def __init__(self, message: str, wait: float = 0.0):
        super().__init__(message)
        self.wait = wait


@dataclass(frozen=True)
class Judgement:
    """One question's verdict: the scores (None on failure), the judge's reply, and how it went."""

    key: str
    reference_score: float | None  # s1: the reference answer (Assistant 1)
    candidate_score: float | None  # s2: the candidate (Assistant 2)
    reply: str | None
    requests: int  # HTTP requests sent for it in this run (0 when cached)
    cached: bool
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ---- prompt ------------------------------------------------------------------------------------


def _mentions_text(mentions: Any, style: str) -> str:
    if style == "llava_med":
        # LLaVA-Med's scorer interpolates the raw field: for its question file a Python list of
        # {"tokens", "entities"} dicts, shown as Python prints it.
        return str(mentions if mentions is not None else "")
    if style != "clean":
        raise ValueError(f"prompt style {style!r}: expected 'llava_med' or 'clean'")
    if not mentions:
        return ""
    if isinstance(mentions, str):
        return mentions
    sentences = [m.get("tokens", "") if isinstance(m, Mapping) else str(m) for m in mentions]
    return "\n\t- ".join(s for s in sentences if s)


def judge_user_prompt(
    question: str,
    reference: str,
    candidate: str,
    fig_caption: str = "",
    fig_label: str = "",
    mentions: Any = None,
    style: str = "llava_med",
) -> str:
    """The user message: context, question, both answers, then the instruction.

    ``style="llava_med"`` reproduces LLaVA-Med's text exactly (question as in the file, mentions
    as the raw list); ``"clean"`` drops ``<image>`` from the question and lists the mention
    sentences one per line."""
    if style == "clean":
        question = question.replace("<image>", "").strip()
    return (
        "[Context]\n"
        f"Figure Caption:\n{fig_label}: {fig_caption}\n\n"
        f"Figure Context:\n\t- {_mentions_text(mentions, style)}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{candidate}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{INSTRUCTION}\n\n"
    )


def judge_messages(user_prompt: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_prompt},
    ]


def request_body(config: JudgeConfig, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": config.model, "messages": list(messages), "temperature": 0}
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    return body


def cache_key(url: str, body: Mapping[str, Any]) -> str:
    """SHA-256 of the endpoint URL and the canonical JSON body (the whole request but the key)."""
    canonical = json.dumps({"url": url, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---- parsing -----------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
# Labels a judge sometimes writes despite the instruction ("Assistant 1: 8"), removed before the
# two numbers are read so that the assistants' numbers are not taken for scores.
_LABEL = re.compile(r"\b(?:assistant|answer|score)s?(?:\s*[12](?!\d))?\s*[:=]?", re.IGNORECASE)
_SCORE_LINE = re.compile(rf"^\s*{_NUMBER}\s*(?:[,;/|]|\s)\s*{_NUMBER}\s*\.?\s*$")


def parse_scores(reply: str) -> tuple[float, float]:
    """(s1, s2) from the first non-empty line of ``reply``.

    Accepts "8 7" (the format asked for), "8, 7", "8/7", "**8 7**", "Assistant 1: 8 Assistant 2: 7"
    and decimals; both scores must lie in 1..10. Anything else raises JudgeParseError."""
    lines = [line for line in reply.splitlines() if line.strip()]
    if not lines:
        raise JudgeParseError("empty reply")
    first = lines[0].replace("*", "").replace("`", "").strip()
    cleaned = _LABEL.sub(" ", first)
    match = _SCORE_LINE.match(cleaned)
    if match is None:
        raise JudgeParseError(f"first line holds no two scores: {lines[0][:120]!r}")
    s1, s2 = float(match.group(1)), float(match.group(2))
    for score in (s1, s2):
        if not 1.0 <= score <= 10.0:
            raise JudgeParseError(f"score {score:g} outside 1..10 in {lines[0][:120]!r}")
    return s1, s2


# ---- transport ---------------------------------------------------------------------------------


def _retry_after(headers: Any) -> float:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else 0.0


def _post_chat(config: JudgeConfig, body: Mapping[str, Any]) -> str:
    """One request; the reply text. Raises _Retryable or RuntimeError (not worth repeating)."""
    data = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(config.url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:200].decode("utf-8", "replace") if err.fp else ""
        message = f"HTTP {err.code} from {config.url}: {detail}".strip()
        if err.code in _RETRY_STATUS:
            raise _Retryable(message, _retry_after(err.headers)) from None
        raise RuntimeError(message) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
        raise _Retryable(f"request to {config.url} failed: {err}") from None
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retryable(f"{config.url} answered with no chat completion: {payload[:200]!r}") from None
    if not isinstance(content, str):
        raise _Retryable(f"{config.url} answered with non-text content {content!r}")
    return content


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, key[:2], key + ".json")


def _read_cache(cache_dir: str | None, key: str) -> dict[str, Any] | None:
    if not cache_dir:
        return None
    try:
        with open(_cache_path(cache_dir, key), encoding="utf-8") as handle:
            entry = json.load(handle)
        parse_scores(entry["reply"])  # a cached reply must still parse
        return entry
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache_dir: str | None, key: str, entry: Mapping[str, Any]) -> None:
    if not cache_dir:
        return
    path = _cache_path(cache_dir, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(entry, handle, ensure_ascii=False)
    os.replace(tmp, path)


def judge_request(
    config: JudgeConfig,
    messages: Sequence[Mapping[str, str]],
    sleep: Callable[[float], None] = time.sleep,
) -> Judgement:
    """Ask the judge about one pair (cache first), with retries; never raises for a bad reply."""
    body = request_body(config, messages)
    key = cache_key(config.url, body)
    cached = _read_cache(config.cache_dir, key)
    if cached is not None:
        s1, s2 = parse_scores(cached["reply"])
        return Judgement(key, s1, s2, cached["reply"], requests=0, cached=True)
    requests = 0
    reply: str | None = None
    last_error = ""
    for _ask in range(config.parse_retries + 1):
        for attempt in range(config.max_retries + 1):
            requests += 1
            try:
                reply = _post_chat(config, body)
                break
            except _Retryable as err:
                last_error = str(err)
                if attempt == config.max_retries:
                    return Judgement(key, None, None, None, requests, False,
                                     f"gave up after {requests} request(s): {last_error}")
                sleep(min(config.max_backoff, max(err.wait, config.backoff * 2**attempt)))
            except RuntimeError as err:
                return Judgement(key, None, None, None, requests, False, str(err))
        assert reply is not None
        try:
            s1, s2 = parse_scores(reply)
        except JudgeParseError as err:
            last_error = str(err)
            continue
        _write_cache(config.cache_dir, key, {"url": config.url, "request": body, "reply": reply})
        return Judgement(key, s1, s2, reply, requests, False)
    return Judgement(key, None, None, reply, requests, False,
                     f"malformed reply after {config.parse_retries + 1} ask(s): {last_error}")


def judge_all(
    config: JudgeConfig,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Judgement]:
    """:func:`judge_request` for every message list, on ``config.concurrency`` threads; results
    in input order."""
    results: list[Judgement | None] = [None] * len(conversations)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(conversations), unit="q", desc="judge", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        futures = {
            pool.submit(judge_request, config, messages, sleep): index
            for index, messages in enumerate(conversations)
        }
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None]
