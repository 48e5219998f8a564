"""Panoptic evaluation of whole datasets: every metric cabb_ray reports, mergeable across ranks.

``PanopticEvaluator.update`` takes one image's GT and predicted id maps with their
segments_info; ``merge`` / ``all_reduce`` combine evaluators of disjoint image subsets (Ray
Train workers) into exactly the single-process result; ``compute`` returns the metric names of
docs/contracts.md plus per-class rows and per-size-bin mask AP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cabb_ray.data.panoptic_format import read_ids
from cabb_ray.errors import CabbRayError
from cabb_ray.metrics.mask_ap import MaskAPAccumulator
from cabb_ray.metrics.names import METRIC_NAMES
from cabb_ray.metrics.panoptic import (
    ImageSegments,
    PanopticAccumulator,
    compact_ids,
    intersections,
    summarize,
    unknown_id,
)

PREFETCH = 3


def collective_device():
    """Where tensors for torch.distributed collectives must live: NCCL (Ray Train's backend on
    GPUs) reduces only CUDA tensors, gloo only CPU ones."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class EvaluationResult:
    """Dataset metrics, per-class rows and the size bins used for mask AP."""

    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    images: int

    def scalars(self) -> dict[str, float]:
        """The numeric metrics (what runs report, checkpoint and compare)."""
        return {k: v for k, v in self.metrics.items() if isinstance(v, int | float)}

    def to_json(self) -> dict[str, Any]:
        def clean(value):
            return None if isinstance(value, float) and math.isnan(value) else value

        return {
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "per_class": [{k: clean(v) for k, v in row.items()} for row in self.per_class],
            "images": self.images,
        }

    def table(self) -> str:
        """A readable per-class table and the summary figures, in percent."""

        def pct(value: float) -> str:
            return "  nan" if value is None or math.isnan(value) else f"{100 * value:5.1f}"

        lines = [f"{'class':16s} {'PQ':>5s} {'SQ':>5s} {'RQ':>5s} {'PC':>5s} {'IoU':>5s}  kind"]
        for row in self.per_class:
            lines.append(
                f"{row['name'][:16]:16s} {pct(row['pq'])} {pct(row['sq'])} {pct(row['rq'])} "
                f"{pct(row['pc'])} {pct(row['iou'])}  {'thing' if row['isthing'] else 'stuff'}"
            )
        m = self.metrics
        lines.append("-" * 50)
        lines.append(f"{'':16s} {'PQ':>5s} {'SQ':>5s} {'RQ':>5s} {'PC':>5s}    N")
        for label, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st")):
            lines.append(
                f"{label:16s} {pct(m['pq' + suffix])} {pct(m['sq' + suffix])} "
                f"{pct(m['rq' + suffix])} {pct(m['pc' + suffix])} {m['n' + suffix]:4d}"
            )
        extras = [
            *METRIC_NAMES[METRIC_NAMES.index("pq_dagger") :],  # pq_dagger, miou, mask/box AP
            *sorted(k for k in m if k.startswith("map_")),
            *sorted(k for k in m if k.startswith("box_map_")),
        ]
        lines.append("  ".join(f"{k} {pct(m[k])}" for k in extras))
        return "\n".join(lines)


class PanopticEvaluator:
    """Accumulates PQ/SQ/RQ, PC, PQ-dagger, mIoU and mask AP over images."""

    def __init__(
        self,
        categories: list[dict[str, Any]],
        mask_ap: bool = True,
        crop_fraction: tuple[float, float] | None = None,
    ):
        """``crop_fraction``: the training crop's (height, width) over the training shortest
        side, for mask and box AP on the things wider or taller than it (mask_ap.py)."""
        self.categories = sorted(categories, key=lambda c: int(c["id"]))
        self.class_of = {int(c["id"]): k for k, c in enumerate(self.categories)}
        self.isthing = np.array([bool(c["isthing"]) for c in self.categories])
        self.panoptic = PanopticAccumulator(len(self.categories))
        things = [int(c["id"]) for c in self.categories if c["isthing"]]
        self.mask_ap = MaskAPAccumulator(things, crop_fraction) if mask_ap else None
        self.images = 0

    def update(
        self,
        image_id: Any,
        gt_ids: np.ndarray,
        gt_segments: list[dict[str, Any]],
        pred_ids: np.ndarray,
        pred_segments: list[dict[str, Any]],
        gt_where: str | Path = "ground truth",
        pred_where: str | Path = "prediction",
        instances: list[dict[str, Any]] | None = None,
    ) -> None:
        """Add one image (id maps as integer arrays, segments_info lists). Mask AP scores the
        predicted thing segments, or ``instances`` ({category_id, score, mask}) when given."""
        if pred_ids.shape != gt_ids.shape:
            raise CabbRayError(
                f"{pred_where}: size {pred_ids.shape[1]}x{pred_ids.shape[0]} differs from the "
                f"ground truth's {gt_ids.shape[1]}x{gt_ids.shape[0]} (image {image_id!r})"
            )
        gt = ImageSegments.from_segments_info(gt_segments, self.class_of, gt_where, True)
        pred = ImageSegments.from_segments_info(pred_segments, self.class_of, pred_where)
        gt_index = compact_ids(gt_ids, gt.ids, gt_where)
        pred_index = compact_ids(pred_ids, pred.ids, pred_where)
        counts = intersections(gt_index, pred_index, len(gt.ids), len(pred.ids))
        for where, ids, index, table, unknown in (
            (gt_where, gt_ids, gt_index, gt, counts[-1, :].sum()),
            (pred_where, pred_ids, pred_index, pred, counts[:, -1].sum()),
        ):
            if unknown:
                seg_id = unknown_id(ids, index, len(table.ids))
                raise CabbRayError(
                    f"{where}: segment id {seg_id} in the PNG is missing from segments_info"
                )
        counts = counts[:-1, :-1]
        for where, present, table in (
            (gt_where, counts[1:, :].sum(axis=1), gt),
            (pred_where, counts[:, 1:].sum(axis=0), pred),
        ):
            absent = np.flatnonzero(present == 0)
            if absent.size:
                raise CabbRayError(
                    f"{where}: segments_info lists id {int(table.ids[absent[0]])} that does not "
                    f"occur in the PNG (image {image_id!r})"
                )
        self.panoptic.update(counts, gt, pred)
        if self.mask_ap is not None:
            shape = tuple(gt_ids.shape)
            self.mask_ap.update(
                image_id,
                gt_index.numpy().reshape(shape),
                gt_segments,
                pred_index.numpy().reshape(shape),
                pred_segments,
                instances,
            )
        self.images += 1

    def merge(self, other: PanopticEvaluator) -> PanopticEvaluator:
        """Combine with an evaluator of a disjoint set of images."""
        self.panoptic.merge(other.panoptic)
        if self.mask_ap is not None and other.mask_ap is not None:
            self.mask_ap.merge(other.mask_ap)
        self.images += other.images
        return self

    def all_reduce(self) -> None:
        """Sum across torch.distributed ranks (after this every rank holds the full totals)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        sums = torch.from_numpy(np.append(self.panoptic.flat(), self.images))
        sums = sums.to(collective_device())
        dist.all_reduce(sums)
        values = sums.cpu().numpy()
        self.panoptic.load_flat(values[:-1])
        self.images = int(values[-1])
        if self.mask_ap is not None:
            parts: list[Any] = [None] * dist.get_world_size()
            mine = (self.mask_ap.images, self.mask_ap.gts, self.mask_ap.dets)
            dist.all_gather_object(parts, mine)
            things, fraction = self.mask_ap.thing_categories, self.mask_ap.crop_fraction
            merged = MaskAPAccumulator(things, fraction)
            for images, gts, dets in parts:
                merged.merge(MaskAPAccumulator(things, fraction, images, gts, dets))
            self.mask_ap = merged

    def compute(self) -> EvaluationResult:
        metrics, per_class = summarize(self.panoptic, self.isthing)
        metrics.update(
            self.mask_ap.compute()
            if self.mask_ap
            else {k: math.nan for k in ("map", "map50", "box_map", "box_map50")}
        )
        rows = [
            {
                "id": int(c["id"]),
                "name": c["name"],
                "isthing": bool(c["isthing"]),
                **{k: float(v[k_idx]) for k, v in per_class.items()},
            }
            for k_idx, c in enumerate(self.categories)
        ]
        return EvaluationResult(metrics, rows, self.images)


def _load_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CabbRayError(f"{path}: {label} JSON not found") from None
    except UnicodeDecodeError:
        raise CabbRayError(f"{path}: not UTF-8 text; expected a {label} JSON file") from None
    except json.JSONDecodeError as err:
        raise CabbRayError(f"{path}: invalid JSON at line {err.lineno}") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise CabbRayError(f"{path}: {label} JSON lacks required key 'annotations'")
    for key in ("annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            kind = type(data[key]).__name__
            raise CabbRayError(f"{path}: '{key}' must be a list, got {kind}")
    return data


def evaluate_folders(
    gt_json: str | Path,
    gt_folder: str | Path,
    pred_json: str | Path,
    pred_folder: str | Path,
    mask_ap: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """Evaluate COCO-panoptic prediction files against COCO-panoptic ground truth."""
    gt_data = _load_json(Path(gt_json), "ground-truth")
    pred_data = _load_json(Path(pred_json), "prediction")
    if "categories" not in gt_data:
        raise CabbRayError(f"{gt_json}: ground-truth JSON lacks required key 'categories'")
    for folder in (gt_folder, pred_folder):
        if not Path(folder).is_dir():
            raise CabbRayError(f"{folder}: folder not found")
    predictions = {}
    for i, ann in enumerate(pred_data["annotations"]):
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise CabbRayError(f"{pred_json}: annotations[{i}] lacks required key '{key}'")
        predictions[ann["image_id"]] = ann
    evaluator = PanopticEvaluator(gt_data["categories"], mask_ap=mask_ap)
    jobs = []
    for gt_ann in gt_data["annotations"]:
        pred_ann = predictions.get(gt_ann["image_id"])
        if pred_ann is None:
            raise CabbRayError(f"{pred_json}: no prediction for image {gt_ann['image_id']!r}")
        jobs.append(
            (
                gt_ann,
                pred_ann,
                Path(gt_folder) / gt_ann["file_name"],
                Path(pred_folder) / pred_ann["file_name"],
            )
        )

    def load(job):
        return read_ids(job[2]), read_ids(job[3])

    # PNG decoding dominates and releases the GIL: decode the next pairs while scoring this one.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(load, job) for job in jobs[:PREFETCH]]
        for n, (gt_ann, pred_ann, gt_path, pred_path) in enumerate(jobs, start=1):
            gt_ids, pred_ids = pending[n - 1].result()
            if n - 1 + PREFETCH < len(jobs):
                pending.append(pool.submit(load, jobs[n - 1 + PREFETCH]))
            pending[n - 1] = None
            evaluator.update(
                gt_ann["image_id"],
                gt_ids,
                gt_ann["segments_info"],
                pred_ids,
                pred_ann["segments_info"],
                gt_path,
                pred_path,
            )
            if progress is not None:
                progress(n, len(jobs))
    return evaluator.compute()
