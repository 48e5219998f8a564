"""FPN level assignment: the one heuristic the RoI pooler and ISUS both use.

torchvision's ``MultiScaleRoIAlign`` assigns a box of size s = sqrt(area) to level
floor(canonical_level + log2(s / canonical_scale)), clamped to the pyramid (FPN paper, Eq. 1),
through ``LevelMapper``. ISUS (paper Sec. 2.1) must pick scales against exactly that rule, so
both go through the mapper built here from the same ``ModelConfig`` fields; nothing copies its
constants.
"""

from __future__ import annotations

import torch
from torchvision.ops.poolers import LevelMapper, initLevelMapper

from cabb_ray.config import ModelConfig


def level_mapper(model: ModelConfig) -> LevelMapper:
    """The mapper the model's RoI pooler uses (levels ``model.roi_levels``)."""
    k_min, k_max = model.roi_levels
    return initLevelMapper(k_min, k_max, model.canonical_scale, model.canonical_level)


def box_levels(boxes: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Absolute pyramid level (e.g. 2..5) of each [N, 4] x0y0x1y1 box."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    return level_mapper(model)([boxes.to(torch.float32)]) + model.roi_levels[0]


def size_range_for_level(level: int, model: ModelConfig) -> tuple[float, float]:
    """sqrt(area) interval [low, high) that the heuristic maps to ``level``.

    The clamped end levels take every size below (above) their boundary; ISUS samples one
    octave there, the same width as the interior levels.
    """
    k_min, k_max = model.roi_levels
    if not k_min <= level <= k_max:
        raise ValueError(f"level {level} outside the pyramid {k_min}..{k_max}")
    low = model.canonical_scale * 2.0 ** (level - model.canonical_level)
    return low, 2.0 * low
