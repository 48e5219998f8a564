"""The torch Dataset that Ray Train workers read training crops from.

Sample i of epoch e on rank r is drawn with ``numpy.random.default_rng([seed, r, e, i])``:
ranks see different crops, the stream does not depend on the number of DataLoader workers or
their scheduling, and the same seed reproduces it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

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

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``index`` of the current epoch, or ``(epoch, index)``: a DataLoader's
        persistent worker processes hold their own copy of the dataset, so ``EpochSampler``
        sends the epoch along with each index."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        rng = np.random.default_rng([self.seed, self.rank, epoch, index])
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


class EpochSampler(Sampler[tuple[int, int]]):
    """(epoch, index) pairs of one epoch; ``set_epoch`` picks the epoch (in the training
    process, where a DataLoader draws its indices)."""

    def __init__(self, length: int):
        self.length = length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in range(self.length))

    def __len__(self) -> int:
        return self.length


def crop_loader(
    dataset: CropDataset, pin_memory: bool = False, persistent: bool = True
) -> DataLoader:
    """The run's one DataLoader: its worker processes persist across epochs (``persistent``;
    False rebuilds them each epoch, as before, for the benchmark). Iterate an epoch with
    ``epoch_batches``. ``pin_memory`` on CUDA, for non-blocking copies to the device."""
    workers = dataset.cfg.data.loader_workers
    return DataLoader(
        dataset,
        batch_size=dataset.cfg.data.batch_size,
        sampler=EpochSampler(len(dataset)),
        num_workers=workers,
        collate_fn=collate_crops,
        persistent_workers=persistent and workers > 0,
        pin_memory=pin_memory,
    )


def epoch_batches(loader: DataLoader, epoch: int) -> Iterator[tuple[list, list, list]]:
    """Batches of the given epoch: (images, targets, metas)."""
    loader.sampler.set_epoch(epoch)
    return iter(loader)
