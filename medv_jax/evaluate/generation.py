"""Answer generation for the evaluation commands, through the Python API.

The evaluation commands do not run a batch loop of their own: they write the questions as an
infer question file in the run folder (a record of what was asked) and answer it with
:func:`medv_jax.sampling.answers.answer_questions` on a model from
:func:`medv_jax.sampling.api.load`, the same function and batching ``python -m medv_jax.infer``
uses, so the answers (``RUN_DIR/answers.jsonl``) and its resume rules are exactly infer's. The
model and sampler flags are declared by the evaluate command (``medv_jax.evaluate.__main__``
passes its ``generation_flags`` to each subcommand's ``add_arguments``); the sampler settings go
to ``api.sampler_config`` by the names those flags carry, so a sampler flag added there (e.g. a
fast sampling mode) reaches these commands too.

Timing. Each call no per-answer times, so each call is timed here and appended to
``RUN_DIR/timing.jsonl`` as ``{"answered": n, "wall_seconds": t, "question_ids": [...]}``; an
answer's ``seconds`` is its call's wall time over the answers written by that call. This includes
model loading and compilation, amortised over the call's answers (negligible for a full test split,
dominant for a handful of questions). Token counts re-encode the answer text with the tokenizer
(the sampler's exact count before the stop token is not written by infer; special tokens that
decoding drops are not counted, and a byte-level tokenizer may split re-encoded text differently).
Where answer rows carry ``num_tokens`` / ``seconds`` (top level or in ``metadata``), those win.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

from medv_jax.data.records import id_key, load_records

__all__ = [
    "ANSWERS",
    "QUESTIONS",
    "TIMING",
    "load_model",
    "sampler_for",
    "sampler_settings",
    "write_questions",
    "generate_answers",
    "load_answers",
    "timed_answers",
    "count_tokens",
]

ANSWERS = "answers.jsonl"
QUESTIONS = "questions.jsonl"
TIMING = "timing.jsonl"

def sampler_settings(args: argparse.Namespace, overrides: Mapping[str, Any] = {}) -> dict[str, Any]:
    """The sampler settings of a run (the Python API's names, as the sampler flags carry them, and
    the seed), for its metrics file."""
    from medv_jax.sampling import api

    values = {**vars(args), **overrides}
    return {name: values.get(name) for name in (*api.SAMPLER_SETTINGS, "seed")}


def sampler_for(args: argparse.Namespace, overrides: Mapping[str, Any] = {}) -> Any:
    """The SamplerConfig of a run's sampler flags (``overrides`` taking precedence); UserError
    naming a bad setting."""
    from medv_jax.sampling import api

    values = {**vars(args), **overrides}
    return api.sampler_config(**{k: values[k] for k in api.SAMPLER_SETTINGS if k in values})


def _image_options(values: Mapping[str, Any]) -> dict[str, Any]:
    from medv_jax.data.dicom import parse_window

    return dict(
        dicom_window=parse_window(values.get("dicom_window", "auto"), "--dicom_window"),
        dicom_frame=values.get("dicom_frame"),
        dicom_force=bool(values.get("dicom_force")),
    )


def _open(values: Mapping[str, Any]) -> tuple[Any, Any]:
    from medv_jax.sampling import api

    return api.open_checkpoint(
        values["checkpoint"], values["tokenizer"], param_dtype=values.get("param_dtype"),
        dtype=values.get("dtype"), allow_tokenizer_mismatch=bool(values.get("allow_tokenizer_mismatch")),
        names=("--checkpoint", "--tokenizer"),
    )


# The last model loaded (a sweep answers with one model under many sampler settings).
_loaded: dict[tuple, Any] = {}


def load_model(values: Mapping[str, Any], opened: tuple[Any, Any] | None = None) -> Any:
    """``api.load`` with the model flags in ``values`` (kept for the next call with the same flags)."""
    from medv_jax.sampling import api

    options = dict(
        system_prompt=values.get("system_prompt", "medical"), question_suffix=values.get("question_suffix", ""),
        param_dtype=values.get("param_dtype"), dtype=values.get("dtype"),
        attention_impl=values.get("attention_impl"),
        allow_tokenizer_mismatch=bool(values.get("allow_tokenizer_mismatch")),
    )
    key = (values["checkpoint"], values["tokenizer"], tuple(sorted(options.items())))
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = api.load(values["checkpoint"], values["tokenizer"], opened=opened or _open(values),
                                **options)
    return _loaded[key]


def write_questions(rows: Iterable[Mapping[str, Any]], path: str) -> int:
    """Write infer question rows (``question_id``, ``image``, ``text``); returns how many.

    Written afresh each run (the answers file, not this one, holds the progress)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _answer_ids(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    ids = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                ids.append(id_key(json.loads(line)["question_id"]))
            except (ValueError, KeyError, TypeError):
                continue  # a partial last line: infer drops it on resume
    return ids


def generate_answers(
    args: argparse.Namespace,
    rows: Sequence[Mapping[str, Any]],
    run_dir: str,
    overrides: Mapping[str, Any] = {},
) -> dict[str, Any]:
    """Answer ``rows`` into ``run_dir/answers.jsonl`` as infer would (resuming), timing the call.

    On several processes (started with ``shares.start_processes`` before this call) each answers
    its share as infer does and returns once process 0 has merged them; process 0 alone writes the
    question file and the timing line. Returns ``{"answered": new answers, "wall_seconds": ...,
    "total": answers on file}`` (counted by process 0; the other processes' own share).
    Raises UserError, before anything is written, for a mistake in the questions, the sampler
    settings or the model flags."""
    import jax

    from medv_jax.sampling import answers, shares

    values = {**vars(args), **overrides}
    answers.checked_questions(((i, dict(r), "") for i, r in enumerate(rows)), "questions")
    sampler = sampler_for(args, overrides)
    image_options = _image_options(values)
    opened = _open(values)  # a wrong checkpoint or tokenizer leaves no run folder behind
    process = jax.process_index()
    os.makedirs(run_dir, exist_ok=True)
    answers_file = os.path.join(run_dir, ANSWERS)
    if process == 0:  # one writer for the files every process shares
        write_questions(rows, os.path.join(run_dir, QUESTIONS))
    before = set(_answer_ids(answers_file))
    started = time.perf_counter()
    share = shares.process_share(list(enumerate(dict(r) for r in rows)), answers_file, process,
                                 jax.process_count())
    print(f"{run_dir}: {share.summary()}", file=sys.stderr)
    if share.todo:
        answers.answer_questions(
            load_model(values, opened), share.todo, share.own_file, sampler,
            seed=values.get("seed", 0), batch_size=values["batch_size"],
            prompt_length=values.get("prompt_length", 0),
            image_folder=str(values.get("image_folder") or ""), image_options=image_options,
            model_id=values.get("model_id") or os.path.basename(os.path.normpath(values["checkpoint"])),
            progress=not values.get("no_progress"),
        )
    shares.merge_shares(share, answers_file)
    wall = time.perf_counter() - started
    if process != 0:
        return {"answered": len(share.todo), "wall_seconds": wall, "total": None}
    new_ids = [i for i in _answer_ids(answers_file) if i not in before]
    if new_ids:
        _append_timing(run_dir, new_ids, wall)
    return {"answered": len(new_ids), "wall_seconds": wall, "total": len(before) + len(new_ids)}


def _append_timing(run_dir: str, new_ids: Sequence[str], wall: float) -> None:
    """One timing.jsonl line: the call's wall time and the answers it added to the run."""
    entry = {
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "answered": len(new_ids),
        "wall_seconds": wall,
        "question_ids": list(new_ids),
    }
    with open(os.path.join(run_dir, TIMING), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def load_answers(run_dir: str) -> list[dict[str, Any]]:
    """The answer records of a run folder (empty when none yet)."""
    path = os.path.join(run_dir, ANSWERS)
    return load_records(path) if os.path.exists(path) else []


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of an answer text, re-encoded without special tokens."""
    return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0


def timed_answers(run_dir: str, tokenizer: Any | None = None) -> list[dict[str, Any]]:
    """The run's answers with ``seconds`` (their call's wall time per answer, from timing.jsonl)
    and, given a tokenizer, ``num_tokens``; answers of untimed calls get no ``seconds``."""
    seconds: dict[str, float] = {}
    timing_path = os.path.join(run_dir, TIMING)
    if os.path.exists(timing_path):
        for entry in load_records(timing_path):
            ids = entry.get("question_ids") or []
            if ids:
                share = float(entry["wall_seconds"]) / len(ids)
                seconds.update({id_key(i): share for i in ids})
    records = []
    for record in load_answers(run_dir):
        record = dict(record)
        # Exact figures written by the sampler, where a version of infer records them, win.
        metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        for name in ("num_tokens", "seconds"):
            if name not in record and metadata.get(name) is not None:
                record[name] = metadata[name]
        key = id_key(record.get("question_id"))
        if key in seconds and "seconds" not in record:
            record["seconds"] = seconds[key]
        if tokenizer is not None and "num_tokens" not in record:
            record["num_tokens"] = count_tokens(tokenizer, str(record.get("text", "")))
        records.append(record)
    return records
