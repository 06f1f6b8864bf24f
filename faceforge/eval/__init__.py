"""Evaluation: pair scores -> verification / identification / retrieval metrics -> reports.

``eval/`` knows nothing of training: it takes a model (any ``nn.Module`` mapping images to
embeddings), images and labels, and returns numbers, tables and plots.
"""

from faceforge.eval import metrics
from faceforge.eval.metrics import (
    PairCounts,
    accuracy_at_threshold,
    auc,
    best_threshold_accuracy,
    eer,
    rank_k,
    recall_at_k,
    roc,
    tar_at_far,
    tpir_at_fpir,
    verification_accuracy,
)
from faceforge.eval.report import markdown_table, plot_roc, score_histogram
from faceforge.eval.verify import VerificationResult, embed, evaluate_scores, pair_scores, verify_pairs

__all__ = [
    "PairCounts",
    "VerificationResult",
    "accuracy_at_threshold",
    "auc",
    "best_threshold_accuracy",
    "eer",
    "embed",
    "evaluate_scores",
    "markdown_table",
    "metrics",
    "pair_scores",
    "plot_roc",
    "rank_k",
    "recall_at_k",
    "roc",
    "score_histogram",
    "tar_at_far",
    "tpir_at_fpir",
    "verification_accuracy",
    "verify_pairs",
]
