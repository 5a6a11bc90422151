"""Findings reports of the built-in synthetic set as a benchmark: a question file with images (each
row carrying its scan's attributes), answering through infer, and field accuracy.

    python -m medv_jax.evaluate synthetic-questions --task report --layout slots --num 200 --out reports200
    python -m medv_jax.evaluate sweep --task report --questions reports200/questions.jsonl \\
        --image_folder reports200 --checkpoint workdir/mini/stage2_instruct/model \\
        --tokenizer workdir/mini/stage2_instruct/tokenizer --system_prompt none --out sweep_reports \\
        --settings 96:48:96 96:48:48 96:48:24 96:48:12

Field accuracy (medv_jax.data.synthetic.field_accuracy): the share of a report's attributes
(modality, region, lesion count, each side's lesions with their sizes) stated correctly; a missing
attribute and a hallucinated lesion count as wrong.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from medv_jax.data import synthetic
from medv_jax.evaluate import generation
from medv_jax.data.records import id_key, load_records, write_json
from medv_jax.evaluate.response_length import length_stats

__all__ = ["write_question_set", "scene_of", "score_reports", "run_reports", "add_arguments", "run"]


def write_question_set(out: str, num: int, seed: int = 0, split: str = "test", task: str = "report",
                       layout: str = "free", report_wording: str = "varied") -> str:
    """``out/questions.jsonl`` and ``out/images/*.png`` for records 0..num-1 of the synthetic split;
    each row holds ``question_id``, ``image``, ``text`` (the request), ``answer`` (a reference
    report) and ``meta`` (the scan's attributes). Returns the question file's path."""
    if num < 1:
        raise ValueError(f"--num={num}: give at least one question")
    source = synthetic.SyntheticMedVQA(split, num, seed=seed, task=task, layout=layout,
                                       report_wording=report_wording)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rows = []
    for i in range(num):
        record = source[i]
        image = f"images/{record['id']}.png"
        record["image"].save(os.path.join(out, image))
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        rows.append({"question_id": record["id"], "image": image, "text": question,
                     "answer": record["conversations"][1]["value"], "answer_type": record["answer_type"],
                     "meta": record["meta"]})
    path = os.path.join(out, generation.QUESTIONS)
    generation.write_questions(rows, path)
    return path


def scene_of(meta: Mapping[str, Any]) -> synthetic.Scene:
    """The scene a question row's ``meta`` describes (``Scene.to_dict``'s form)."""
    lesions = tuple(synthetic.Lesion(**lesion) for lesion in meta["lesions"])
    return synthetic.Scene(meta["modality"], meta["region"], lesions)


def score_reports(rows: Sequence[Mapping[str, Any]], answers: Mapping[str, str]) -> dict[str, Any]:
    """Field accuracy (%) over ``rows`` (question rows with ``meta``), overall and per field;
    a question without an answer scores 0."""
    per_field = {f: [] for f in synthetic.REPORT_FIELDS}
    for row in rows:
        correct = synthetic.fields_correct(answers.get(id_key(row["question_id"]), ""), scene_of(row["meta"]))
        for f, ok in correct.items():
            per_field[f].append(ok)
    fields = {f: 100.0 * float(np.mean(v)) for f, v in per_field.items()}
    return {"field_accuracy": float(np.mean(list(fields.values()))), "per_field": fields, "n_reports": len(rows)}


def _question_rows(path: str, limit: int | None) -> list[dict[str, Any]]:
    rows = load_records(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{path}: no questions")
    for index, row in enumerate(rows):
        if not isinstance(row.get("meta"), Mapping) or "lesions" not in row["meta"]:
            raise ValueError(f"{path}: question {row.get('question_id', index)!r} has no scan attributes "
                             "('meta'); write the file with python -m medv_jax.evaluate synthetic-questions")
    return rows


def run_reports(args: argparse.Namespace, overrides: Mapping[str, Any] = {}, quiet: bool = False) -> dict[str, Any]:
    """Answer the report questions into ``args.out`` (resuming) and write ``metrics.json`` with
    field accuracy and the response lengths."""
    from medv_jax.data import tokenizer as tok_lib

    rows = _question_rows(args.questions, args.limit)
    run_dir = overrides.get("out", args.out)
    call = generation.generate_answers(args, [{k: r[k] for k in ("question_id", "image", "text")} for r in rows],
                                       run_dir, overrides)
    tokenizer = tok_lib.load_tokenizer(os.path.expanduser(args.tokenizer))
    records = generation.timed_answers(run_dir, tokenizer)
    answers = {id_key(a["question_id"]): str(a.get("text", "")) for a in records}
    metrics = {"kind": "report", "name": overrides.get("name") or os.path.basename(os.path.normpath(run_dir)),
               "questions": args.questions, "checkpoint": args.checkpoint,
               "sampler": generation.sampler_settings(args, overrides), "last_call": call,
               **score_reports(rows, answers),
               "response_length": length_stats(records).to_dict() if records else None}
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    if not quiet:
        fields = ", ".join(f"{f} {v:.1f}" for f, v in metrics["per_field"].items())
        print(f"field accuracy {metrics['field_accuracy']:.2f} % over {len(rows)} reports ({fields})")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for questions.jsonl and images/")
    parser.add_argument("--num", type=int, default=200, help="how many scans (records 0..num-1)")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic set's data seed")
    parser.add_argument("--split", default="test", help="synthetic split (test: never seen in training)")
    parser.add_argument("--task", choices=["report"], default="report", help="what the questions ask")
    parser.add_argument("--layout", choices=synthetic.LAYOUTS, default="free",
                        help="where lesions lie (the miniature recipe trains on 'slots')")
    parser.add_argument("--report_wording", choices=synthetic.REPORT_WORDINGS, default="varied",
                        help="the reference reports' sentence forms (as the model's training data has them)")


def run(args: argparse.Namespace) -> int:
    path = write_question_set(args.out, args.num, args.seed, args.split, args.task, args.layout,
                              args.report_wording)
    print(json.dumps({"questions": path, "images": os.path.join(args.out, "images"), "num": args.num}))
    return 0
