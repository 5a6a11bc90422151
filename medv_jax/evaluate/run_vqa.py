"""End-to-end VQA evaluation: answer a test split with the jitted batch sampler, then score it.

    python -m medv_jax.evaluate run-vqa --checkpoint DIR --tokenizer DIR \\
        (--questions test.json[l] --image_folder IMAGES | --tfds NAME:SPLIT) --out RUN_DIR \\
        [--gen_length 128 --block_length 128 --steps 128 --batch_size 8 ...]

Writes into RUN_DIR: ``questions.jsonl`` (what infer answers), ``answers.jsonl`` (infer's answer
file), ``timing.jsonl`` (one line per generation call), ``metrics.json`` (VQA scores, response
lengths incl. seconds per question and tokens/s, sampler settings) and ``per_question.jsonl``.
Rerunning with the same RUN_DIR skips the questions already answered and rescores everything.

Several processes (docs/multihost.md): each answers its share of the questions as
``python -m medv_jax.infer`` does (``medv_jax.sampling.shares``); process 0 writes
``questions.jsonl``, merges the answers once every process is done, then scores and writes
``timing.jsonl``, ``metrics.json`` and ``per_question.jsonl``. The answers and scores are those of
one process. After a process died, the same command (on any number of processes) answers only the
missing questions. ``--limit N`` is the first N questions, whatever the process count.

Question records: LLaVA-Med's VQA test files (``id``, ``image``, ``conversations`` with the
question in the human turn and the answer in the gpt turn, ``answer_type``) or flat rows
(``question_id``, ``image``, ``text`` = question, ``answer``, ``answer_type``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from medv_jax.evaluate import generation
from medv_jax.data.records import first_field, load_records, record_id, write_json
from medv_jax.evaluate.response_length import format_length_table, length_stats
from medv_jax.evaluate.vqa_scoring import (
    format_vqa_table,
    predictions_from_records,
    references_from_records,
    score_vqa,
)

__all__ = [
    "METRICS",
    "PER_QUESTION",
    "question_text",
    "question_rows",
    "read_questions",
    "add_arguments",
    "evaluate_run",
    "run",
]

METRICS = "metrics.json"
PER_QUESTION = "per_question.jsonl"
_HUMAN_ROLES = ("human", "user")


def question_text(record: Mapping[str, Any], where: str, question_id: Any) -> str:
    """The question of a record: its first human turn, else ``question``/``text``."""
    turns = first_field(record, ("conversations", "conversatons"))
    if turns is not None and isinstance(turns[1], list):
        for turn in turns[1]:
            if isinstance(turn, Mapping) and turn.get("from") in _HUMAN_ROLES:
                return str(turn.get("value", ""))
    found = first_field(record, ("question", "text"))
    if found is None or not str(found[1]).strip():
        raise ValueError(
            f"{where}: question {question_id!r} has no question text (a human turn in "
            "'conversations', or 'question'/'text')"
        )
    return str(found[1])


def question_rows(records: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    """infer question rows (question_id, image, text) for LLaVA-style records."""
    rows = []
    for index, record in enumerate(records):
        question_id = record_id(record, where, index)
        row = {"question_id": question_id, "text": question_text(record, where, question_id)}
        image = record.get("image")
        if image:
            if not isinstance(image, str):
                raise ValueError(f"{where}: question {question_id!r} has a non-path image {image!r}")
            row["image"] = image
        rows.append(row)
    return rows


def read_questions(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """(records, where) from ``--questions`` or ``--tfds`` (read lazily: TFDS is optional)."""
    if args.tfds:
        try:
            from medv_jax.data.tfds_vqa import read_split
        except ImportError as err:
            raise ValueError(f"--tfds needs medv_jax.data.tfds_vqa ({err})") from None
        return list(read_split(args.tfds, data_dir=args.tfds_data_dir)), f"tfds {args.tfds}"
    return load_records(args.questions), args.questions


def add_arguments(parser: argparse.ArgumentParser, generation_flags: Callable[..., None]) -> None:
    """The run-vqa flags; ``generation_flags(parser, gen_length, block_length, steps)`` adds the
    model, sampler and batching flags (the evaluate command's)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--questions", help="test questions with answers (JSON list or JSONL)")
    source.add_argument("--tfds", help="a TFDS split as NAME:SPLIT (e.g. vqa_rad:test)")
    parser.add_argument("--tfds_data_dir", default=None,
                        help="TFDS data folder of --tfds (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--out", required=True, help="run folder (created; reruns resume)")
    parser.add_argument("--name", default=None, help="run name in reports (default: RUN_DIR's name)")
    parser.add_argument("--dataset", default=None,
                        help="benchmark name for reports, e.g. vqa_rad, slake, pathvqa "
                        "(default: the TFDS name or the question file's name)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only the first N questions (a total over all processes)")
    generation_flags(parser, gen_length=128, block_length=128, steps=128)


def _dataset_name(args: argparse.Namespace) -> str:
    if args.dataset:
        return args.dataset
    if args.tfds:
        return args.tfds.split(":")[0]
    return os.path.splitext(os.path.basename(args.questions))[0]


def evaluate_run(
    records: Sequence[Mapping[str, Any]],
    where: str,
    run_dir: str,
    tokenizer: Any | None,
    extra: Mapping[str, Any] = {},
    quiet: bool = False,
) -> dict[str, Any]:
    """Score the answers in ``run_dir`` against ``records``; write and return metrics.json.

    Questions without an answer (skipped by infer for a bad image, say) count as empty answers
    and are listed under ``missing_ids``."""
    references = references_from_records(records, where=where)
    answers = generation.timed_answers(run_dir, tokenizer)
    wanted = {str(r.question_id) for r in references}
    answers = [a for a in answers if str(a.get("question_id")) in wanted]
    predictions = predictions_from_records(answers, where=os.path.join(run_dir, generation.ANSWERS))
    scores = score_vqa(references, predictions, allow_missing=True)
    lengths = length_stats(answers)
    metrics = {
        "kind": "vqa",
        **extra,
        **scores.to_dict(per_question=False),
        "response_length": lengths.to_dict(),
    }
    write_json(os.path.join(run_dir, METRICS), metrics)
    with open(os.path.join(run_dir, PER_QUESTION), "w", encoding="utf-8") as handle:
        for row in scores.to_dict()["per_question"]:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if not quiet:
        print(format_vqa_table(scores))
        print()
        print(format_length_table({os.path.basename(os.path.normpath(run_dir)): lengths}))
        if scores.missing_ids:
            print(f"\nwarning: {len(scores.missing_ids)} question(s) have no answer and were "
                  "scored as empty answers", file=sys.stderr)
    return metrics


def run(args: argparse.Namespace, overrides: Mapping[str, Any] = {}, quiet: bool = False) -> int:
    from medv_jax.data import tokenizer as tok_lib

    if args.batch_size <= 0:
        raise ValueError(f"--batch_size={args.batch_size} must be positive")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit={args.limit} must be >= 0")
    records, where = read_questions(args)
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise ValueError(f"{where}: no questions")
    rows = question_rows(records, where)
    references_from_records(records, where=where)  # fail on bad references before generating
    from medv_jax.sampling import shares

    process, _ = shares.start_processes()
    run_dir = args.out
    call = generation.generate_answers(args, rows, run_dir, overrides)
    if process != 0:  # process 0 scores the merged answers and writes the run's files
        return 0
    tokenizer = tok_lib.load_tokenizer(os.path.expanduser(args.tokenizer))
    extra = {
        "name": args.name or os.path.basename(os.path.normpath(run_dir)),
        "dataset": _dataset_name(args),
        "questions": where,
        "checkpoint": args.checkpoint,
        "sampler": generation.sampler_settings(args, overrides),
        "last_call": call,
    }
    evaluate_run(records, where, run_dir, tokenizer, extra, quiet=quiet)
    if not quiet:
        print(f"\nwrote {os.path.join(run_dir, METRICS)}", file=sys.stderr)
    return 0
