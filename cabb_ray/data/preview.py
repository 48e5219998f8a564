"""``python -m cabb_ray.data preview``: look at the crops a sampler produces.

A PNG grid of crops with instance masks tinted, boxes in green, and cut sides redrawn thick in
red; plus ``samples.json`` with, per crop, the source image, window in source pixels, scale,
flip, and per instance its segment id, box and cut flags. The first thing to open when a
training run behaves oddly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from cabb_ray.config import ExperimentConfig
from cabb_ray.data.crop_dataset import CropDataset
from cabb_ray.viz import render_crop


def write_preview(
    root: str | Path, cfg: ExperimentConfig, num: int, out: str | Path, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``out/crops.png`` and ``out/samples.json``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = CropDataset(root, cfg, length=num, seed=seed)
    samples, tiles = [], []
    for i in range(num):
        sample = dataset[i]
        tiles.append(render_crop(sample))
        meta, target = sample["meta"], sample["target"]
        samples.append(
            {
                "index": i,
                "image_id": meta["image_id"],
                "window": [round(v, 3) for v in meta["window"]],
                "scale": meta["scale"],
                "sigma": meta["sigma"],
                "flip": meta["flip"],
                "instances": [
                    {"segment_id": s, "box": [round(v, 2) for v in b], "cut": c}
                    for s, b, c in zip(
                        target["segment_ids"].tolist(),
                        target["boxes"].tolist(),
                        target["cut"].tolist(),
                        strict=True,
                    )
                ],
            }
        )
    cols = min(8, num)
    rows = math.ceil(num / cols)
    cell_w = max(t.width for t in tiles) + 4
    cell_h = max(t.height for t in tiles) + 4
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % cols) * cell_w + 2, (k // cols) * cell_h + 2))
    png = out / "crops.png"
    grid.save(png)
    manifest = out / "samples.json"
    manifest.write_text(
        json.dumps({"sampler": cfg.data.sampler, "seed": seed, "crops": samples}, indent=1)
    )
    return png, manifest
