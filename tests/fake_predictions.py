"""Randomised panoptic predictions made from ground truth, for evaluator parity tests.

Segments are shifted (so IoUs land on both sides of 0.5), split, relabelled to another class,
dropped, painted over void and crowd regions, and mixed with false positives; ids go above
65535 so that the blue PNG channel is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.independent_reader import read_ids


def _to_png(ids: np.ndarray, path: Path) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def fake_prediction(gt: np.ndarray, segments: list[dict], categories: list[dict], rng) -> tuple:
    """One predicted id map and its segments_info."""
    h, w = gt.shape
    pred = np.zeros_like(gt)
    cat_ids = [c["id"] for c in categories]
    things = [c["id"] for c in categories if c["isthing"]]
    info: dict[int, dict] = {}
    next_id = int(rng.integers(1, 70000))

    def new_id() -> int:
        nonlocal next_id
        next_id += int(rng.integers(1, 5000))
        return next_id

    for seg in rng.permutation(segments):
        if rng.random() < 0.12:
            continue
        mask = gt == seg["id"]
        shift = rng.integers(-6, 7, size=2) * (rng.random() < 0.7)
        mask = np.roll(mask, tuple(int(s) for s in shift), axis=(0, 1))
        category = seg["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids))
        if rng.random() < 0.15:
            cut = int(rng.integers(1, w))
            left = mask.copy()
            left[:, cut:] = False
            mask[:, :cut] = False
            lid = new_id()
            pred[left] = lid
            info[lid] = {"category_id": int(category)}
        pid = new_id()
        pred[mask] = pid
        info[pid] = {"category_id": int(category)}
    for _ in range(int(rng.integers(0, 4))):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        box = (
            slice(y, y + int(rng.integers(2, h // 3))),
            slice(x, x + int(rng.integers(2, w // 3))),
        )
        if rng.random() < 0.5:
            pred[box] = 0
        else:
            fid = new_id()
            pred[box] = fid
            info[fid] = {"category_id": int(rng.choice(things))}
    present = set(np.unique(pred).tolist()) - {0}
    segments_info = [
        {"id": k, "category_id": v["category_id"], "score": float(rng.random())}
        for k, v in info.items()
        if k in present
    ]
    return pred, segments_info


def write_fake_predictions(gt_root: Path, split: str, out: Path, seed: int) -> tuple[Path, Path]:
    """Predictions for every image of a split: returns (json path, png folder)."""
    rng = np.random.default_rng(seed)
    data = json.loads((gt_root / f"{split}.json").read_text())
    folder = out / "pred"
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for ann in data["annotations"]:
        gt = read_ids(gt_root / split / ann["file_name"])
        pred, segments = fake_prediction(gt, ann["segments_info"], data["categories"], rng)
        _to_png(pred, folder / ann["file_name"])
        annotations.append(
            {"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segments}
        )
    path = out / "pred.json"
    path.write_text(
        json.dumps(
            {"annotations": annotations, "images": data["images"], "categories": data["categories"]}
        )
    )
    return path, folder
