"""Repetition measures of generated answers (the paper's Section 6.4: with long canvases and few
steps, LLaDA-MedV fills the answer with one token, e.g. "the the the ...").

* Repeated n-gram share of an answer (the "rep-n" of Welleck et al., 2020): the share of its word
  n-grams that repeat an n-gram seen earlier in the same answer, 1 - distinct / total. 0 for an
  answer with fewer than n words (nothing can repeat). Words are lower-cased runs of letters and
  digits, so "The the." repeats.
* Longest run of one token: the most consecutive equal items (token ids of the answer).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Sequence

__all__ = ["words", "repeated_ngram_share", "longest_run", "RepetitionStats", "repetition_stats"]

_WORD = re.compile(r"\w+(?:'\w+)?")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def repeated_ngram_share(tokens: Sequence[Hashable], n: int = 3) -> float:
    """1 - distinct n-grams / n-grams of ``tokens``; 0 when there are no n-grams."""
    if n < 1:
        raise ValueError(f"n-gram size n={n} must be >= 1")
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    distinct = {tuple(tokens[i : i + n]) for i in range(total)}
    return 1.0 - len(distinct) / total


def longest_run(items: Sequence[Hashable]) -> int:
    """Length of the longest stretch of one repeated item (0 for an empty sequence)."""
    best = run = 0
    previous: Any = object()
    for item in items:
        run = run + 1 if item == previous else 1
        best = max(best, run)
        previous = item
    return best


@dataclass(frozen=True)
class RepetitionStats:
    """Means over answers; None when there are no answers."""

    n_answers: int
    ngram: int
    repeated_ngram_share: float | None  # mean over answers, fraction
    longest_token_run: float | None  # mean over answers of the longest run of one token
    max_longest_token_run: int | None
    longest_word_run: float | None  # the same on words (no tokenizer needed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repetition_stats(
    texts: Sequence[str], token_ids: Sequence[Sequence[int]] | None = None, n: int = 3
) -> RepetitionStats:
    """Repetition of a run's answers; ``token_ids`` (one list per answer) for the token runs."""
    if token_ids is not None and len(token_ids) != len(texts):
        raise ValueError(f"{len(token_ids)} token lists for {len(texts)} answers")
    if not texts:
        return RepetitionStats(0, n, None, None, None, None)
    answer_words = [words(t) for t in texts]
    shares = [repeated_ngram_share(w, n) for w in answer_words]
    word_runs = [longest_run(w) for w in answer_words]
    token_runs = [longest_run(list(ids)) for ids in token_ids] if token_ids is not None else None
    count = len(texts)
    return RepetitionStats(
        n_answers=count,
        ngram=n,
        repeated_ngram_share=sum(shares) / count,
        longest_token_run=None if token_runs is None else sum(token_runs) / count,
        max_longest_token_run=None if token_runs is None else max(token_runs),
        longest_word_run=sum(word_runs) / count,
    )
