"""Panoptic metrics: PQ/SQ/RQ, Parsing Covering, PQ-dagger, mIoU and mask AP.

The evaluator is loaded on first use (module ``__getattr__``): ``cabb_ray.metrics.names`` is
imported by modules that must not load torch (the report, the leaderboard), and importing a
submodule runs this file first.
"""

from __future__ import annotations

from typing import Any

from cabb_ray.metrics.names import METRIC_NAMES

__all__ = ["METRIC_NAMES", "EvaluationResult", "PanopticEvaluator", "evaluate_folders"]


def __getattr__(name: str) -> Any:
    if name in ("EvaluationResult", "PanopticEvaluator", "evaluate_folders"):
        from cabb_ray.metrics import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module 'cabb_ray.metrics' has no attribute {name!r}")
