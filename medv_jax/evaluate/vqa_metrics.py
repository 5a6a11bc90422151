"""Per-answer VQA metrics, reproducing LLaVA-Med's evaluation (docs/algorithm.md §6).

LLaVA-MedV reports its VQA-RAD / SLAKE / PathVQA numbers with LLaVA-Med's evaluation script, so
every rule here follows that script's observable behaviour, quirks included, rather than the
textbook definitions. The quirks matter for the headline numbers and are each documented where
they are implemented:

* Normalisation (:func:`normalize_answer`) follows the VQA-challenge answer processing with a
  few accidents: a period is stripped whenever it is not followed by a digit (the look-behind that
  was meant to protect ``3.`` is mistyped), at most 32 periods go per pass, and one
  digit-comma-digit anywhere deletes *every* punctuation mark instead of turning marks into spaces.
* Closed accuracy (:func:`closed_hit`) is a *substring* test: "no" is found inside "not",
  "normal" or "know", and the ground truth only has to occur somewhere in the prediction.
* Open recall/precision/F1 (:func:`unigram_scores`) count true positives with the *prediction's*
  multiplicities, and "exact match" (:func:`exact_match`) is a share of prediction tokens, not an
  all-or-nothing comparison.
* Open answers are normalised twice (once by the driver script, once inside each metric); the only
  difference this makes is the 32-period limit per pass.

Everything works on plain strings and lists of tokens; nothing here imports jax.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = [
    "NUMBER_WORDS",
    "ARTICLES",
    "PUNCTUATION",
    "CONTRACTIONS",
    "normalize_answer",
    "tokenize",
    "says_yes_or_no",
    "closed_hit",
    "unigram_scores",
    "exact_match",
    "ngram_counts",
    "modified_precision",
    "brevity_penalty",
    "bleu",
    "bleu_n",
    "OpenScores",
    "open_scores",
]

# ---------------------------------------------------------------------------------------------
# Normalisation tables (the VQA-challenge tables as LLaVA-Med ships them).
# ---------------------------------------------------------------------------------------------

#: Number words turned into digits. Only zero..ten, and "none" counts as zero.
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

#: Articles dropped after number words are mapped.
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: The marks the punctuation rule handles. Notably absent: the period (own rule), the apostrophe
#: (contractions need it), the colon, and ``* # $ % & ^ | ~``, which all survive normalisation.
PUNCTUATION: str = ';/[]"{}()=+\\_->@<`,?!'

# Written "key value" pairs; a key is a lower-case token as it appears after splitting, the value
# what it is rewritten to. The reference table also lists "Im", "Ive", "Id've" and "I'dve", which
# can never match because tokens are lower-cased first, and two identity entries ("let's",
# "she's"); they are left out since they change nothing. "somebody'd" -> "somebodyd" (an apostrophe
# *removed*) is a typo in the reference table, kept on purpose.
_CONTRACTION_PAIRS = """
    'ow'sat 'ow's'at   'ows'at 'ow's'at   aint ain't   arent aren't
    cant can't   couldn'tve couldn't've   couldnt couldn't   couldnt've couldn't've
    couldve could've   didnt didn't   doesnt doesn't   dont don't
    hadn'tve hadn't've   hadnt hadn't   hadnt've hadn't've   hasnt hasn't
    havent haven't   he'dve he'd've   hed he'd   hed've he'd've
    hes he's   howd how'd   howll how'll   hows how's
    isnt isn't   it'dve it'd've   itd it'd   itd've it'd've
    itll it'll   maam ma'am   mightn'tve mightn't've   mightnt mightn't
    mightnt've mightn't've   mightve might've   mustnt mustn't   mustve must've
    neednt needn't   notve not've   oclock o'clock   oughtnt oughtn't
    ow's'at 'ow's'at   shant shan't   she'dve she'd've   shed've she'd've
    shouldn'tve shouldn't've   shouldnt shouldn't   shouldnt've shouldn't've   shouldve should've
    somebody'd somebodyd   somebody'dve somebody'd've   somebodyd've somebody'd've
    somebodyll somebody'll   somebodys somebody's   someone'dve someone'd've
    someoned someone'd   someoned've someone'd've   someonell someone'll   someones someone's
    something'dve something'd've   somethingd something'd   somethingd've something'd've
    somethingll something'll   thats that's   there'dve there'd've   thered there'd
    thered've there'd've   therere there're   theres there's   they'dve they'd've
    theyd they'd   theyd've they'd've   theyll they'll   theyre they're   theyve they've
    twas 'twas   wasnt wasn't   we'dve we'd've   wed've we'd've   werent weren't   weve we've
    whatll what'll   whatre what're   whats what's   whatve what've   whens when's
    whered where'd   wheres where's   whereve where've   who'dve who'd've   whod who'd
    whod've who'd've   wholl who'll   whos who's   whove who've   whyll why'll   whyre why're
    whys why's   wont won't   wouldn'tve wouldn't've   wouldnt wouldn't   wouldnt've wouldn't've
    wouldve would've   y'all'dve y'all'd've   y'alld've y'all'd've   y'allll y'all'll
    yall y'all   yall'd've y'all'd've   yall'll y'all'll   you'dve you'd've   youd you'd
    youd've you'd've   youll you'll   youre you're   youve you've
"""


def _parse_pairs(text: str) -> dict[str, str]:
    words = text.split()
    if len(words) % 2:
        raise ValueError("contraction table must hold key/value pairs")
    return dict(zip(words[0::2], words[1::2]))


#: Tokens rewritten to their apostrophe form ("dont" -> "don't").
CONTRACTIONS: dict[str, str] = _parse_pairs(_CONTRACTION_PAIRS)

# A digit, comma, digit anywhere in the answer ("1,000") switches the punctuation rule to deletion.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit. The reference pattern starts with ``(?!<=\d)``, meant as a
# look-behind "not preceded by a digit" but written as a look-ahead for the text "<=digit", which
# can never match where the next character is ".". So what precedes the period is irrelevant:
# "3." and "end." lose the period, "3.5" and ".5" keep it.
_STRIPPABLE_PERIOD = re.compile(r"\.(?!\d)")
# The reference passes ``re.UNICODE`` (== 32) positionally into ``Pattern.sub``, where it lands in
# the *count* slot: only the first 32 strippable periods of each pass are removed.
_PERIODS_PER_PASS = 32


def _apply_punctuation_rule(text: str) -> str:
    """Delete or blank out each punctuation mark, deciding per mark on the *original* text.

    A mark that touches a space anywhere ("word, word" or "( x") is deleted everywhere; a mark that
    never touches a space ("left/right") becomes a space everywhere, so the words it joined split.
    A digit-comma-digit anywhere in the text makes every mark deleted ("1,000" -> "1000").
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    table = {}
    for mark in PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        table[ord(mark)] = "" if (delete_all or touches_space) else " "
    return text.translate(table)


def _normalize_token(token: str) -> str | None:
    """Map one lower-case token: number word to digit, drop articles, expand contractions."""
    token = NUMBER_WORDS.get(token, token)
    if token in ARTICLES:
        return None
    return CONTRACTIONS.get(token, token)


def normalize_answer(text: str, passes: int = 1) -> str:
    """Normalise an answer or a prediction the way LLaVA-Med does before comparing them.

    One pass: punctuation rule, strip periods not followed by a digit (at most 32), lower-case,
    split on whitespace, number words to digits, drop articles, expand contractions, join with
    single spaces, remove commas. ``passes=2`` is what LLaVA-Med's open-question metrics see (the
    driver normalises, then each metric normalises again); only the period limit makes it differ.
    """
    for _ in range(passes):
        text = _apply_punctuation_rule(text)
        text = _STRIPPABLE_PERIOD.sub("", text, count=_PERIODS_PER_PASS)
        tokens = (_normalize_token(word) for word in text.lower().split())
        # Commas are already gone after the punctuation rule; the final removal is kept because
        # the reference performs it and it is part of the documented rule set.
        text = " ".join(t for t in tokens if t is not None).replace(",", "")
    return text


def tokenize(normalized: str) -> list[str]:
    """Whitespace tokens of an already normalised answer (lower-cased, as the reference does)."""
    return normalized.lower().split()


# ---------------------------------------------------------------------------------------------
# Closed (yes/no) questions.
# ---------------------------------------------------------------------------------------------


def says_yes_or_no(normalized_prediction: str) -> bool:
    """Whether the prediction counts as answering yes/no: a *substring* test, as in LLaVA-Med.

    "not", "normal", "know" and "eyes" all qualify; that is the reference behaviour.
    """
    return "yes" in normalized_prediction or "no" in normalized_prediction


def closed_hit(prediction: str, ground_truth: str) -> int:
    """1 when the normalised prediction says yes/no and contains the normalised ground truth.

    Both sides are normalised once (closed questions never reach the per-metric re-normalisation).
    The containment is a substring test, so ground truth "no" is found in "it is not enlarged".
    """
    pred = normalize_answer(prediction)
    truth = normalize_answer(ground_truth)
    return int(says_yes_or_no(pred) and truth in pred)


# ---------------------------------------------------------------------------------------------
# Open questions: unigram precision / recall / F1 and LLaVA-Med's "exact match".
# ---------------------------------------------------------------------------------------------


def unigram_scores(
    prediction_tokens: Sequence[str], reference_tokens: Sequence[str]
) -> tuple[float, float, float]:
    """(precision, recall, f1) over unigrams, as LLaVA-Med computes them.

    True positives count a shared word with its multiplicity *in the prediction*; false negatives
    count reference words absent from the prediction with their reference multiplicity. So the
    prediction "lung lung" against reference "lung" has recall 1, and "a a a" against "a b" has
    tp = 3, fn = 1, recall 0.75. All three are 0 when either side is empty or nothing is shared.
    """
    pred = Counter(prediction_tokens)
    ref = Counter(reference_tokens)
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(n for word, n in pred.items() if word in ref)
    if tp == 0:
        return 0.0, 0.0, 0.0
    fp = sum(n for word, n in pred.items() if word not in ref)
    fn = sum(n for word, n in ref.items() if word not in pred)
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    # Same operation order as the reference so the floats agree bit for bit.
    f1 = 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def exact_match(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """LLaVA-Med's "exact match": distinct reference words in the prediction / prediction length.

    Not an all-or-nothing comparison: prediction "(c) 2023" vs "2023" scores 1/2. A repeated
    reference word is counted once; an empty prediction scores 0.
    """
    if not prediction_tokens:
        return 0.0
    present = set(prediction_tokens)
    found = sum(1 for word in set(reference_tokens) if word in present)
    return found / len(prediction_tokens)


# ---------------------------------------------------------------------------------------------
# BLEU (single reference, no smoothing).
# ---------------------------------------------------------------------------------------------


def ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of ``tokens`` (empty when there are fewer than n tokens)."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def modified_precision(
    candidate: Sequence[str], reference: Sequence[str], n: int
) -> tuple[int, int]:
    """(clipped matches, candidate n-gram count) for order n.

    Each candidate n-gram is credited at most as often as it occurs in the reference, so
    "no no no" against "no" has 1 clipped match out of 3.
    """
    cand = ngram_counts(candidate, n)
    ref = ngram_counts(reference, n)
    matches = sum(min(count, ref[gram]) for gram, count in cand.items())
    return matches, sum(cand.values())


def brevity_penalty(candidate_length: int, reference_length: int) -> float:
    """1 for candidates longer than the reference, exp(1 - r/c) otherwise (0 when c = 0)."""
    if candidate_length == 0:
        return 0.0
    if candidate_length > reference_length:
        return 1.0
    return math.exp(1.0 - reference_length / candidate_length)


def bleu(candidate: Sequence[str], reference: Sequence[str], weights: Sequence[float]) -> float:
    """Sentence BLEU of ``candidate`` against one reference with per-order ``weights``.

    ``weights[k]`` weighs the log precision of order k+1. Without smoothing, a zero precision at
    an order with non-zero weight makes the score 0 (NLTK's unsmoothed ``sentence_bleu`` returns
    0 or a number below 1e-70 there). ``bleu(c, r, (0, 1, 0, 0))`` gives the single-order variant
    LLaVA-Med's script labels ``bleu_score_2``.
    """
    if not candidate:
        return 0.0
    log_sum = 0.0
    for order, weight in enumerate(weights, start=1):
        if weight == 0:
            continue
        matches, total = modified_precision(candidate, reference, order)
        if matches == 0:
            return 0.0
        log_sum += weight * math.log(matches / total)
    return brevity_penalty(len(candidate), len(reference)) * math.exp(log_sum)


def bleu_n(candidate: Sequence[str], reference: Sequence[str], n: int) -> float:
    """Cumulative BLEU-n: uniform weights 1/n over orders 1..n (BLEU-4 is the usual "BLEU")."""
    if n < 1:
        raise ValueError(f"BLEU order must be at least 1, got {n}")
    return bleu(candidate, reference, (1.0 / n,) * n)


# ---------------------------------------------------------------------------------------------
# Everything for one open question.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenScores:
    """Scores of one open question (fractions in [0, 1])."""

    recall: float
    precision: float
    f1: float
    exact_match: float
    bleu_1: float
    bleu_2: float
    bleu_3: float
    bleu_4: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def open_scores(prediction: str, ground_truth: str) -> OpenScores:
    """All open-question metrics for one raw prediction / ground-truth pair.

    Recall, precision, F1 and exact match see both sides normalised twice, as in LLaVA-Med;
    BLEU sees them normalised once (its driver calls NLTK on the once-normalised strings).
    """
    pred_once = normalize_answer(prediction)
    truth_once = normalize_answer(ground_truth)
    pred_tokens = tokenize(normalize_answer(pred_once))
    truth_tokens = tokenize(normalize_answer(truth_once))
    precision, recall, f1 = unigram_scores(pred_tokens, truth_tokens)
    bleu_pred, bleu_truth = tokenize(pred_once), tokenize(truth_once)
    return OpenScores(
        recall=recall,
        precision=precision,
        f1=f1,
        exact_match=exact_match(pred_tokens, truth_tokens),
        bleu_1=bleu_n(bleu_pred, bleu_truth, 1),
        bleu_2=bleu_n(bleu_pred, bleu_truth, 2),
        bleu_3=bleu_n(bleu_pred, bleu_truth, 3),
        bleu_4=bleu_n(bleu_pred, bleu_truth, 4),
    )
