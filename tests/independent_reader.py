"""A deliberately separate reader of COCO-panoptic files, sharing no code with cabb_ray.

Tests check the package's writers against it, so a bug in a shared helper cannot hide itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def read_ids(png: Path) -> np.ndarray:
    rgb = np.array(Image.open(png)).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_split(root: Path, split: str) -> dict:
    return json.loads((root / f"{split}.json").read_text())


def segment_stats(ids: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """id -> (area, [x, y, w, h]) computed pixel by pixel with np.nonzero."""
    out = {}
    for seg in np.unique(ids):
        if seg == 0:
            continue
        ys, xs = np.nonzero(ids == seg)
        box = [
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        ]
        out[int(seg)] = (len(xs), box)
    return out
