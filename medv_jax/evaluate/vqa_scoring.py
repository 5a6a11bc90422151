"""Scoring a whole VQA test split: match predictions to references, aggregate per answer type.

Aggregates are in percent (as LLaVA-Med and the paper report them); per-question scores are
fractions. Closed accuracy is the mean of :func:`~medv_jax.evaluate.vqa_metrics.closed_hit` over
closed questions; open recall (the paper's open-question number) and the extras are means of
:func:`~medv_jax.evaluate.vqa_metrics.open_scores` over open questions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from medv_jax.data.records import first_field, id_key, load_records, record_id
from medv_jax.evaluate.tables import format_table
from medv_jax.evaluate.vqa_metrics import OpenScores, closed_hit, open_scores

__all__ = [
    "CLOSED",
    "OPEN",
    "OPEN_METRICS",
    "VQAReference",
    "IdMismatchError",
    "references_from_records",
    "predictions_from_records",
    "load_references",
    "load_predictions",
    "QuestionScore",
    "VQAScores",
    "score_vqa",
    "format_vqa_table",
]

CLOSED = "closed"
OPEN = "open"

#: Open-question metrics, in table order.
OPEN_METRICS: tuple[str, ...] = (
    "recall", "precision", "f1", "exact_match", "bleu_1", "bleu_2", "bleu_3", "bleu_4",
)

# Where the ground truth may live in a reference record, most explicit first. "text" is absent on
# purpose: in LLaVA-style question files it is the question.
_ANSWER_FIELDS = ("answer", "gt_answer", "gpt_answer", "ground_truth", "gt")
# LLaVA-Med's own VQA test files keep the answer in the gpt turn; some ship the key misspelled.
_CONVERSATION_FIELDS = ("conversations", "conversatons")
_ASSISTANT_ROLES = ("gpt", "assistant")
# Where the model's answer may live in a prediction record (LLaVA answer files use "text").
_PREDICTION_FIELDS = ("text", "answer", "prediction")


@dataclass(frozen=True)
class VQAReference:
    """One test question: its id, ground-truth answer and answer type ("closed" or "open")."""

    question_id: Any
    answer: str
    answer_type: str


class IdMismatchError(ValueError):
    """Predictions and references do not cover the same question ids."""

    def __init__(self, missing: Sequence[Any], unknown: Sequence[Any], allow_missing: bool):
        self.missing = list(missing)
        self.unknown = list(unknown)
        parts = []
        if self.missing:
            parts.append(
                f"{len(self.missing)} reference question id(s) have no prediction: "
                f"{_show_ids(self.missing)}"
            )
        if self.unknown:
            parts.append(
                f"{len(self.unknown)} prediction question id(s) are not in the references: "
                f"{_show_ids(self.unknown)}"
            )
        message = "predictions do not match references; " + "; ".join(parts)
        if self.missing and not allow_missing:
            message += " (pass --allow_missing to score missing predictions as empty answers)"
        super().__init__(message)


def _show_ids(ids: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    more = f", ... ({len(ids) - limit} more)" if len(ids) > limit else ""
    return f"[{shown}{more}]"


def _answer_type(value: Any, where: str, question_id: Any) -> str:
    kind = str(value).strip().lower()
    if kind not in (CLOSED, OPEN):
        raise ValueError(
            f"{where}: question {question_id!r} has answer_type {value!r}; expected CLOSED or OPEN"
        )
    return kind


def _ground_truth(record: Mapping[str, Any], where: str, question_id: Any) -> str:
    found = first_field(record, _ANSWER_FIELDS)
    if found is not None:
        value = found[1]
    else:
        turns = first_field(record, _CONVERSATION_FIELDS)
        value = None
        if turns is not None and isinstance(turns[1], list):
            for turn in turns[1]:
                if isinstance(turn, Mapping) and turn.get("from") in _ASSISTANT_ROLES:
                    value = turn.get("value")
                    break
        if value is None:
            raise ValueError(
                f"{where}: question {question_id!r} has no ground truth (looked for "
                f"{', '.join(_ANSWER_FIELDS)} and a gpt turn in 'conversations')"
            )
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where}: question {question_id!r} has a non-text answer {value!r}")
    return str(value)


def references_from_records(
    records: Iterable[Mapping[str, Any]], where: str = "references"
) -> list[VQAReference]:
    """References from LLaVA-Med-style records.

    Accepted: ``question_id`` or ``id``; the answer in ``answer`` (or ``gt_answer``,
    ``gpt_answer``, ``ground_truth``, ``gt``) or in the first gpt/assistant turn of
    ``conversations`` (LLaVA-Med's test.json); ``answer_type`` CLOSED/OPEN in any case.
    Duplicate ids are an error.
    """
    references: list[VQAReference] = []
    seen: set[str] = set()
    duplicates: list[Any] = []
    for index, record in enumerate(records):
        question_id = record_id(record, where, index)
        if id_key(question_id) in seen:
            duplicates.append(question_id)
        seen.add(id_key(question_id))
        if record.get("answer_type") is None:
            raise ValueError(f"{where}: question {question_id!r} has no 'answer_type'")
        references.append(
            VQAReference(
                question_id=question_id,
                answer=_ground_truth(record, where, question_id),
                answer_type=_answer_type(record["answer_type"], where, question_id),
            )
        )
    if duplicates:
        raise ValueError(f"{where}: duplicate question ids {_show_ids(duplicates)}")
    return references


def predictions_from_records(
    records: Iterable[Mapping[str, Any]], where: str = "predictions"
) -> dict[Any, str]:
    """Predicted answers keyed by question id (as in the file), from ``question_id``/``id`` and
    ``text`` (LLaVA answer files), ``answer`` or ``prediction``. Duplicate ids are an error."""
    predictions: dict[Any, str] = {}
    seen: set[str] = set()
    duplicates: list[Any] = []
    for index, record in enumerate(records):
        question_id = record_id(record, where, index)
        found = first_field(record, _PREDICTION_FIELDS)
        if found is None:
            raise ValueError(
                f"{where}: question {question_id!r} has no answer text "
                f"(looked for {', '.join(_PREDICTION_FIELDS)})"
            )
        if id_key(question_id) in seen:
            duplicates.append(question_id)
        seen.add(id_key(question_id))
        predictions[question_id] = str(found[1])
    if duplicates:
        raise ValueError(f"{where}: duplicate question ids {_show_ids(duplicates)}")
    return predictions


def load_references(path: str | os.PathLike[str]) -> list[VQAReference]:
    """:func:`references_from_records` on a JSON or JSON Lines file."""
    return references_from_records(load_records(path), where=str(path))


def load_predictions(path: str | os.PathLike[str]) -> dict[Any, str]:
    """:func:`predictions_from_records` on a JSON or JSON Lines file."""
    return predictions_from_records(load_records(path), where=str(path))


@dataclass(frozen=True)
class QuestionScore:
    """One scored question. ``scores`` holds ``closed_hit`` or the open metrics (fractions)."""

    question_id: Any
    answer_type: str
    ground_truth: str
    prediction: str
    missing: bool
    scores: dict[str, float]


@dataclass(frozen=True)
class VQAScores:
    """Aggregates over a split, in percent; None where a type has no questions."""

    n_closed: int
    n_open: int
    closed_accuracy: float | None
    open_means: dict[str, float | None]
    missing_ids: list[Any] = field(default_factory=list)
    per_question: list[QuestionScore] = field(default_factory=list)

    @property
    def open_recall(self) -> float | None:
        """The paper's open-question number: mean unigram recall, in percent."""
        return self.open_means["recall"]

    def to_dict(self, per_question: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = {
            "closed_accuracy": self.closed_accuracy,
            "open_recall": self.open_recall,
            "n_closed": self.n_closed,
            "n_open": self.n_open,
            "n_missing": len(self.missing_ids),
            "missing_ids": list(self.missing_ids),
            "units": "percent",
            "closed": {"count": self.n_closed, "accuracy": self.closed_accuracy},
            "open": {"count": self.n_open, **self.open_means},
        }
        if per_question:
            result["per_question"] = [
                {
                    "question_id": q.question_id,
                    "answer_type": q.answer_type,
                    "ground_truth": q.ground_truth,
                    "prediction": q.prediction,
                    "missing": q.missing,
                    **q.scores,
                }
                for q in self.per_question
            ]
        return result


def _percent_mean(values: Sequence[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def score_vqa(
    references: Sequence[VQAReference],
    predictions: Mapping[Any, str],
    allow_missing: bool = False,
) -> VQAScores:
    """Score ``predictions`` (question id -> answer text) against ``references``.

    Every reference needs a prediction and every prediction a reference; otherwise
    :class:`IdMismatchError` names the offending ids. With ``allow_missing``, references without a
    prediction are scored as empty answers (0 on every metric) and listed in ``missing_ids``;
    predictions for unknown ids remain an error.
    """
    by_key = {id_key(k): v for k, v in predictions.items()}
    if len(by_key) != len(predictions):
        raise ValueError("predictions hold the same question id twice (e.g. as 12 and '12')")
    reference_keys = {id_key(r.question_id) for r in references}
    missing = [r.question_id for r in references if id_key(r.question_id) not in by_key]
    unknown = [k for k in predictions if id_key(k) not in reference_keys]
    if unknown or (missing and not allow_missing):
        raise IdMismatchError(missing, unknown, allow_missing)

    closed_hits: list[float] = []
    open_results: list[OpenScores] = []
    per_question: list[QuestionScore] = []
    for reference in references:
        key = id_key(reference.question_id)
        prediction = by_key.get(key, "")
        if reference.answer_type == CLOSED:
            hit = closed_hit(prediction, reference.answer)
            closed_hits.append(hit)
            scores: dict[str, float] = {"closed_hit": hit}
        else:
            result = open_scores(prediction, reference.answer)
            open_results.append(result)
            scores = result.to_dict()
        per_question.append(
            QuestionScore(
                question_id=reference.question_id,
                answer_type=reference.answer_type,
                ground_truth=reference.answer,
                prediction=prediction,
                missing=key not in by_key,
                scores=scores,
            )
        )
    return VQAScores(
        n_closed=len(closed_hits),
        n_open=len(open_results),
        closed_accuracy=_percent_mean(closed_hits),
        open_means={
            name: _percent_mean([getattr(r, name) for r in open_results]) for name in OPEN_METRICS
        },
        missing_ids=missing,
        per_question=per_question,
    )


_OPEN_LABELS = {
    "recall": "open recall (%)",
    "precision": "open precision (%)",
    "f1": "open F1 (%)",
    "exact_match": "open exact match (%)",
    "bleu_1": "open BLEU-1 (%)",
    "bleu_2": "open BLEU-2 (%)",
    "bleu_3": "open BLEU-3 (%)",
    "bleu_4": "open BLEU-4 (%)",
}


def format_vqa_table(scores: VQAScores) -> str:
    """Headline numbers first (closed accuracy, open recall), then counts, then the extras."""
    rows: list[tuple[str, object]] = [
        ("closed accuracy (%)", scores.closed_accuracy),
        ("open recall (%)", scores.open_recall),
        ("closed questions", scores.n_closed),
        ("open questions", scores.n_open),
    ]
    if scores.missing_ids:
        rows.append(("missing predictions (scored empty)", len(scores.missing_ids)))
    rows.extend((_OPEN_LABELS[name], scores.open_means[name]) for name in OPEN_METRICS[1:])
    return format_table(("metric", "value"), rows)
