"""Evaluation of LLaDA-MedV: LLaVA-Med's VQA metrics and response-length statistics, end-to-end
VQA runs, the judge-scored open conversation benchmark, sampling sweeps and result pages.

Command line: ``python -m medv_jax.evaluate {vqa,lengths,run-vqa,run-conversation,judge,sweep,
report} ...`` (see ``__main__.py``).
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
