"""Training-crop throughput: crops/s per loader worker, from 512x1024 and 1024x2048 sources.

    python benchmarks/loader.py [--crops 200] [--workers 2]

For each source size it writes a few synthetic scenes, then times ``CropDataset`` (ISUS, the
default sampler) in this process (= one DataLoader worker) and through a DataLoader with
--workers processes. Settings follow the presets: 512x1024 sources with s0 = 512 and 256x256
crops (the quarter-scale CPU setting doubled), 1024x2048 with s0 = 1024 and 512x512 crops
(cityscapes_r50). Next to it, in the same run, the crops/s a training step consumes: the CPU
network (cpu_small) on a batch of 8 such crops, forward + backward + SGD step, median of a few
steps after one warm-up (on a GPU machine the ResNet-50 network would consume faster).
Last, the training loop's DataLoader rebuilt every epoch (as before) vs kept with persistent
worker processes (now), side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cabb_ray.config import load_config
from cabb_ray.data.crop_dataset import CropDataset, collate_crops, crop_loader, epoch_batches
from cabb_ray.data.index import build_segment_index
from cabb_ray.data.synthetic import write_synthetic_split
from cabb_ray.model.network import build_model

SETTINGS = [  # (source height, width, s0, crop)
    (512, 1024, 512, 256),
    (1024, 2048, 1024, 512),
]


def consumption(dataset: CropDataset, batch: int = 8, steps: int = 3) -> float:
    """Crops/s one training step of the CPU network consumes."""
    images, targets, _ = collate_crops([dataset[i] for i in range(batch)])
    torch.manual_seed(0)
    model = build_model(dataset.cfg, dataset.sampler.split.categories).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crops", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args()
    print(
        f"{'source':>10s} {'crop':>8s} {'1 process crops/s':>18s} "
        f"{f'{args.workers} workers crops/s':>18s} {'train consumes/s':>17s}"
    )
    for height, width, s0, crop in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_synthetic_split(root, "train", args.images, seed=0, height=height, width=width)
            build_segment_index(root, "train", verify=False)
            cfg = load_config(
                "cpu_quickstart",
                [
                    f"data.shortest_side={s0}",
                    f"data.crop_size=[{crop},{crop}]",
                    f"model.canonical_scale={224 * crop / 512}",
                    "data.sampler=isus",
                ],
            )
            dataset = CropDataset(root, cfg, length=args.crops)
            dataset[0]
            start = time.perf_counter()
            for i in range(args.crops):
                dataset[i]
            single = args.crops / (time.perf_counter() - start)
            loader = DataLoader(
                dataset,
                batch_size=8,
                num_workers=args.workers,
                collate_fn=collate_crops,
                persistent_workers=False,
            )
            start = time.perf_counter()
            for _ in loader:
                pass
            pooled = args.crops / (time.perf_counter() - start)
            consumed = consumption(dataset)
            print(
                f"{height}x{width:<5d} {crop}x{crop:<4d} {single:>18.1f} {pooled:>18.1f} "
                f"{consumed:>17.1f}  loader/train {pooled / consumed:.1f}x"
            )
    epochs_side_by_side(args.workers)


def epochs_side_by_side(workers: int, epochs: int = 6, steps: int = 10) -> None:
    """The run's DataLoader rebuilt every epoch (before) vs kept with persistent workers
    (now), on the cpu_quickstart preset's data: time to an epoch's first batch and per
    epoch, epochs 2.. (the first starts the workers either way), alternating the two."""
    cfg = load_config(
        "cpu_quickstart",
        [f"data.loader_workers={workers}", f"optim.steps_per_epoch={steps}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_split(root, "train", 12, seed=0, height=256, width=512)
        build_segment_index(root, "train", verify=False)
        dataset = CropDataset(root, cfg)
        loaders = {
            "rebuilt each epoch": crop_loader(dataset, persistent=False),
            "persistent workers": crop_loader(dataset, persistent=True),
        }
        first: dict[str, list[float]] = {name: [] for name in loaders}
        whole: dict[str, list[float]] = {name: [] for name in loaders}
        for epoch in range(epochs):
            for name, loader in loaders.items():
                start = time.perf_counter()
                batches = epoch_batches(loader, epoch)
                next(batches)
                got_first = time.perf_counter()
                for _ in batches:
                    pass
                if epoch > 0:
                    first[name].append(got_first - start)
                    whole[name].append(time.perf_counter() - start)
    print(
        f"\nloader epochs ({steps} batches of {cfg.data.batch_size} crops, {workers} workers, "
        f"cpu_quickstart data, epochs 2..{epochs}):"
    )
    for name in loaders:
        print(
            f"  {name:>20s}: first batch {statistics.mean(first[name]):.3f} s, "
            f"epoch {statistics.mean(whole[name]):.3f} s"
        )
    before, now = (statistics.mean(whole[n]) for n in loaders)
    print(f"  epoch time persistent / rebuilt: {now / before:.3f}")


if __name__ == "__main__":
    main()
