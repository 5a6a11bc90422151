"""VQA metrics against hand-worked cases and against LLaVA-Med's own scores on 400 real cases.

Every expected value below was worked out by hand from the rules in docs/algorithm.md §6 and
LLaVA-Med's evaluation script; none is computed with the code under test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from medv_jax.evaluate.vqa_metrics import (
    CONTRACTIONS,
    bleu,
    bleu_n,
    brevity_penalty,
    closed_hit,
    exact_match,
    modified_precision,
    normalize_answer,
    open_scores,
    unigram_scores,
)
from medv_jax.evaluate.vqa_scoring import VQAReference, score_vqa

# ---------------------------------------------------------------------------------------------
# Normalisation, rule by rule.
# ---------------------------------------------------------------------------------------------

NORMALISATION_CASES = [
    # lower-casing
    ("YES", "yes"),
    ("LEFT Lung", "left lung"),
    # punctuation touching a space is deleted
    ("yes, it is", "yes it is"),
    ("is it? yes", "is it yes"),
    ("brain; skull", "brain skull"),
    ('say "no" now', "say no now"),
    # punctuation touching no space becomes a space
    ("left/right", "left right"),
    ("x-ray", "x ray"),
    ("yes?", "yes"),
    ("yes,no", "yes no"),
    ("[left]", "left"),
    ('"left"', "left"),
    ("{x}", "x"),
    ("`x`", "x"),
    ("x;y", "x y"),
    ("left\\right", "left right"),
    ("t2_flair", "t2 flair"),
    ("x=y", "x y"),
    ("hiv+", "hiv"),
    ("<5 mm", "5 mm"),
    ("x>y", "x y"),
    ("yes!!", "yes"),
    # "@" becomes a space, which frees the article "a", which is then dropped
    ("a@b", "b"),
    # the decision is per mark over the whole text: one "/" next to a space deletes both
    ("x/y / z", "xy z"),
    # "(" touches no space (start of text) so it becomes a space; ")" is followed by a space so
    # it is deleted; the freed "a" is an article
    ("(a) left", "left"),
    # one digit-comma-digit anywhere deletes every mark, hyphens included
    ("1,000 cells", "1000 cells"),
    ("left-sided, 2,5 cm", "leftsided 25 cm"),
    ("1,2,3", "123"),
    # periods: stripped unless a digit follows, whatever precedes them
    ("end.", "end"),
    ("3.5 cm", "3.5 cm"),
    ("3.", "3"),
    (".5", ".5"),
    ("1.5.", "1.5"),
    ("e.g. liver", "eg liver"),
    ("well... yes", "well yes"),
    # marks outside the list survive
    ("answer: yes", "answer: yes"),
    ("patient's", "patient's"),
    ("50%", "50%"),
    ("x*y", "x*y"),
    ("© 2023", "© 2023"),
    # number words zero..ten (and none) become digits; others do not
    ("two lesions", "2 lesions"),
    ("None", "0"),
    ("zero", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("one-two", "1 2"),
    ("the one", "1"),
    # articles
    ("the left lung", "left lung"),
    ("An apple a day", "apple day"),
    ("A", ""),
    ("theory", "theory"),
    # contractions
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("wont", "won't"),
    ("hes", "he's"),
    ("its", "its"),  # not in the table
    ("somebody'd", "somebodyd"),  # the reference table's typo, kept
    ("Im", "im"),  # the table's "Im" key can never match a lower-cased token
    # whitespace
    ("  left \t lung \n", "left lung"),
    ("", ""),
]


@pytest.mark.parametrize("raw, expected", NORMALISATION_CASES)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_period_limit_per_pass() -> None:
    # 40 periods, each followed by a period or a letter, so all are strippable; the reference
    # strips at most 32 per pass (re.UNICODE == 32 lands in Pattern.sub's count).
    raw = "." * 40 + "yes"
    assert normalize_answer(raw) == "." * 8 + "yes"
    assert normalize_answer(raw, passes=2) == "yes"


def test_contraction_table_size() -> None:
    # 120 entries in LLaVA-Med's table, minus 4 unreachable upper-case keys and 2 identities.
    assert len(CONTRACTIONS) == 114
    assert all(key == key.lower() for key in CONTRACTIONS)


# ---------------------------------------------------------------------------------------------
# Hand-made (prediction, ground truth) cases with scores worked out by hand.
# ---------------------------------------------------------------------------------------------

# (prediction, ground truth, expected closed_hit)
CLOSED_CASES = [
    ("Yes", "yes", 1),
    ("No, it is not.", "no", 1),
    ("Yes, there is.", "no", 0),
    # "normal" contains "no": the prediction counts as a yes/no answer and contains the truth
    ("It is normal.", "no", 1),
    # "not" counts as saying no, but the truth "yes" is not in "not enlarged"
    ("Not enlarged", "yes", 0),
    ("There is a mass.", "yes", 0),  # neither yes nor no anywhere
    ("I don't know", "no", 1),  # "know" contains "no"
    ("Yes.", "Yes.", 1),
    ("Yes", "yes, it is", 0),  # the truth "yes it is" is not a substring of "yes"
    ("Yes!", "yes", 1),
    ("eyes are normal", "yes", 1),  # "eyes" contains "yes"
    ("", "no", 0),
    ("no", "", 1),  # an empty truth is a substring of anything
    ("none", "no", 0),  # "none" normalises to "0", which says neither
    ("Nope", "no", 1),
    ("yes/no", "no", 1),  # "/" becomes a space: "yes no"
    ("Yes, the heart is enlarged", "Yes", 1),
    # closed answers are normalised once: 32 of the 40 periods go, the rest glue onto "yes", so
    # the truth "yes no" is not found in "yes........ no" (two passes would have found it)
    ("yes" + "." * 40 + " no", "yes no", 0),
]


@pytest.mark.parametrize("prediction, truth, expected", CLOSED_CASES)
def test_closed_hit_hand_cases(prediction: str, truth: str, expected: int) -> None:
    assert closed_hit(prediction, truth) == expected


# (prediction, ground truth, recall, precision, f1, exact_match). f1 = 2pr / (p + r);
# exact_match = distinct truth words found in the prediction / prediction token count.
OPEN_CASES = [
    ("left lung", "left lung", 1, 1, 1, 1),
    ("The left lung.", "left lung", 1, 1, 1, 1),  # article and period go
    ("LEFT LUNG", "left lung", 1, 1, 1, 1),
    ("  left\tlung \n", "left lung", 1, 1, 1, 1),
    # tp=1 fn=1: r=1/2, p=1, f1=2/3; "exact match" is 1/1 although the answer is incomplete
    ("lung", "left lung", 1 / 2, 1, 2 / 3, 1),
    # tp=1 fp=2: p=1/3, f1=2*(1/3)/(4/3)=1/2, em=1/3
    ("left lung lesion", "lung", 1, 1 / 3, 1 / 2, 1 / 3),
    # tp counts the prediction's copies: tp=2, fp=0 -> r=p=1; em = 1 distinct word / 2 tokens
    ("lung lung", "lung", 1, 1, 1, 1 / 2),
    # tp=3 (three "lung"), fn=1 ("liver"): r=3/4, p=1, f1=(3/2)/(7/4)=6/7, em=1/3
    ("lung lung lung", "lung liver", 3 / 4, 1, 6 / 7, 1 / 3),
    # tp = 2 + 1 from the prediction's counts, fn = 0: all 1, em = 2 distinct / 3 tokens
    ("liver liver spleen", "liver spleen spleen", 1, 1, 1, 2 / 3),
    ("", "liver", 0, 0, 0, 0),
    ("liver", "", 0, 0, 0, 0),
    ("The.", "liver", 0, 0, 0, 0),  # normalises to nothing
    ("the the the", "a", 0, 0, 0, 0),  # both sides empty after dropping articles
    ("two", "2", 1, 1, 1, 1),
    ("None", "0", 1, 1, 1, 1),
    ("ten lesions", "10", 1, 1 / 2, 2 / 3, 1 / 2),
    ("eleven", "11", 0, 0, 0, 0),
    ("x-ray", "x ray", 1, 1, 1, 1),
    # "," touches a space and is deleted, "-" does not and becomes a space: "x ray chest"
    ("x-ray, chest", "chest x-ray", 1, 1, 1, 1),
    # "t2 weighted mri": tp=2 fp=1 -> p=2/3, f1=(4/3)/(5/3)=4/5, em=2/3
    ("T2-weighted MRI", "t2 weighted", 1, 2 / 3, 4 / 5, 2 / 3),
    ("1,000 cells", "1000", 1, 1 / 2, 2 / 3, 1 / 2),
    # the digit-comma deletes the hyphen too: "leftsided 25 cm" shares nothing with "left sided"
    ("left-sided, 2,5 cm", "left sided", 0, 0, 0, 0),
    ("3.5 cm.", "3.5 cm", 1, 1, 1, 1),
    ("3. mass", "3", 1, 1 / 2, 2 / 3, 1 / 2),  # "3." loses its period
    ("0.5", ".5", 0, 0, 0, 0),  # ".5" keeps its period and is a different token
    ("e.g. the liver", "liver", 1, 1 / 2, 2 / 3, 1 / 2),  # "eg liver"
    # "(" starts the text (no space) -> space; ")" before a space -> deleted: "c 2023"
    ("(c) 2023", "2023", 1, 1 / 2, 2 / 3, 1 / 2),
    ("left (lower) lobe", "lower lobe", 1, 2 / 3, 4 / 5, 2 / 3),
    ("[left]", "left", 1, 1, 1, 1),
    ("brain; skull", "brain skull", 1, 1, 1, 1),
    ("Is it the brain?", "brain", 1, 1 / 3, 1 / 2, 1 / 3),  # "is it brain"
    ("left/right", "right", 1, 1 / 2, 2 / 3, 1 / 2),
    ("left / right", "right", 1, 1 / 2, 2 / 3, 1 / 2),
    ("x/y / z", "xy", 1, 1 / 2, 2 / 3, 1 / 2),  # every "/" deleted: "xy z"
    ("yes,no", "yes no", 1, 1, 1, 1),
    ("1,2,3", "123", 1, 1, 1, 1),
    ("one lesion, two cysts", "2 cysts", 1, 1 / 2, 2 / 3, 1 / 2),  # "1 lesion 2 cysts"
    ("an apple a day", "apple", 1, 1 / 2, 2 / 3, 1 / 2),
    ("Answer: liver", "liver", 1, 1 / 2, 2 / 3, 1 / 2),  # "answer:" keeps its colon
    ("liver:", "liver", 0, 0, 0, 0),
    ("patient's", "patients", 0, 0, 0, 0),
    ("50%", "50", 0, 0, 0, 0),
    ("dont know", "don't know", 1, 1, 1, 1),
    ("isnt", "is not", 0, 0, 0, 0),  # expands to "isn't", not to two words
    ("hes", "he's", 1, 1, 1, 1),
    ("its", "it's", 0, 0, 0, 0),
    ("somebody'd", "somebodyd", 1, 1, 1, 1),
    ("Im", "i'm", 0, 0, 0, 0),
    # open answers are normalised twice: 32 periods per pass, so all 40 go
    ("." * 40 + "liver", "liver", 1, 1, 1, 1),
]


@pytest.mark.parametrize("prediction, truth, recall, precision, f1, em", OPEN_CASES)
def test_open_scores_hand_cases(prediction, truth, recall, precision, f1, em) -> None:
    scores = open_scores(prediction, truth)
    assert scores.recall == pytest.approx(recall, abs=1e-15)
    assert scores.precision == pytest.approx(precision, abs=1e-15)
    assert scores.f1 == pytest.approx(f1, abs=1e-15)
    assert scores.exact_match == pytest.approx(em, abs=1e-15)


def test_hand_case_table_is_large_enough() -> None:
    assert len(CLOSED_CASES) + len(OPEN_CASES) >= 40


def test_unigram_scores_and_exact_match_on_tokens() -> None:
    # "a a a" vs "a b": tp = 3 (prediction copies), fn = 1 ("b"): recall 3/4, precision 1
    precision, recall, f1 = unigram_scores(["a", "a", "a"], ["a", "b"])
    assert (precision, recall) == (1.0, 0.75)
    assert f1 == pytest.approx(2 * 0.75 / 1.75)
    assert exact_match(["a", "a", "a"], ["a", "b"]) == pytest.approx(1 / 3)
    assert unigram_scores([], ["a"]) == (0.0, 0.0, 0.0)
    assert exact_match([], ["a"]) == 0.0


# ---------------------------------------------------------------------------------------------
# BLEU, worked by hand.
# ---------------------------------------------------------------------------------------------

CANDIDATE = ["left", "lung", "upper", "lobe", "mass"]
REFERENCE = ["left", "upper", "lobe", "mass", "lesion", "seen"]
# Unigrams: left, upper, lobe, mass match -> 4/5.
# Bigrams: "left lung", "lung upper", "upper lobe", "lobe mass"; the reference has "upper lobe"
#   and "lobe mass" -> 2/4.
# Trigrams: "left lung upper", "lung upper lobe", "upper lobe mass"; only the last -> 1/3.
# 4-grams: "left lung upper lobe", "lung upper lobe mass"; none -> 0/2.
# Brevity penalty: c = 5 <= r = 6 -> exp(1 - 6/5) = exp(-0.2).
BP = math.exp(-0.2)
HAND_BLEU = {
    1: BP * 0.8,  # 0.654985
    2: BP * math.sqrt(0.8 * 0.5),  # 0.517811
    3: BP * (0.8 * 0.5 / 3) ** (1 / 3),  # 0.418267
    4: 0.0,  # a zero 4-gram precision without smoothing
}


def test_bleu_pieces_by_hand() -> None:
    assert modified_precision(CANDIDATE, REFERENCE, 1) == (4, 5)
    assert modified_precision(CANDIDATE, REFERENCE, 2) == (2, 4)
    assert modified_precision(CANDIDATE, REFERENCE, 3) == (1, 3)
    assert modified_precision(CANDIDATE, REFERENCE, 4) == (0, 2)
    assert brevity_penalty(5, 6) == pytest.approx(BP)
    assert brevity_penalty(7, 6) == 1.0
    assert brevity_penalty(0, 6) == 0.0


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bleu_n_by_hand(n: int) -> None:
    assert bleu_n(CANDIDATE, REFERENCE, n) == pytest.approx(HAND_BLEU[n], abs=1e-12)


def test_hand_bleu_arithmetic() -> None:
    # exp(-0.2) = 0.818731; sqrt(0.4) = 0.632456; (2/15) ** (1/3) = 0.510873
    assert HAND_BLEU[1] == pytest.approx(0.654985, abs=1e-6)
    assert HAND_BLEU[2] == pytest.approx(0.517811, abs=1e-6)
    assert HAND_BLEU[3] == pytest.approx(0.418267, abs=1e-6)


def test_bleu_clipping_and_single_order_weights() -> None:
    # "no no no" vs "no": clipped unigram matches 1/3, c = 3 > r = 1 so no penalty.
    assert bleu_n(["no", "no", "no"], ["no"], 1) == pytest.approx(1 / 3)
    # Single-order bigram weight (LLaVA-Med's "bleu_score_2"): BP * p2 = exp(-0.2) * 1/2.
    assert bleu(CANDIDATE, REFERENCE, (0, 1, 0, 0)) == pytest.approx(BP * 0.5)
    assert bleu_n([], REFERENCE, 1) == 0.0
    # Fewer candidate tokens than the order: no n-grams, precision 0, score 0.
    assert bleu_n(["left"], ["left"], 2) == 0.0
    with pytest.raises(ValueError):
        bleu_n(CANDIDATE, REFERENCE, 0)


def test_open_scores_bleu_sees_normalised_text() -> None:
    # Normalises to the token lists above ("The" dropped, "," deleted, "." stripped).
    scores = open_scores("The left lung, upper lobe mass.", "left upper lobe mass lesion seen")
    assert scores.bleu_1 == pytest.approx(HAND_BLEU[1], abs=1e-12)
    assert scores.bleu_2 == pytest.approx(HAND_BLEU[2], abs=1e-12)
    assert scores.bleu_3 == pytest.approx(HAND_BLEU[3], abs=1e-12)
    assert scores.bleu_4 == 0.0


def test_bleu_agrees_with_nltk_when_installed() -> None:
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    for n in (1, 2, 3):
        expected = nltk_bleu.sentence_bleu([REFERENCE], CANDIDATE, weights=(1 / n,) * n)
        assert bleu_n(CANDIDATE, REFERENCE, n) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The 400 real VQA-RAD cases scored by LLaVA-Med's own code.
# ---------------------------------------------------------------------------------------------

_CASES_NAME = "vqa_metric_cases_llava_med.json"


def _find_real_cases() -> Path | None:
    here = Path(__file__).resolve()
    repo = here.parents[2]
    candidates = [
        os.environ.get("MEDV_REFERENCE_DIR"),
        repo / "shared" / "reference",
        repo.parent / "shared" / "reference",
    ]
    for folder in candidates:
        if folder and (Path(folder) / _CASES_NAME).is_file():
            return Path(folder) / _CASES_NAME
    return None


_REAL_PATH = _find_real_cases()
_REAL = json.loads(_REAL_PATH.read_text(encoding="utf-8")) if _REAL_PATH else None
_needs_real = pytest.mark.skipif(_REAL is None, reason=f"{_CASES_NAME} not found")
_REAL_INDICES = range(len(_REAL["cases"])) if _REAL else [None]


@_needs_real
def test_real_case_file_is_complete() -> None:
    assert len(_REAL["cases"]) == 400
    kinds = [case["answer_type"] for case in _REAL["cases"]]
    assert kinds.count("CLOSED") == 232 and kinds.count("OPEN") == 168


@_needs_real
@pytest.mark.parametrize("index", _REAL_INDICES)
def test_real_case_reproduced_exactly(index: int) -> None:
    case = _REAL["cases"][index]
    if case["answer_type"] == "CLOSED":
        assert closed_hit(case["prediction"], case["ground_truth"]) == case["closed_hit"]
    else:
        scores = open_scores(case["prediction"], case["ground_truth"])
        got = (scores.recall, scores.precision, scores.f1, scores.exact_match)
        want = (case["recall"], case["precision"], case["f1"], case["exact_match"])
        assert got == want  # bit-for-bit, not approximately


@_needs_real
def test_real_case_summary_totals() -> None:
    cases = _REAL["cases"]
    # Question ids repeat across the answer files the cases come from, so number them here.
    references = [
        VQAReference(i, case["ground_truth"], case["answer_type"].lower())
        for i, case in enumerate(cases)
    ]
    predictions = {i: case["prediction"] for i, case in enumerate(cases)}
    scores = score_vqa(references, predictions)
    summary = _REAL["summary"]
    assert scores.n_closed == summary["n_closed"] == 232
    assert scores.n_open == summary["n_open"] == 168
    assert scores.closed_accuracy == pytest.approx(summary["closed_accuracy"], rel=1e-12)
    assert scores.open_recall == pytest.approx(summary["open_recall"], rel=1e-12)
    # The totals themselves, as counts: 74 closed hits of 232 = 31.8966 %.
    assert round(summary["closed_accuracy"] * 232 / 100) == 74
    assert scores.closed_accuracy == pytest.approx(100 * 74 / 232, rel=1e-12)
