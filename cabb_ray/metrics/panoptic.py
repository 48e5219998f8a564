"""Dataset-level panoptic accumulators: PQ/SQ/RQ, Parsing Covering, semantic confusion.

Why sums and not per-image means: PQ is defined on the dataset (panopticapi and
cityscapesscripts accumulate per-class IoU sums and TP/FP/FN counts over all images), and sums
can be added across Ray Train workers, so evaluating a split over N workers gives exactly the
single-process numbers.

One image costs one pass over its pixels: both id maps are mapped to compact segment indices,
and a single ``bincount`` of the joint index gives every GT x prediction intersection (void
included). PQ matching, PC and the semantic confusion matrix are then computed from that
small matrix. The PQ rules follow cityscapesscripts' ``pq_compute_single_core`` line by line:
void (id 0) is removed from the union; IoU > 0.5 strictly; crowd GT is never matched nor an FN;
an unmatched prediction is not an FP when more than half of it lies on void plus the crowd
segment of its class (the last crowd segment of that class in segments_info, as there); GT
areas come from the JSON, prediction areas from the PNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cabb_ray.errors import CabbRayError

DENSE_LOOKUP_LIMIT = 1 << 24


def _index_dtype(count: int) -> torch.dtype:
    """Smallest integer type holding 0..count + 1 (void, segments, unknown)."""
    if count + 1 <= 255:
        return torch.uint8
    if count + 1 <= 32767:
        return torch.int16
    return torch.int32


def _as_int32(ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Id map as an int32 tensor without a copy where possible (PNG ids are < 2^24)."""
    if isinstance(ids, torch.Tensor):
        return ids.to(torch.int32)
    ids = np.asarray(ids)
    if ids.dtype == np.uint32:
        return torch.from_numpy(ids.view(np.int32))
    return torch.from_numpy(ids.astype(np.int32, copy=False))


def compact_ids(
    ids: np.ndarray | torch.Tensor, segment_ids: np.ndarray, where: str | Path
) -> torch.Tensor:
    """Map panoptic ids to 0 (void), 1 + position in ``segment_ids``, or len + 1 (unknown).

    A dense lookup table gathered with ``index_select`` (both cores) into the smallest integer
    type that fits (uint8 for up to 253 segments): the later passes over the pixels then move a
    quarter of the bytes. Unknown ids get their own index instead of a separate check pass;
    ``intersections`` counts them, and ``unknown_id`` names one for the error message.
    """
    flat = _as_int32(ids).reshape(-1)
    segment_ids = np.asarray(segment_ids, dtype=np.int64)
    dtype = _index_dtype(len(segment_ids))
    low, top = (int(v) for v in torch.aminmax(flat)) if flat.numel() else (0, 0)
    top = max(top, int(segment_ids.max(initial=0)))
    if low < 0 or top >= DENSE_LOOKUP_LIMIT:
        raise CabbRayError(f"{where}: panoptic ids must lie in [0, 2^24), found {low}..{top}")
    lookup = torch.full((top + 1,), len(segment_ids) + 1, dtype=dtype)
    lookup[0] = 0
    lookup[torch.from_numpy(segment_ids)] = torch.arange(1, len(segment_ids) + 1).to(dtype)
    return lookup.index_select(0, flat)


def unknown_id(ids: np.ndarray | torch.Tensor, index: torch.Tensor, count: int) -> int:
    """One id of ``ids`` that ``compact_ids`` marked unknown (error path only)."""
    flat = _as_int32(ids).reshape(-1)
    return int(flat[index == count + 1][0])


def intersections(gt_index: torch.Tensor, pred_index: torch.Tensor, n_gt: int, n_pred: int):
    """[(2 + n_gt), (2 + n_pred)] pixel counts as numpy int64: row/column 0 is void, the last
    row/column counts ids unknown to segments_info."""
    size = (n_gt + 2) * (n_pred + 2)
    joint = gt_index.to(torch.int32) * (n_pred + 2) + pred_index.to(torch.int32)
    counts = torch.bincount(joint, minlength=size)
    return counts.numpy().reshape(n_gt + 2, n_pred + 2)


@dataclass
class ImageSegments:
    """Per-image segment table aligned with the compact indices 1..n."""

    ids: np.ndarray
    classes: np.ndarray  # class index (position in the evaluator's category list)
    iscrowd: np.ndarray
    json_area: np.ndarray

    @classmethod
    def from_segments_info(
        cls,
        segments: list[dict[str, Any]],
        class_of: dict[int, int],
        where: str | Path,
        need_area: bool = False,
    ) -> ImageSegments:
        """Validate and tabulate; ground truth needs ``area`` (PQ uses the JSON's GT areas)."""
        classes, areas = [], []
        for seg in segments:
            for key in ("id", "category_id") + (("area",) if need_area else ()):
                if seg.get(key) is None:
                    raise CabbRayError(f"{where}: a segments_info entry lacks required key '{key}'")
            category = int(seg["category_id"])
            if category not in class_of:
                raise CabbRayError(
                    f"{where}: segment {seg['id']} has unknown category_id {category}"
                )
            classes.append(class_of[category])
            areas.append(float(seg.get("area") or 0.0))
        return cls(
            ids=np.array([int(s["id"]) for s in segments], dtype=np.int64),
            classes=np.array(classes, dtype=np.int64),
            iscrowd=np.array([bool(s.get("iscrowd", 0)) for s in segments], dtype=bool),
            json_area=np.array(areas, dtype=np.float64),
        )


@dataclass
class PanopticAccumulator:
    """Per-class sums for PQ/SQ/RQ, PC and a semantic confusion matrix; add or all-reduce."""

    num_classes: int
    iou: np.ndarray = field(init=False)
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)
    pc_covered: np.ndarray = field(init=False)
    pc_area: np.ndarray = field(init=False)
    confusion: np.ndarray = field(init=False)  # [C, C + 1]: GT class x predicted class or void

    def __post_init__(self) -> None:
        c = self.num_classes
        self.iou = np.zeros(c)
        self.tp, self.fp, self.fn = np.zeros(c), np.zeros(c), np.zeros(c)
        self.pc_covered, self.pc_area = np.zeros(c), np.zeros(c)
        self.confusion = np.zeros((c, c + 1))

    ARRAYS = ("iou", "tp", "fp", "fn", "pc_covered", "pc_area", "confusion")

    def merge(self, other: PanopticAccumulator) -> PanopticAccumulator:
        for name in self.ARRAYS:
            getattr(self, name).__iadd__(getattr(other, name))
        return self

    def flat(self) -> np.ndarray:
        """All sums as one float64 vector (for a single all-reduce)."""
        return np.concatenate([getattr(self, n).ravel() for n in self.ARRAYS])

    def load_flat(self, vector: np.ndarray) -> None:
        offset = 0
        for name in self.ARRAYS:
            array = getattr(self, name)
            array[...] = vector[offset : offset + array.size].reshape(array.shape)
            offset += array.size

    def update(self, counts: np.ndarray, gt: ImageSegments, pred: ImageSegments) -> None:
        """Add one image, given its intersection matrix (void at row/column 0)."""
        inter = counts[1:, 1:].astype(np.float64)
        pred_void = counts[0, 1:].astype(np.float64)
        pred_area = counts[:, 1:].sum(axis=0).astype(np.float64)
        same = gt.classes[:, None] == pred.classes[None, :]

        # PQ matching (cityscapesscripts rules).
        union = pred_area[None, :] + gt.json_area[:, None] - inter - pred_void[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / union
        match = same & ~gt.iscrowd[:, None] & (inter > 0) & (iou > 0.5)
        g_idx, p_idx = np.nonzero(match)
        np.add.at(self.tp, gt.classes[g_idx], 1)
        np.add.at(self.iou, gt.classes[g_idx], iou[g_idx, p_idx])
        gt_matched = match.any(axis=1)
        pred_matched = match.any(axis=0)
        missed = ~gt_matched & ~gt.iscrowd
        np.add.at(self.fn, gt.classes[missed], 1)
        ignored = pred_void.copy()
        crowd_of_class = {int(c): k for k, c in enumerate(gt.classes) if gt.iscrowd[k]}
        for p in range(len(pred.ids)):
            k = crowd_of_class.get(int(pred.classes[p]))
            if k is not None:
                ignored[p] += inter[k, p]
        with np.errstate(divide="ignore", invalid="ignore"):
            is_fp = ~pred_matched & ~(ignored / pred_area > 0.5)
        np.add.at(self.fp, pred.classes[is_fp], 1)

        # Parsing covering: void and crowd pixels removed from the predictions.
        gt_area = counts[1:, :].sum(axis=1).astype(np.float64)
        crowd_pixels = inter[gt.iscrowd].sum(axis=0)
        pred_kept = pred_area - pred_void - crowd_pixels
        with np.errstate(divide="ignore", invalid="ignore"):
            cover = np.where(same, inter / (gt_area[:, None] + pred_kept[None, :] - inter), 0.0)
        best = np.nan_to_num(cover).max(axis=1, initial=0.0)
        real = ~gt.iscrowd
        np.add.at(self.pc_covered, gt.classes[real], gt_area[real] * best[real])
        np.add.at(self.pc_area, gt.classes[real], gt_area[real])

        # Semantic confusion (crowd pixels keep their class; predicted void is column C).
        pred_cols = np.concatenate([[self.num_classes], pred.classes])
        np.add.at(self.confusion, (gt.classes[:, None], pred_cols[None, :]), counts[1:, :])

    def add_semantic(self, gt: np.ndarray, pred: np.ndarray, ignore: int = 255) -> None:
        """Add label maps of class indices directly (e.g. a semantic head's argmax)."""
        keep = gt != ignore
        c = self.num_classes
        joint = gt[keep].astype(np.int64) * (c + 1) + np.where(pred[keep] == ignore, c, pred[keep])
        self.confusion += np.bincount(joint, minlength=c * (c + 1)).reshape(c, c + 1)


def _mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else float("nan")


def summarize(acc: PanopticAccumulator, isthing: np.ndarray) -> tuple[dict, dict]:
    """Dataset metrics and per-class rows from accumulated sums.

    Classes with tp + fp + fn = 0 are left out of the PQ means; a group (things or stuff) with
    no such class gets NaN rather than the references' ZeroDivisionError.
    """
    denom = acc.tp + 0.5 * acc.fp + 0.5 * acc.fn
    counted = denom > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        pq = np.where(counted, acc.iou / denom, np.nan)
        sq = np.where(counted, np.where(acc.tp > 0, acc.iou / acc.tp, 0.0), np.nan)
        rq = np.where(counted, acc.tp / denom, np.nan)
        pc = np.where(acc.pc_area > 0, acc.pc_covered / acc.pc_area, np.nan)
        hits = np.diag(acc.confusion[:, : acc.num_classes])
        union = acc.confusion.sum(axis=1) + acc.confusion[:, : acc.num_classes].sum(axis=0) - hits
        class_iou = np.where(union > 0, hits / union, np.nan)
    stuff = ~isthing
    metrics: dict[str, float] = {}
    for suffix, group in (("", np.ones_like(isthing)), ("_th", isthing), ("_st", stuff)):
        metrics[f"pq{suffix}"] = _mean(pq, counted & group)
        metrics[f"sq{suffix}"] = _mean(sq, counted & group)
        metrics[f"rq{suffix}"] = _mean(rq, counted & group)
        metrics[f"n{suffix}"] = int((counted & group).sum())
        metrics[f"pc{suffix}"] = _mean(pc, (acc.pc_area > 0) & group)
    dagger = np.concatenate([pq[counted & isthing], class_iou[(union > 0) & stuff]])
    metrics["pq_dagger"] = float(dagger.mean()) if dagger.size else float("nan")
    metrics["miou"] = _mean(class_iou, union > 0)
    per_class = {
        "pq": pq,
        "sq": sq,
        "rq": rq,
        "pc": pc,
        "iou": class_iou,
        "tp": acc.tp,
        "fp": acc.fp,
        "fn": acc.fn,
    }
    return metrics, per_class
