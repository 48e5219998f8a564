"""Pictures of predictions: category colours and overlays (predict's outputs, MLflow's
per-evaluation overlays)."""

from __future__ import annotations

import numpy as np


def category_colors(categories: list[dict]) -> dict[int, list[int]]:
    """Category id to its RGB colour (Cityscapes colours; grey where a category has none)."""
    return {int(c["id"]): c.get("color", [128, 128, 128]) for c in categories}


def overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict], colors: dict) -> np.ndarray:
    """Category colours blended over the image, with white segment borders."""
    out = image.astype(np.float32).copy()
    for seg in segments:
        mask = ids == seg["id"]
        out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colors[seg["category_id"]], np.float32)
    border = np.zeros(ids.shape, dtype=bool)
    border[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    border[1:, :] |= ids[1:, :] != ids[:-1, :]
    out[border] = 255
    return out.clip(0, 255).astype(np.uint8)
