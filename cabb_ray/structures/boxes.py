"""Boxes of the regions of a label map, as COCO's segments_info writes them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def label_boxes(labels: np.ndarray, max_label: int = 0) -> list[list[int] | None]:
    """COCO box ``[x, y, w, h]`` in whole pixels (w and h count both end pixels) of each label
    1..max_label (0: up to the map's largest) of an integer map; None for a label not in it.

    One C pass of scipy's find_objects, instead of a mask and two reductions per label.
    """
    top = max_label or int(labels.max(initial=0))
    if top < 1:
        return []
    return [None if found is None else _xywh(*found) for found in ndimage.find_objects(labels, top)]


def _xywh(rows: slice, cols: slice) -> list[int]:
    return [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]
