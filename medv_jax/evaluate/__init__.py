"""Evaluation of LLaDA-MedV: LLaVA-Med's VQA metrics and response-length statistics.

Command line: ``python -m medv_jax.evaluate {vqa,lengths} ...`` (see ``__main__.py``).
"""

from medv_jax.evaluate.response_length import LengthStats, length_stats
from medv_jax.evaluate.vqa_metrics import closed_hit, normalize_answer, open_scores
from medv_jax.evaluate.vqa_scoring import VQAScores, load_predictions, load_references, score_vqa

__all__ = [
    "LengthStats",
    "length_stats",
    "closed_hit",
    "normalize_answer",
    "open_scores",
    "VQAScores",
    "load_predictions",
    "load_references",
    "score_vqa",
]
