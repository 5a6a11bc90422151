"""Response-length statistics of an answer file (the paper's Table 3).

The paper reports, per sampling setting, seconds per question, words per answer and seconds per
word (38.4 s, 166.6 words, 0.230 s/word for LLaDA-MedV at L = 256). Seconds per word is total
seconds over total words, i.e. the ratio of the two per-question means (38.4 / 166.6 = 0.230), not
a mean of per-answer ratios, which short answers would dominate.

Answer records carry the answer text (``text``, or ``answer``/``prediction``), ``num_tokens``
(generated tokens) and ``seconds`` (wall time for that answer). Token and time fields are optional:
each statistic uses the records that have its fields and reports how many those were.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from medv_jax.data.records import first_field
from medv_jax.evaluate.tables import format_table

__all__ = ["count_words", "LengthStats", "length_stats", "format_length_table"]

_TEXT_FIELDS = ("text", "answer", "prediction")


def count_words(text: str) -> int:
    """Words as whitespace-separated pieces (what "words per answer" counts in the paper)."""
    return len(text.split())


@dataclass(frozen=True)
class LengthStats:
    """Length and speed statistics of one run; None where no record had the needed fields."""

    n_answers: int
    n_with_tokens: int
    n_with_seconds: int
    tokens_per_question: float | None
    words_per_question: float | None
    seconds_per_question: float | None
    seconds_per_word: float | None
    tokens_per_second: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(record: Mapping[str, Any], name: str, index: int) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"answer record {index}: '{name}' must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"answer record {index}: '{name}' is negative ({value!r})")
    return float(value)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def length_stats(records: Iterable[Mapping[str, Any]]) -> LengthStats:
    """Tokens, words and seconds per question, seconds per word and tokens per second."""
    n = 0
    words_all = 0
    tokens_total, tokens_n = 0.0, 0
    seconds_total, seconds_n = 0.0, 0
    words_timed = 0  # words of the answers that have a time, for seconds per word
    tokens_timed = 0.0  # tokens of the answers that have both, for tokens per second
    seconds_with_tokens = 0.0
    for index, record in enumerate(records):
        found = first_field(record, _TEXT_FIELDS)
        if found is None:
            raise ValueError(f"answer record {index} has no answer text ('text')")
        words = count_words(str(found[1]))
        tokens = _number(record, "num_tokens", index)
        seconds = _number(record, "seconds", index)
        n += 1
        words_all += words
        if tokens is not None:
            tokens_total += tokens
            tokens_n += 1
        if seconds is not None:
            seconds_total += seconds
            seconds_n += 1
            words_timed += words
        if tokens is not None and seconds is not None:
            tokens_timed += tokens
            seconds_with_tokens += seconds
    return LengthStats(
        n_answers=n,
        n_with_tokens=tokens_n,
        n_with_seconds=seconds_n,
        tokens_per_question=_ratio(tokens_total, tokens_n),
        words_per_question=_ratio(words_all, n),
        seconds_per_question=_ratio(seconds_total, seconds_n),
        seconds_per_word=_ratio(seconds_total, words_timed),
        tokens_per_second=_ratio(tokens_timed, seconds_with_tokens),
    )


_ROWS = (
    ("answers", "n_answers", 0),
    ("tokens / question", "tokens_per_question", 1),
    ("words / question", "words_per_question", 1),
    ("seconds / question", "seconds_per_question", 2),
    ("seconds / word", "seconds_per_word", 3),
    ("tokens / second", "tokens_per_second", 1),
)


def format_length_table(runs: Mapping[str, LengthStats]) -> str:
    """One column per run (keyed by a run name), one row per statistic."""
    names = list(runs)
    rows = []
    for label, attribute, digits in _ROWS:
        values = [getattr(runs[name], attribute) for name in names]
        rows.append(
            [label, *(v if not isinstance(v, float) else f"{v:.{digits}f}" for v in values)]
        )
    return format_table(("statistic", *names), rows)
