"""The torch Dataset that Ray Train workers read training crops from.

Sample i of epoch e on rank r is drawn with ``numpy.random.default_rng([seed, r, e, i])``:
ranks see different crops, the stream does not depend on the number of DataLoader workers or
their scheduling, and the same seed reproduces it exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cabb_ray.config import ExperimentConfig
from cabb_ray.data.crops import extract_crop
from cabb_ray.data.samplers import CropSampler, load_sampler


class CropDataset(Dataset):
    """``length`` crops per epoch, drawn by the configured sampler."""

    def __init__(
        self,
        root: str | Path,
        cfg: ExperimentConfig,
        split: str | None = None,
        rank: int = 0,
        length: int | None = None,
        seed: int | None = None,
    ):
        self.cfg = cfg
        self.sampler: CropSampler = load_sampler(root, split or cfg.data.train_split, cfg)
        self.rank = rank
        self.seed = cfg.run.seed if seed is None else seed
        self.length = (
            length if length is not None else cfg.optim.steps_per_epoch * cfg.data.batch_size
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, index])
        drawn = self.sampler.draw(rng)
        sample = extract_crop(
            drawn.image,
            drawn.ids,
            drawn.segments,
            self.sampler.classes,
            drawn.window,
            self.cfg.data.min_visible_pixels,
        )
        image = self.sampler.split.images[drawn.image_pos]
        sample["meta"]["image_id"] = image["id"]
        sample["meta"]["source_size"] = [image["height"], image["width"]]
        sample["meta"]["focus_segment"] = drawn.focus_segment
        return sample


def collate_crops(batch: list[dict[str, Any]]) -> tuple[list, list, list]:
    """(images, targets, metas) as lists, the way torchvision's detection models take them."""
    return [b["image"] for b in batch], [b["target"] for b in batch], [b["meta"] for b in batch]


def crop_loader(dataset: CropDataset) -> DataLoader:
    """Batches of the dataset's current epoch, as the training loops consume them."""
    return DataLoader(
        dataset,
        batch_size=dataset.cfg.data.batch_size,
        num_workers=dataset.cfg.data.loader_workers,
        collate_fn=collate_crops,
    )
