"""Answer a list of LLaVA-Med question rows into an answers file (appended), batch by batch,
through the Python API (``medv_jax.sampling.api``): what ``python -m medv_jax.infer`` and the
evaluation runs write.

Question rows: ``{"question_id", "text", "image"?}``; answer rows: ``{"question_id", "prompt",
"text", "answer_id", "model_id", "metadata"}`` (``metadata``: ``num_tokens``, ``token_ids``,
``steps``, ``seconds``, ``batch_seconds``, ``batch_size``, ``includes_compile``). Row ``r`` of the
question file draws from ``fold_in(key(seed), r)``, so its answer does not depend on its batch.
A row that cannot be answered (unreadable image, prompt too long) is reported and skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

from medv_jax.sampling.api import Model, row_key
from medv_jax.user_errors import UserError
from medv_jax.sampling.diffusion import SamplerConfig


def question_text(text: str, where: str = "--question") -> str:
    """The question without ``<image>`` and outer whitespace; a UserError when nothing is left."""
    question = text.replace("<image>", "").strip()
    if not question:
        raise UserError(f"{where} is empty{' (only <image>)' if text.strip() else ''}: write the question")
    return question


def answered_ids(path: str, repair: bool = True) -> set[str]:
    """Question ids already in ``path``; a partly written last line (no newline) is cut off
    (``repair``; otherwise, for a file another process may be writing, it is only ignored)."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n") and not repair:
        data = data[: data.rfind(b"\n") + 1]
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(f"warning: dropping a partly written last line of {path}", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for line in data.decode("utf-8").splitlines():
        try:
            done.add(_key(json.loads(line)["question_id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _key(question_id: Any) -> str:
    return json.dumps(question_id, sort_keys=True)


def checked_questions(rows: Iterator[tuple[int, Any, str]], where: str) -> list[tuple[int, Any, str]]:
    """``rows`` as a list; a UserError naming the line for a question_id used twice or an empty
    question (after removing ``<image>``)."""
    rows = list(rows)
    first_line: dict[str, int] = {}
    for index, row, _ in rows:
        if row is None:
            continue
        key = _key(row["question_id"])
        if key in first_line:
            raise UserError(
                f"{where}: question_id {row['question_id']!r} is on lines {first_line[key] + 1} and {index + 1}: "
                "give every question its own id"
            )
        first_line[key] = index
        if not isinstance(row["text"], str):
            raise UserError(f"{where} line {index + 1}: text of question_id {row['question_id']!r} is not a string")
        question_text(row["text"], f"{where} line {index + 1}: the question of question_id {row['question_id']!r}")
    return rows



@dataclasses.dataclass
class AnsweredRun:
    """What one call wrote: answers written, skipped questions (messages naming them), the
    denoising steps of each answer and the wall time."""

    written: int
    skipped: list[str]
    steps_used: list[int]
    seconds: float


def answer_questions(
    model: Model,
    todo: Sequence[tuple[int, Mapping[str, Any]]],
    answers_file: str,
    sampler_config: SamplerConfig,
    *,
    seed: int = 0,
    batch_size: int = 8,
    prompt_length: int = 0,
    image_folder: str = "",
    image_options: Mapping[str, Any] = {},
    model_id: str | None = None,
    progress: bool = False,
) -> AnsweredRun:
    """Answer ``todo`` ((row index, question row) pairs) into ``answers_file`` (appended).

    Every batch has ``batch_size`` rows (the last filled with inert rows); prompts are left padded
    to ``prompt_length`` (0: the batch's longest rounded up to a multiple of the model's
    ``prompt_bucket``), so only a few programs are compiled."""
    from medv_jax.data.image_io import ImageReadError

    model_id = model_id or model.name
    max_prompt = model.lm.max_position_embeddings - sampler_config.gen_length

    def encode(index: int, row: dict):
        """(PromptRow, question text) or raises with a message naming the problem."""
        question = row["text"].replace("<image>", "").strip()
        image = None
        if row.get("image"):
            path = os.path.join(os.path.expanduser(image_folder), row["image"])
            image = model.image(path, **image_options)
        prompt = model.prompt(question, image, sample_id=str(row["question_id"]))
        if len(prompt.tokens) > (prompt_length or max_prompt):
            raise ValueError(
                f"prompt of {len(prompt.tokens)} tokens exceeds "
                + (f"--prompt_length={prompt_length}" if prompt_length else
                   f"max_position_embeddings - gen_length = {max_prompt}")
            )
        return prompt, question

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="q", file=sys.stderr)
    skipped, written, steps_used = [], 0, []
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    started = time.perf_counter()
    with open(answers_file, "a", encoding="utf-8") as out:
        pending: list[tuple[int, dict, Any, str]] = []

        def flush_batch():
            nonlocal written
            keys = [row_key(seed, p[0]) for p in pending]
            answers = model.run([p[2] for p in pending], keys, sampler_config, batch_size=batch_size,
                                prompt_width=prompt_length or None)
            for (_, row, _, question), answer in zip(pending, answers):
                batch_seconds = answer.seconds + answer.compile_seconds
                steps_used.append(answer.steps)
                record = {
                    "question_id": row["question_id"],
                    "prompt": question,
                    "text": answer.text,
                    "answer_id": uuid.uuid4().hex[:22],
                    "model_id": model_id,
                    # Per answer: its generated ids (up to the stop), the denoising steps it ran,
                    # and an equal share of its batch's wall time (sampler, plus compilation for
                    # the first batch of a prompt width).
                    "metadata": {
                        "num_tokens": len(answer.token_ids),
                        "token_ids": answer.token_ids,
                        "steps": answer.steps,
                        "seconds": batch_seconds / len(pending),
                        "batch_seconds": batch_seconds,
                        "batch_size": len(pending),
                        "includes_compile": answer.compile_seconds > 0,
                    },
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            written += len(pending)
            if bar is not None:
                bar.update(len(pending))
            pending.clear()

        for index, row in todo:
            try:
                prompt, question = encode(index, row)
            except (ImageReadError, OSError, ValueError, KeyError, TypeError) as e:
                message = f"question {row.get('question_id')!r}: {e}"
                skipped.append(message)
                print(f"skipping {message}", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                continue
            pending.append((index, row, prompt, question))
            if len(pending) == batch_size:
                flush_batch()
        if pending:
            flush_batch()
    if bar is not None:
        bar.close()
    return AnsweredRun(written, skipped, steps_used, time.perf_counter() - started)
