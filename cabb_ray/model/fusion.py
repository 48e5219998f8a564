"""Panoptic fusion (the Panoptic FPN heuristic): instances first, then stuff on free pixels.

Instances above ``eval.score_threshold`` are placed by decreasing score; one whose mask
overlaps already placed pixels by more than ``eval.overlap_threshold`` of its area is dropped,
otherwise it takes its still-free pixels. The semantic head's argmax then fills the remaining
pixels with stuff classes whose region reaches ``eval.stuff_min_area`` pixels; everything else
(thing-class pixels without an instance, small stuff regions) is void.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cabb_ray.config import EvalConfig
from cabb_ray.structures.boxes import label_boxes
from cabb_ray.structures.classes import ClassMapping


@dataclass
class PanopticPrediction:
    """One image: id map (0 = void), its segments_info, and every instance for mask AP."""

    ids: np.ndarray
    segments: list[dict[str, Any]]
    instances: list[dict[str, Any]]


def panoptic_fusion(
    detection: dict[str, torch.Tensor], classes: ClassMapping, thresholds: EvalConfig
) -> PanopticPrediction:
    """Fuse one image's ``PanopticNet`` inference output into a panoptic prediction."""
    semantic = detection["semantic"].argmax(dim=0).cpu().numpy()
    height, width = semantic.shape
    ids = np.zeros((height, width), dtype=np.int64)
    occupied = np.zeros((height, width), dtype=bool)
    masks = (detection["masks"][:, 0] > 0.5).cpu().numpy()
    scores = detection["scores"].cpu().numpy()
    labels = detection["labels"].cpu().numpy()
    boxes = detection["boxes"].cpu().numpy()
    segments, instances = [], []
    for k in np.argsort(-scores, kind="stable"):
        category = classes.thing_ids[int(labels[k]) - 1]
        instances.append(
            {
                "category_id": category,
                "score": float(scores[k]),
                "mask": masks[k],
                "box": boxes[k].tolist(),  # (x0, y0, x1, y1), for box AP
            }
        )
        area = int(masks[k].sum())
        if scores[k] < thresholds.score_threshold or area == 0:
            continue
        if (masks[k] & occupied).sum() / area > thresholds.overlap_threshold:
            continue
        free = masks[k] & ~occupied
        if not free.any():
            continue
        seg_id = len(segments) + 1
        ids[free] = seg_id
        occupied |= free
        segments.append(
            {
                "id": seg_id,
                "category_id": category,
                "iscrowd": 0,
                "score": float(scores[k]),
                "area": int(free.sum()),
            }
        )
    things = set(classes.thing_ids)
    for index, category in enumerate(classes.category_ids):
        if category in things:
            continue
        region = (semantic == index) & ~occupied
        area = int(region.sum())
        if area < max(thresholds.stuff_min_area, 1):
            continue
        seg_id = len(segments) + 1
        ids[region] = seg_id
        segments.append(
            {
                "id": seg_id,
                "category_id": category,
                "iscrowd": 0,
                "area": area,
            }
        )
    # segment k is exactly the pixels where ids == k (nothing placed is overwritten)
    for seg, box in zip(segments, label_boxes(ids, len(segments)), strict=True):
        seg["bbox"] = box
    return PanopticPrediction(ids, segments, instances)
