"""Mask AP and box AP with pycocotools' COCOeval (iouType "segm" and "bbox"), overall and per
instance-size bin.

COCOeval is not additive, so the accumulator keeps per-image RLE-encoded instances (a few
hundred bytes each) that are concatenated across workers and evaluated once.

Size bins, as in Fig. 5 of the CABB paper: percentiles of the non-crowd ground-truth instance
areas of the evaluated set, [0, 50), [50, 75), [75, 90), [90, 99), [99, 100]. Large objects are
where crop training hurts and CABB helps, so the last bins are the ones to watch. Box AP
scores the detector's boxes (CABB acts on box regression), binned by the same GT mask areas.

One more bin is absolute, not a percentile: ``over_crop``, the things whose box is wider or
taller than the training crop (``crop_fraction``: its sides over the training shortest side,
so that it applies at any evaluation resolution). Those are the things every training crop
cuts, which is what CABB is about. COCOeval bins by an "area" key, so that bin is a second
COCOeval pass whose "area" is each box's larger side over the crop's (> 1: wider or taller),
for ground truth and detections alike; unmatched detections of smaller boxes are ignored in
it, as COCO ignores them in its area ranges.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from cabb_ray.metrics.names import OVER_CROP_BIN, SIZE_PERCENTILES


def encode_segments(index: np.ndarray, wanted: np.ndarray) -> list[dict[str, Any]]:
    """RLE of each compact index in ``wanted`` (1-based), encoding only its column span.

    COCO RLE runs column-major, so the columns left and right of a segment are a prefix and a
    suffix of zeros; encoding just the segment's columns and padding the counts is exact and
    much cheaper than encoding full-image masks.
    """
    height, width = index.shape
    slices = ndimage.find_objects(index)
    out = []
    for k in wanted:
        cols = slices[k - 1][1]
        band = np.asfortranarray(index[:, cols] == k)
        flat = band.ravel(order="F")
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate([[0], change, [flat.size]])
        runs = np.diff(bounds).tolist()
        if flat[0]:
            runs.insert(0, 0)
        runs[0] += cols.start * height
        trailing = (width - cols.stop) * height
        if len(runs) % 2 == 1:
            runs[-1] += trailing
        elif trailing:
            runs.append(trailing)
        rle = mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
        out.append(rle)
    return out


@dataclass
class MaskAPAccumulator:
    """Per-image GT and predicted thing instances as RLE; evaluated with COCOeval at the end."""

    thing_categories: list[int]
    # (height, width) of the training crop over the training shortest side; None: no
    # over_crop bin
    crop_fraction: tuple[float, float] | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    gts: list[dict[str, Any]] = field(default_factory=list)
    dets: list[dict[str, Any]] = field(default_factory=list)

    def update(
        self,
        image_id: Any,
        gt_index: np.ndarray,
        gt_segments: list[dict[str, Any]],
        pred_index: np.ndarray,
        pred_segments: list[dict[str, Any]],
        instances: list[dict[str, Any]] | None = None,
    ) -> None:
        """Add one image. Detections are the predicted thing segments, or, when given,
        ``instances`` (overlapping masks with scores, as a detector outputs them, each with
        its ``box`` (x0, y0, x1, y1) when it has one; otherwise the mask's box is scored)."""
        height, width = gt_index.shape
        key = len(self.images) + 1  # COCO needs integer ids; strings are kept for reference
        self.images.append({"id": key, "image_id": str(image_id), "height": height, "width": width})
        things = set(self.thing_categories)
        gt_k = [k for k, s in enumerate(gt_segments, 1) if int(s["category_id"]) in things]
        for k, rle in zip(gt_k, encode_segments(gt_index, gt_k), strict=True):
            seg = gt_segments[k - 1]
            self.gts.append(
                {
                    "image_id": key,
                    "category_id": int(seg["category_id"]),
                    "iscrowd": int(seg.get("iscrowd", 0)),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": list(mask_utils.toBbox(rle)),
                }
            )
        if instances is not None:
            found = [
                (
                    int(i["category_id"]),
                    float(i["score"]),
                    mask_utils.encode(np.asfortranarray(i["mask"].astype(np.uint8))),
                    _xywh(i.get("box")),
                )
                for i in instances
                if int(i["category_id"]) in things
            ]
        else:
            pred_k = [k for k, s in enumerate(pred_segments, 1) if int(s["category_id"]) in things]
            found = [
                (
                    int(pred_segments[k - 1]["category_id"]),
                    float(pred_segments[k - 1].get("score", 1.0)),
                    rle,
                    None,
                )
                for k, rle in zip(pred_k, encode_segments(pred_index, pred_k), strict=True)
            ]
        self.dets += [
            {
                "image_id": key,
                "category_id": c,
                "segmentation": rle,
                "score": score,
                "bbox": box if box is not None else [float(v) for v in mask_utils.toBbox(rle)],
            }
            for c, score, rle, box in found
        ]

    def merge(self, other: MaskAPAccumulator) -> MaskAPAccumulator:
        offset = len(self.images)
        for img in other.images:
            self.images.append({**img, "id": img["id"] + offset})
        self.gts += [{**g, "image_id": g["image_id"] + offset} for g in other.gts]
        self.dets += [{**d, "image_id": d["image_id"] + offset} for d in other.dets]
        return self

    def size_bins(self) -> list[tuple[str, float, float]]:
        areas = [g["area"] for g in self.gts if not g["iscrowd"]]
        if not areas:
            return []
        edges = np.percentile(areas, SIZE_PERCENTILES)
        edges[0], edges[-1] = 0.0, 1e12
        names = [f"p{a}-{b}" for a, b in itertools.pairwise(SIZE_PERCENTILES)]
        return [
            (n, float(lo), float(hi))
            for n, lo, hi in zip(names, edges[:-1], edges[1:], strict=True)
        ]

    def compute(self) -> dict[str, float]:
        """map, map50 and map_<bin> (masks), box_map, box_map50 and box_map_<bin> (boxes) per
        size bin; NaN where there is nothing to evaluate."""
        if not any(not g["iscrowd"] for g in self.gts):
            return {k: float("nan") for k in ("map", "map50", "box_map", "box_map50")}
        gt = COCO()
        gt.dataset = {
            "images": [
                {"id": i["id"], "height": i["height"], "width": i["width"]} for i in self.images
            ],
            "annotations": [{**g, "id": n} for n, g in enumerate(self.gts, 1)],
            "categories": [{"id": c} for c in self.thing_categories],
        }
        bins = self.size_bins()
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        results = {}
        kinds = (("", "segm", "segmentation"), ("box_", "bbox", "bbox"))
        for prefix, iou_type, field_name in kinds:
            dets = [
                {k: d[k] for k in ("image_id", "category_id", "score", field_name)}
                for d in self.dets
            ]
            results.update(_evaluate(gt, dets, iou_type, bins, prefix))
            if self.crop_fraction is not None:
                results.update(self._over_crop(gt, dets, iou_type, prefix))
        # how many ground-truth things each bin holds: what its AP can resolve
        areas = np.array([g["area"] for g in self.gts if not g["iscrowd"]])
        for name, lo, hi in bins:  # closed ranges, as COCOeval's
            results[f"things_{name}"] = float(((areas >= lo) & (areas <= hi)).sum())
        return results

    def _over_crop(
        self, gt: COCO, dets: list[dict[str, Any]], iou_type: str, prefix: str
    ) -> dict[str, float]:
        """AP on the things wider or taller than the training crop (module docstring)."""
        crop_h, crop_w = self.crop_fraction or (1.0, 1.0)
        short = {i["id"]: min(i["height"], i["width"]) for i in self.images}

        def over_crop(image_id: int, box: list[float]) -> float:
            return max(box[2] / (crop_w * short[image_id]), box[3] / (crop_h * short[image_id]))

        by_long_side = COCO()
        by_long_side.dataset = {
            **gt.dataset,
            "annotations": [
                {**g, "area": over_crop(g["image_id"], g["bbox"])}
                for g in gt.dataset["annotations"]
            ],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            by_long_side.createIndex()
        inside = [a for a in by_long_side.dataset["annotations"] if not a["iscrowd"]]
        things = float(sum(a["area"] > 1.0 for a in inside))
        # a detection is sized by what is scored: its box (bbox) or its mask's box (segm)
        sized = [
            {
                **d,
                "_over_crop": over_crop(
                    d["image_id"],
                    d["bbox"] if iou_type == "bbox" else mask_utils.toBbox(d["segmentation"]),
                ),
            }
            for d in dets
        ]
        # COCO's area ranges are closed: the bin starts just above 1 (strictly wider or taller)
        bins = [(OVER_CROP_BIN, float(np.nextafter(1.0, 2.0)), 1e12)]
        results = _evaluate(by_long_side, sized, iou_type, bins, prefix, area_key="_over_crop")
        return {**results, f"things_{OVER_CROP_BIN}": things}


def _xywh(box: Any) -> list[float] | None:
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def _evaluate(
    gt: COCO,
    dets: list[dict[str, Any]],
    iou_type: str,
    bins: list,
    prefix: str,
    area_key: str | None = None,
) -> dict[str, float]:
    """COCOeval AP@[.5:.95], AP50 and AP per size bin for one kind of detection; with
    ``area_key``, each detection's "area" (what COCOeval bins by) is that key's value."""
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            dt = gt.loadRes([{k: v for k, v in d.items() if k != area_key} for d in dets])
            if area_key is not None:  # loadRes keeps the order and numbers ids from 1
                for ann, d in zip(dt.dataset["annotations"], dets, strict=True):
                    ann["area"] = d[area_key]
        else:
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "annotations": [],
                "categories": gt.dataset["categories"],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        evaluator.params.areaRng = [[0.0, 1e12]] + [[lo, hi] for _, lo, hi in bins]
        evaluator.params.areaRngLbl = ["all"] + [n for n, _, _ in bins]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]

    def average(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else float("nan")

    results = {
        f"{prefix}map": average(precision[:, :, :, 0, -1]),
        f"{prefix}map50": average(precision[0, :, :, 0, -1]),
    }
    for a, (name, _, _) in enumerate(bins, start=1):
        results[f"{prefix}map_{name}"] = average(precision[:, :, :, a, -1])
    return results
