"""Repetition measures and the sweep grid, on hand-worked cases."""

from __future__ import annotations

import pytest

from medv_jax.evaluate.repetition import longest_run, repeated_ngram_share, repetition_stats, words
from medv_jax.evaluate.sweep import grid, parse_setting


def test_words_lowercase_without_punctuation():
    assert words("The the, THE.") == ["the", "the", "the"]
    assert words("It's a 3-cm mass!") == ["it's", "a", "3", "cm", "mass"]


@pytest.mark.parametrize("tokens, n, expected", [
    (["the", "the", "the"], 1, 2 / 3),  # 3 unigrams, 1 distinct
    (["the", "the", "the"], 2, 1 / 2),  # (the the) twice
    (["the", "the", "the"], 3, 0.0),  # one trigram cannot repeat
    (list("abcabc"), 3, 1 / 4),  # abc bca cab abc: 4 trigrams, 3 distinct
    (list("abcabc"), 2, 2 / 5),  # ab bc ca ab bc: 5 bigrams, 3 distinct
    (list("abcd"), 2, 0.0),
    (["one", "two"], 3, 0.0),  # fewer words than n
    ([], 3, 0.0),
])
def test_repeated_ngram_share(tokens, n, expected):
    assert repeated_ngram_share(tokens, n) == pytest.approx(expected)


def test_repeated_ngram_share_rejects_bad_n():
    with pytest.raises(ValueError, match="n=0"):
        repeated_ngram_share(["a"], 0)


@pytest.mark.parametrize("items, expected", [
    ([], 0), ([5], 1), ([1, 1, 2, 2, 2, 1], 3), ([7, 7, 7, 7], 4), ([1, 2, 1, 2], 1),
    (["the", "cat", "the", "the"], 2),
])
def test_longest_run(items, expected):
    assert longest_run(items) == expected


def test_repetition_stats_means_over_answers():
    stats = repetition_stats(["the the the the", "a b c a b c"], [[7, 7, 7, 7], [1, 2, 3, 1, 2, 3]], n=3)
    # trigrams: (the the the) x2 -> 1/2 repeated; abc bca cab abc -> 1/4; mean 3/8
    assert stats.repeated_ngram_share == pytest.approx(0.375)
    assert stats.longest_token_run == pytest.approx(2.5) and stats.max_longest_token_run == 4
    assert stats.longest_word_run == pytest.approx(2.5) and stats.n_answers == 2
    no_tokens = repetition_stats(["x y"], None)
    assert no_tokens.longest_token_run is None and no_tokens.repeated_ngram_share == 0.0
    assert repetition_stats([]).repeated_ngram_share is None
    with pytest.raises(ValueError, match="1 token lists for 2 answers"):
        repetition_stats(["a", "b"], [[1]])


def test_grid_keeps_valid_settings_in_order():
    valid, skipped = grid([4, 8], [4, 8], [2, 4])
    assert valid == [(4, 4, 2), (4, 4, 4), (8, 4, 2), (8, 8, 2), (8, 4, 4), (8, 8, 4)]
    assert len(skipped) == 2 and all("L=4 B=8" in s for s in skipped)
    single, _ = grid([8], None, [4, 16])  # one block per setting; steps > gen_length is invalid
    assert single == [(8, 8, 4)]
    explicit, _ = grid([], None, [], [(256, 64, 256), (256, 64, 256)])
    assert explicit == [(256, 64, 256)]
    assert parse_setting("256:64:256") == (256, 64, 256) == parse_setting("256/64/256")
    with pytest.raises(ValueError, match="--settings '256:64'"):
        parse_setting("256:64")


def test_sweep_rejects_single_setting_flags(capsys):
    from medv_jax.evaluate.__main__ import main

    assert main(["sweep", "--questions", "q.jsonl", "--out", "o", "--checkpoint", "c", "--tokenizer", "t",
                 "--settings", "8:8:8", "--steps", "4"]) == 2
    assert "not --steps" in capsys.readouterr().err
