"""The open-ended biomedical conversation benchmark (LLaVA-Med's 193 questions on 50 images; the
paper's Table 1), generation and judge scoring.

    python -m medv_jax.evaluate run-conversation --checkpoint DIR --tokenizer DIR \\
        --questions llava_med_eval_qa50_qa.jsonl --image_folder IMAGES --out RUN_DIR \\
        --judge_base_url https://api.openai.com/v1 --judge_model gpt-4.1-mini
        [--gen_length 256 --block_length 64 --steps 256 ...]
    python -m medv_jax.evaluate judge --questions ... --answers answers.jsonl --out RUN_DIR

Question records: ``question_id``, ``image``, ``text`` (the question), ``type`` (conversation or
detailed_description), ``domain`` (flags chest_xray, mri, histology, gross, ct_scan),
``gpt4_answer`` (the reference), ``fig_caption``, ``fig_label``, ``in_text_mention``.

Score (LLaVA-Med's summarize_gpt_review): per question the judge gives the reference s1 and the
candidate s2; a group's score is mean(s2 / s1) * 100 over its questions. A question counts in its
type, in one domain (the first flag set in the order chest_xray, mri, histology, gross, ct_scan:
some images are flagged both histology and gross) and in overall. Questions the judge could not
score are reported and left out of every mean.

RUN_DIR receives ``answers.jsonl`` (generation), ``judgements.jsonl`` (per question: scores,
reply, errors), ``metrics.json`` (kind "conversation") and, by default, the judge cache in
``RUN_DIR/judge_cache`` (``--judge_cache`` to share one between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from medv_jax.evaluate import generation, judge
from medv_jax.data.records import first_field, id_key, load_records, record_id, write_json
from medv_jax.evaluate.response_length import format_length_table, length_stats
from medv_jax.evaluate.tables import format_table

__all__ = [
    "DOMAINS",
    "TYPES",
    "GROUPS",
    "ConversationQuestion",
    "parse_questions",
    "domain_of",
    "GroupScore",
    "score_judgements",
    "format_conversation_table",
    "add_judge_arguments",
    "judge_config_from",
    "judge_answers",
    "add_run_arguments",
    "add_judge_command_arguments",
    "run_conversation",
    "run_judge",
]

#: Domain flags in LLaVA-Med's priority order, with the paper's column names.
DOMAINS: tuple[tuple[str, str], ...] = (
    ("chest_xray", "CXR"),
    ("mri", "MRI"),
    ("histology", "Histology"),
    ("gross", "Gross"),
    ("ct_scan", "CT"),
)
#: Question types in the file -> the paper's column names.
TYPES: dict[str, str] = {
    "conversation": "Conversation",
    "detailed_description": "Description",
    "description": "Description",
}
#: Table 1's columns, in order.
GROUPS: tuple[str, ...] = ("Conversation", "Description", *(name for _, name in DOMAINS), "Overall")


@dataclass(frozen=True)
class ConversationQuestion:
    question_id: Any
    image: str | None
    text: str
    type: str  # "Conversation" or "Description"
    domain: str  # one of the DOMAINS names
    reference: str  # gpt4_answer
    fig_caption: str
    fig_label: str
    mentions: Any


def domain_of(record: Mapping[str, Any], where: str, question_id: Any) -> str:
    """The record's domain: the first flag set, in LLaVA-Med's order."""
    flags = record.get("domain")
    if isinstance(flags, str):  # a single name is accepted too
        for key, name in DOMAINS:
            if flags.strip().lower() in (key, name.lower()):
                return name
        raise ValueError(f"{where}: question {question_id!r} has unknown domain {flags!r}")
    if not isinstance(flags, Mapping):
        raise ValueError(f"{where}: question {question_id!r} has no 'domain' flags")
    for key, name in DOMAINS:
        if flags.get(key):
            return name
    raise ValueError(
        f"{where}: question {question_id!r} has no domain flag set (one of "
        f"{', '.join(k for k, _ in DOMAINS)})"
    )


def parse_questions(records: Sequence[Mapping[str, Any]], where: str) -> list[ConversationQuestion]:
    """Benchmark questions from LLaVA-Med's qa50 records; one clear error per bad record."""
    questions = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        question_id = record_id(record, where, index)
        if id_key(question_id) in seen:
            raise ValueError(f"{where}: duplicate question id {question_id!r}")
        seen.add(id_key(question_id))
        kind = str(record.get("type", "")).strip().lower()
        if kind not in TYPES:
            raise ValueError(
                f"{where}: question {question_id!r} has type {record.get('type')!r}; expected "
                "conversation or detailed_description"
            )
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: question {question_id!r} has no question 'text'")
        reference = first_field(record, ("gpt4_answer", "answer"))
        if reference is None:
            raise ValueError(f"{where}: question {question_id!r} has no reference 'gpt4_answer'")
        questions.append(
            ConversationQuestion(
                question_id=question_id,
                image=record.get("image") or None,
                text=text,
                type=TYPES[kind],
                domain=domain_of(record, where, question_id),
                reference=str(reference[1]),
                fig_caption=str(record.get("fig_caption") or ""),
                fig_label=str(record.get("fig_label") or ""),
                mentions=record.get("in_text_mention"),
            )
        )
    return questions


@dataclass(frozen=True)
class GroupScore:
    """One column of Table 1: relative score in percent and the mean raw scores."""

    count: int
    relative_score: float | None  # mean(s2 / s1) * 100
    reference_score: float | None  # mean s1
    candidate_score: float | None  # mean s2


def _group(pairs: Sequence[tuple[float, float]]) -> GroupScore:
    if not pairs:
        return GroupScore(0, None, None, None)
    n = len(pairs)
    return GroupScore(
        count=n,
        relative_score=100.0 * sum(s2 / s1 for s1, s2 in pairs) / n,
        reference_score=sum(s1 for s1, _ in pairs) / n,
        candidate_score=sum(s2 for _, s2 in pairs) / n,
    )


def score_judgements(rows: Sequence[Mapping[str, Any]]) -> dict[str, GroupScore]:
    """Table 1 from rows with ``type``, ``domain``, ``reference_score`` (s1) and
    ``candidate_score`` (s2); rows without scores are skipped."""
    groups: dict[str, list[tuple[float, float]]] = {name: [] for name in GROUPS}
    for row in rows:
        s1, s2 = row.get("reference_score"), row.get("candidate_score")
        if s1 is None or s2 is None:
            continue
        pair = (float(s1), float(s2))
        for name in (row["type"], row["domain"], "Overall"):
            groups[name].append(pair)
    return {name: _group(pairs) for name, pairs in groups.items()}


def format_conversation_table(scores: Mapping[str, GroupScore]) -> str:
    headers = ("", *GROUPS)
    rows = [
        ("questions", *(scores[g].count for g in GROUPS)),
        ("score mean(s2/s1)*100", *(scores[g].relative_score for g in GROUPS)),
        ("judge s1 (reference)", *(scores[g].reference_score for g in GROUPS)),
        ("judge s2 (candidate)", *(scores[g].candidate_score for g in GROUPS)),
    ]
    return format_table(headers, rows, digits=3)


# ---- judge flags -------------------------------------------------------------------------------


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("judge (any OpenAI-compatible chat endpoint)")
    g.add_argument("--judge_base_url", default=None,
                   help="endpoint base URL, e.g. https://api.openai.com/v1 "
                   "(default: $MEDV_JUDGE_BASE_URL, then $OPENAI_BASE_URL)")
    g.add_argument("--judge_model", default=None,
                   help="judge model (default: $MEDV_JUDGE_MODEL, then gpt-4.1-mini as in the paper)")
    g.add_argument("--judge_api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (keys are never taken as flags, "
                   "so they stay out of shell history and process lists)")
    g.add_argument("--judge_concurrency", type=int, default=4, help="requests in flight")
    g.add_argument("--judge_timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--judge_retries", type=int, default=5, help="retries of a failed request")
    g.add_argument("--judge_parse_retries", type=int, default=2,
                   help="extra asks when the reply's first line holds no two scores")
    g.add_argument("--judge_backoff", type=float, default=2.0,
                   help="first retry wait in seconds (doubles each retry)")
    g.add_argument("--judge_cache", default=None, help="judgement cache folder (default: RUN_DIR/judge_cache)")
    g.add_argument("--prompt_style", default="llava_med", choices=["llava_med", "clean"],
                   help="llava_med: LLaVA-Med's prompt text exactly (question with <image>, mentions "
                   "as a raw list); clean: <image> removed, mention sentences listed")


def judge_config_from(args: argparse.Namespace, run_dir: str) -> judge.JudgeConfig:
    base_url = (args.judge_base_url or os.environ.get("MEDV_JUDGE_BASE_URL")
                or os.environ.get("OPENAI_BASE_URL") or "")
    model = args.judge_model or os.environ.get("MEDV_JUDGE_MODEL") or "gpt-4.1-mini"
    return judge.JudgeConfig(
        base_url=base_url,
        model=model,
        api_key=os.environ.get(args.judge_api_key_env) or None,
        timeout=args.judge_timeout,
        max_retries=args.judge_retries,
        parse_retries=args.judge_parse_retries,
        backoff=args.judge_backoff,
        concurrency=args.judge_concurrency,
        cache_dir=args.judge_cache or os.path.join(run_dir, "judge_cache"),
    )


JUDGEMENTS = "judgements.jsonl"


def judge_answers(
    questions: Sequence[ConversationQuestion],
    answers: Mapping[str, str],
    config: judge.JudgeConfig,
    run_dir: str,
    prompt_style: str = "llava_med",
    progress: bool = True,
    sleep=None,
) -> tuple[list[dict[str, Any]], dict[str, GroupScore]]:
    """Judge every answered question; write judgements.jsonl; return (rows, Table 1 scores)."""
    todo = [q for q in questions if id_key(q.question_id) in answers]
    conversations = [
        judge.judge_messages(
            judge.judge_user_prompt(
                q.text, q.reference, answers[id_key(q.question_id)], q.fig_caption, q.fig_label,
                q.mentions, prompt_style,
            )
        )
        for q in todo
    ]
    kwargs = {} if sleep is None else {"sleep": sleep}
    verdicts = judge.judge_all(config, conversations, progress=progress, **kwargs)
    rows = []
    for q, verdict in zip(todo, verdicts):
        rows.append({
            "question_id": q.question_id,
            "type": q.type,
            "domain": q.domain,
            "reference_score": verdict.reference_score,
            "candidate_score": verdict.candidate_score,
            "cached": verdict.cached,
            "requests": verdict.requests,
            "error": verdict.error,
            "reply": verdict.reply,
            "request_key": verdict.key,
        })
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, JUDGEMENTS), "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows, score_judgements(rows)


# ---- commands ----------------------------------------------------------------------------------


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", required=True,
                        help="benchmark questions (LLaVA-Med llava_med_eval_qa50_qa.jsonl format)")
    parser.add_argument("--out", required=True, help="run folder (created; reruns resume)")
    parser.add_argument("--name", default=None, help="run name in reports (default: RUN_DIR's name)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")


def add_run_arguments(parser: argparse.ArgumentParser, generation_flags: Callable[..., None]) -> None:
    """The run-conversation flags; ``generation_flags`` as in ``run_vqa.add_arguments``."""
    _common_arguments(parser)
    parser.add_argument("--no_judge", action="store_true", help="generate answers only")
    generation_flags(parser, gen_length=256, block_length=64, steps=256)
    add_judge_arguments(parser)


def add_judge_command_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--answers", required=True,
                        help="answer file (question_id and text), e.g. another model's")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_judge_arguments(parser)


def _load(args: argparse.Namespace) -> list[ConversationQuestion]:
    questions = parse_questions(load_records(args.questions), args.questions)
    if args.limit is not None:
        questions = questions[: args.limit]
    if not questions:
        raise ValueError(f"{args.questions}: no questions")
    return questions


def _finish(
    args: argparse.Namespace,
    questions: Sequence[ConversationQuestion],
    answer_records: Sequence[Mapping[str, Any]],
    run_dir: str,
    extra: Mapping[str, Any],
    judge_it: bool,
    quiet: bool = False,
) -> dict[str, Any]:
    wanted = {id_key(q.question_id) for q in questions}
    answer_records = [a for a in answer_records if id_key(a.get("question_id")) in wanted]
    answers = {id_key(a["question_id"]): str(a.get("text", "")) for a in answer_records}
    missing = [q.question_id for q in questions if id_key(q.question_id) not in answers]
    metrics: dict[str, Any] = {
        "kind": "conversation",
        "name": args.name or os.path.basename(os.path.normpath(run_dir)),
        "dataset": "llava_med_conversation",
        "questions": args.questions,
        **extra,
        "n_questions": len(questions),
        "n_missing_answers": len(missing),
        "missing_ids": missing,
        "response_length": length_stats(answer_records).to_dict() if answer_records else None,
    }
    if judge_it:
        config = judge_config_from(args, run_dir)
        rows, scores = judge_answers(
            questions, answers, config, run_dir, args.prompt_style,
            progress=not getattr(args, "no_progress", False),
        )
        failed = [r for r in rows if r["error"]]
        metrics.update({
            "judge": {"base_url": config.base_url, "model": config.model,
                      "prompt_style": args.prompt_style},
            "scores": {name: vars(score) for name, score in scores.items()},
            "overall": scores["Overall"].relative_score,
            "n_judged": scores["Overall"].count,
            "n_judge_failures": len(failed),
            "judge_failures": [{"question_id": r["question_id"], "error": r["error"]} for r in failed],
            "judge_requests": sum(r["requests"] for r in rows),
            "judge_cached": sum(1 for r in rows if r["cached"]),
        })
        if not quiet:
            print(format_conversation_table(scores))
            print(f"\njudge: {metrics['judge_requests']} request(s) sent, "
                  f"{metrics['judge_cached']} judgement(s) from the cache", file=sys.stderr)
            for failure in failed[:10]:  # all of them are in metrics.json and judgements.jsonl
                print(f"judge failed on question {failure['question_id']!r}: {failure['error']}",
                      file=sys.stderr)
            if len(failed) > 10:
                print(f"... and {len(failed) - 10} more judge failures (see {JUDGEMENTS})",
                      file=sys.stderr)
    if not quiet and metrics["response_length"]:
        print()
        print(format_length_table({metrics["name"]: length_stats(answer_records)}))
    if missing and not quiet:
        print(f"warning: {len(missing)} question(s) have no answer", file=sys.stderr)
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    return metrics


def run_conversation(args: argparse.Namespace, overrides: Mapping[str, Any] = {},
                     quiet: bool = False) -> int:
    """Generate the benchmark's answers with the sampler (resuming), then judge them."""
    from medv_jax.data import tokenizer as tok_lib

    questions = _load(args)
    run_dir = args.out
    if not args.no_judge:
        judge_config_from(args, run_dir)  # bad judge flags fail before hours of generation
    rows = [{"question_id": q.question_id, "text": q.text, **({"image": q.image} if q.image else {})}
            for q in questions]
    call = generation.generate_answers(args, rows, run_dir, overrides)
    tokenizer = tok_lib.load_tokenizer(os.path.expanduser(args.tokenizer))
    extra = {"checkpoint": args.checkpoint, "sampler": generation.sampler_settings(args, overrides),
             "last_call": call}
    _finish(args, questions, generation.timed_answers(run_dir, tokenizer), run_dir, extra,
            judge_it=not args.no_judge, quiet=quiet)
    return 0


def run_judge(args: argparse.Namespace) -> int:
    """Judge an existing answer file (any model's) into RUN_DIR."""
    questions = _load(args)
    records = load_records(args.answers)
    for index, record in enumerate(records):
        record_id(record, args.answers, index)
    _finish(args, questions, records, args.out, {"answers": args.answers}, judge_it=True)
    return 0
