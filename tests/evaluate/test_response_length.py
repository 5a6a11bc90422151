"""Response-length statistics (paper Table 3), with expectations worked by hand."""

from __future__ import annotations

import pytest

from medv_jax.evaluate.response_length import count_words, format_length_table, length_stats


def test_full_records_by_hand() -> None:
    records = [
        {"question_id": 1, "text": "a b c", "num_tokens": 6, "seconds": 1.5},
        {"question_id": 2, "text": "d  e\n", "num_tokens": 4, "seconds": 0.5},
        {"question_id": 3, "text": "f g h i j", "num_tokens": 10, "seconds": 3.0},
    ]
    stats = length_stats(records)
    # words 3 + 2 + 5 = 10, tokens 20, seconds 5.0 over 3 answers
    assert stats.n_answers == 3
    assert stats.tokens_per_question == pytest.approx(20 / 3)
    assert stats.words_per_question == pytest.approx(10 / 3)
    assert stats.seconds_per_question == pytest.approx(5 / 3)
    assert stats.seconds_per_word == pytest.approx(0.5)  # total seconds / total words
    assert stats.tokens_per_second == pytest.approx(4.0)


def test_seconds_per_word_is_a_ratio_of_totals() -> None:
    # A mean of per-answer ratios would be (1/1 + 1/9) / 2 = 0.556; the paper's measure is
    # (1 + 1) / (1 + 9) = 0.2.
    records = [
        {"text": "one", "num_tokens": 2, "seconds": 1.0},
        {"text": "a b c d e f g h i", "num_tokens": 12, "seconds": 1.0},
    ]
    assert length_stats(records).seconds_per_word == pytest.approx(0.2)


def test_partial_fields_use_the_records_that_have_them() -> None:
    records = [
        {"text": "a b", "num_tokens": 3},  # no time
        {"answer": "c d e f", "seconds": 2.0},  # no tokens; "answer" is accepted as the text
        {"prediction": "g", "num_tokens": 5, "seconds": 1.0},
    ]
    stats = length_stats(records)
    assert (stats.n_answers, stats.n_with_tokens, stats.n_with_seconds) == (3, 2, 2)
    assert stats.words_per_question == pytest.approx(7 / 3)
    assert stats.tokens_per_question == pytest.approx(4.0)  # (3 + 5) / 2
    assert stats.seconds_per_question == pytest.approx(1.5)  # (2 + 1) / 2
    assert stats.seconds_per_word == pytest.approx(3 / 5)  # timed answers: 4 + 1 words
    assert stats.tokens_per_second == pytest.approx(5.0)  # only the third has both


def test_no_timings_and_no_records() -> None:
    stats = length_stats([{"text": "a b"}])
    assert stats.seconds_per_question is None and stats.seconds_per_word is None
    assert stats.tokens_per_question is None and stats.words_per_question == 2
    empty = length_stats([])
    assert empty.n_answers == 0 and empty.words_per_question is None


@pytest.mark.parametrize(
    "record",
    [{"num_tokens": 3}, {"text": "a", "seconds": "fast"}, {"text": "a", "num_tokens": -1}],
)
def test_bad_records_are_rejected(record) -> None:
    with pytest.raises(ValueError):
        length_stats([record])


def test_count_words() -> None:
    assert count_words("  The left\tlung.\n") == 3
    assert count_words("") == 0


def test_table_has_one_column_per_run() -> None:
    table = format_length_table(
        {
            "run_a": length_stats([{"text": "a b c d", "num_tokens": 8, "seconds": 2.0}]),
            "run_b": length_stats([{"text": "a b"}]),
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["statistic", "run_a", "run_b"]
    by_label = {line.rsplit(maxsplit=2)[0].strip(): line.split()[-2:] for line in lines[2:]}
    assert by_label["seconds / word"] == ["0.500", "-"]
    assert by_label["words / question"] == ["4.0", "2.0"]
    assert by_label["tokens / question"] == ["8.0", "-"]
