"""Train-step time with CABB on vs off: same batch, same starting weights, same run.

    python benchmarks/train_step.py [--steps 20] [--batch 8] [--crop 128]

CPU preset (cpu_small) on synthetic crops; the two variants alternate step by step so that
machine noise hits both alike, and the median step time of each is compared (target ratio
<= 1.02; the CABB paper reports ~10 ms per batch, the EfficientPS replication 1.9x). Two
runs on the CPU: training (lr 0.005: the two variants' weights drift apart, so proposals and
positives differ and the ratio also carries the training dynamics) and frozen (lr 0: both
variants keep identical weights, so the ratio is CABB's own cost). With a GPU, the resnet50
network on 512x512 crops is measured too.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cabb_ray.config import load_config
from cabb_ray.data.crop_dataset import CropDataset, collate_crops
from cabb_ray.data.synthetic import write_synthetic_dataset
from cabb_ray.model.network import build_model


def measure(
    preset: str,
    overrides: list[str],
    root: Path,
    steps: int,
    batch: int,
    device: str,
    lr: float = 0.005,
):
    cfg = load_config(preset, overrides)
    dataset = CropDataset(root, cfg, length=batch, seed=0)
    images, targets, _ = collate_crops([dataset[i] for i in range(batch)])
    images = [img.to(device) for img in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    cut_boxes = sum(int(t["cut"].any(dim=1).sum()) for t in targets)
    torch.manual_seed(0)
    base = build_model(cfg, dataset.sampler.split.categories).to(device).train()
    variants = {}
    for name, on in (("on", True), ("off", False)):
        model = copy.deepcopy(base)
        model.rpn.cabb = model.roi_heads.cabb = on
        variants[name] = (model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    times = {name: [] for name in variants}
    for step in range(steps + 2):
        for name, (model, optimizer) in variants.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device, enabled=device == "cuda"):
                loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(
        f"{preset:15s} {device:5s} lr {lr:g} batch {batch} ({cut_boxes} cut GT boxes): CABB on "
        f"{1000 * on:7.1f} ms, off {1000 * off:7.1f} ms, ratio {on / off:.3f} "
        f"(median of {steps} interleaved steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small"
        write_synthetic_dataset(small, num_train=24, num_val=0, seed=0, height=256, width=512)
        for lr in (0.005, 0.0):
            measure(
                "cpu_quickstart",
                [f"data.crop_size=[{args.crop},{args.crop}]"],
                small,
                args.steps,
                args.batch,
                "cpu",
                lr,
            )
        if torch.cuda.is_available():
            large = Path(tmp) / "large"
            write_synthetic_dataset(large, num_train=12, num_val=0, seed=0, height=1024, width=2048)
            measure(
                "cityscapes_r50",
                ["data.root=null", "model.pretrained=none"],
                large,
                args.steps,
                args.batch,
                "cuda",
            )


if __name__ == "__main__":
    main()
