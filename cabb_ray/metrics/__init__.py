"""Panoptic metrics: PQ/SQ/RQ, Parsing Covering, PQ-dagger, mIoU and mask AP."""

from cabb_ray.metrics.evaluator import (
    METRIC_NAMES,
    EvaluationResult,
    PanopticEvaluator,
    evaluate_folders,
)

__all__ = ["METRIC_NAMES", "EvaluationResult", "PanopticEvaluator", "evaluate_folders"]
