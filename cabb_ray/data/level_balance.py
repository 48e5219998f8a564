"""How evenly a sampler spreads thing instances over the pyramid levels.

ISUS exists to flatten this histogram (CABB paper Sec. 2.1); the normalised entropy
H / log(levels) is 1 for a perfectly even spread and 0 when every instance lands on one level.
Levels come from the model's own heuristic (``cabb_ray.structures.levels.box_levels``) applied to
each instance's full extent at the crop's scale (``target["full_boxes"]``): that is the size
ISUS targets and the box a crop-aware regressor learns, even where the crop cuts it (a level
5 instance seldom fits inside a crop, so its visible box alone would always look smaller).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.stats

from cabb_ray.data.crop_dataset import CropDataset
from cabb_ray.structures.levels import box_levels


def level_histogram(
    dataset: CropDataset, samples: int, progress: Callable[[int, int], None] | None = None
) -> tuple[dict[int, int], dict[int, int]]:
    """Instances per pyramid level over the first ``samples`` crops of ``dataset``: all
    instances, and only each crop's focus instance (the thing the window was placed on, which
    is what ISUS rescales; crops placed on stuff have none)."""
    k_min, k_max = dataset.cfg.model.roi_levels
    every = dict.fromkeys(range(k_min, k_max + 1), 0)
    focus = dict.fromkeys(range(k_min, k_max + 1), 0)
    for i in range(samples):
        sample = dataset[i]
        target = sample["target"]
        levels = box_levels(target["full_boxes"], dataset.cfg.model).tolist()
        for level in levels:
            every[level] += 1
        focus_id = sample["meta"].get("focus_segment")
        ids = target["segment_ids"].tolist()
        if focus_id in ids:
            focus[levels[ids.index(focus_id)]] += 1
        if progress is not None:
            progress(i + 1, samples)
    return every, focus


def normalized_entropy(counts: dict[int, int]) -> float:
    """Shannon entropy of the level histogram divided by log(number of levels)."""
    values = np.array(list(counts.values()), dtype=float)
    if values.sum() == 0 or len(values) < 2:
        return 0.0
    return float(scipy.stats.entropy(values) / math.log(len(values)))
