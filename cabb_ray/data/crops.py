"""Training crops with per-side cut flags (the data contract in docs/contracts.md).

A crop is a window of the source image, in continuous source-pixel coordinates, resampled by
a scale factor to the crop size. Panoptic ids are sampled nearest-neighbour with one explicit
rule (crop pixel j reads source column floor(x0 + (j + 0.5) / scale)), so tests can recompute
every mask, box and flag independently; the RGB image is resampled bilinearly by Pillow.

Cut flags are a property of boxes, as the CABB loss is: side s of an instance is cut when the
instance's full-resolution box extends past the window on that side, i.e. some pixel of the
instance has its centre outside the window there. An instance that merely touches the window
edge is not cut, nor is one that ends at the image border inside a window that overhangs the
image (the overhang is padding: void in the panoptic map, ignore (255) in the semantic map,
black in the image).

Instances with fewer than ``min_visible_pixels`` pixels inside the crop are dropped from the
instance targets (too little evidence to regress a box or a mask from); their pixels keep
their class in the semantic target. Crowd segments never become instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from cabb_ray.structures.classes import ClassMapping

IGNORE = 255


@dataclass(frozen=True)
class CropWindow:
    """Where a crop comes from: source-pixel window, scale, horizontal flip."""

    x0: float
    y0: float
    scale: float  # crop pixels per source pixel
    height: int  # crop size in crop pixels
    width: int
    flip: bool = False
    sigma: float = 1.0  # the sampler's augmentation factor, for debugging

    @property
    def x1(self) -> float:
        return self.x0 + self.width / self.scale

    @property
    def y1(self) -> float:
        return self.y0 + self.height / self.scale

    def source_rows(self) -> np.ndarray:
        return np.floor(self.y0 + (np.arange(self.height) + 0.5) / self.scale).astype(np.int64)

    def source_cols(self) -> np.ndarray:
        return np.floor(self.x0 + (np.arange(self.width) + 0.5) / self.scale).astype(np.int64)

    def as_dict(self) -> dict[str, Any]:
        return {
            "window": [self.x0, self.y0, self.x1, self.y1],
            "scale": self.scale,
            "sigma": self.sigma,
            "flip": self.flip,
        }


def _sample_ids(ids: np.ndarray, window: CropWindow) -> np.ndarray:
    """Nearest-neighbour panoptic ids of the crop; pixels outside the source are void (0)."""
    rows, cols = window.source_rows(), window.source_cols()
    h0, w0 = ids.shape
    out = np.zeros((window.height, window.width), dtype=ids.dtype)
    r_ok = (rows >= 0) & (rows < h0)
    c_ok = (cols >= 0) & (cols < w0)
    out[np.ix_(r_ok, c_ok)] = ids[np.ix_(rows[r_ok], cols[c_ok])]
    return out


def _sample_image(image: np.ndarray, window: CropWindow) -> np.ndarray:
    """Bilinear RGB crop (Pillow, box-resize of the part inside the source), black padding."""
    h0, w0 = image.shape[:2]
    rows, cols = window.source_rows(), window.source_cols()
    r_ok = np.flatnonzero((rows >= 0) & (rows < h0))
    c_ok = np.flatnonzero((cols >= 0) & (cols < w0))
    out = np.zeros((window.height, window.width, 3), dtype=np.uint8)
    if r_ok.size == 0 or c_ok.size == 0:
        return out
    i0, i1 = int(r_ok[0]), int(r_ok[-1]) + 1
    j0, j1 = int(c_ok[0]), int(c_ok[-1]) + 1
    box = (
        max(window.x0 + j0 / window.scale, 0.0),
        max(window.y0 + i0 / window.scale, 0.0),
        min(window.x0 + j1 / window.scale, float(w0)),
        min(window.y0 + i1 / window.scale, float(h0)),
    )
    region = Image.fromarray(image).resize((j1 - j0, i1 - i0), Image.BILINEAR, box=box)
    out[i0:i1, j0:j1] = np.asarray(region)
    return out


def cut_flags(bbox_xywh: np.ndarray, window: CropWindow) -> np.ndarray:
    """[N, 4] (left, top, right, bottom) from full-resolution COCO boxes (x, y, w, h)."""
    x, y, w, h = (bbox_xywh[:, k] for k in range(4))
    return np.stack(
        [
            x + 0.5 < window.x0,
            y + 0.5 < window.y0,
            x + w - 0.5 >= window.x1,
            y + h - 0.5 >= window.y1,
        ],
        axis=1,
    )


def full_extent_boxes(bbox_xywh: np.ndarray, window: CropWindow) -> np.ndarray:
    """Each instance's whole box in crop coordinates (x0, y0, x1, y1), past the crop edges
    where it is cut: the extent a crop-aware box regressor is allowed to predict."""
    x0 = (bbox_xywh[:, 0] - window.x0) * window.scale
    y0 = (bbox_xywh[:, 1] - window.y0) * window.scale
    x1 = x0 + bbox_xywh[:, 2] * window.scale
    y1 = y0 + bbox_xywh[:, 3] * window.scale
    if window.flip:
        x0, x1 = window.width - x1, window.width - x0
    return np.stack([x0, y0, x1, y1], axis=1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, 4] float boxes (x0, y0, x1, y1) of [N, H, W] non-empty masks, x1 and y1 one past
    the last pixel (torchvision's masks_to_boxes gives the last pixel itself)."""
    return masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])


def extract_crop(
    image: np.ndarray,
    ids: np.ndarray,
    segments: list[dict[str, Any]],
    classes: ClassMapping,
    window: CropWindow,
    min_visible_pixels: int,
) -> dict[str, Any]:
    """One training sample: image [3,H,W] float in [0, 1], and its targets."""
    crop_ids = _sample_ids(ids, window)
    rgb = _sample_image(image, window)
    if window.flip:
        crop_ids = crop_ids[:, ::-1]
        rgb = rgb[:, ::-1]

    seg_ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    sem_of = np.array([classes.semantic_index(int(s["category_id"])) for s in segments])
    order = np.argsort(seg_ids)
    pos = np.searchsorted(seg_ids[order], crop_ids) if len(seg_ids) else np.zeros_like(crop_ids)
    pos = np.clip(pos, 0, max(len(seg_ids) - 1, 0))
    known = (seg_ids[order][pos] == crop_ids) if len(seg_ids) else np.zeros(crop_ids.shape, bool)
    semantic = np.where(known, sem_of[order][pos] if len(seg_ids) else 0, IGNORE)

    things = [
        s
        for s in segments
        if int(s["category_id"]) in classes.thing_ids and not s.get("iscrowd", 0)
    ]
    masks, labels, kept = [], [], []
    for seg in things:
        mask = crop_ids == int(seg["id"])
        if int(mask.sum()) < min_visible_pixels:
            continue
        masks.append(mask)
        labels.append(classes.thing_label(int(seg["category_id"])))
        kept.append(seg)
    bbox = np.array([s["bbox"] for s in kept], dtype=np.float64).reshape(-1, 4)
    cut = cut_flags(bbox, window)
    full = full_extent_boxes(bbox, window)
    if window.flip:
        cut = cut[:, [2, 1, 0, 3]]
    h, w = window.height, window.width
    target_masks = (
        torch.from_numpy(np.stack(masks).astype(np.uint8))
        if masks
        else torch.zeros((0, h, w), dtype=torch.uint8)
    )
    return {
        "image": torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0,
        "target": {
            "boxes": mask_boxes(target_masks),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": target_masks,
            "cut": torch.from_numpy(cut.astype(bool)).reshape(-1, 4),
            "full_boxes": torch.from_numpy(full.astype(np.float32)).reshape(-1, 4),
            "semantic": torch.from_numpy(np.ascontiguousarray(semantic)).to(torch.int64),
            "segment_ids": torch.tensor([int(s["id"]) for s in kept], dtype=torch.int64),
        },
        "meta": window.as_dict(),
    }
