"""Training steps/s under Ray Train (1 worker, DDP via prepare_model) vs the same loop without
Ray: same config, same crops, same run. Target ratio >= 0.95.

    python benchmarks/ray_overhead.py [--steps 30]

The plain loop is timed before and after the Ray run and the ratio uses their mean, so that
drift of this shared machine does not land on one side only. Both sides run
``cabb_ray.engine.train_step`` on the cpu_quickstart network over the same
CropDataset stream; each measures its own steady-state rate after 3 warm-up steps. Ray's
start-up (cluster, worker group, DDP init) is a one-off cost per run and printed separately.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cabb_ray.config import config_from_dict, config_to_dict, load_config
from cabb_ray.data.synthetic import write_synthetic_dataset

WARMUP = 3


def timed_steps(cfg_dict: dict, root: str, steps: int, use_ray: bool) -> float:
    """Steady-state steps/s of the training loop (inside a Ray worker when ``use_ray``)."""
    from torch.utils.data import DataLoader

    from cabb_ray.data.crop_dataset import CropDataset, collate_crops
    from cabb_ray.data.panoptic_format import load_split
    from cabb_ray.engine import TrainModule, TrainState, make_optimizer, train_step
    from cabb_ray.losses.balancing import LossBalancer
    from cabb_ray.model.network import build_model

    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(0)
    categories = load_split(root, "val").categories
    module = TrainModule(build_model(cfg, categories), LossBalancer(cfg.loss))
    optimizer, scheduler = make_optimizer(module, cfg)
    if use_ray:
        import ray.train.torch

        module = ray.train.torch.prepare_model(module)
    dataset = CropDataset(root, cfg, length=(steps + WARMUP) * cfg.data.batch_size)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.loader_workers,
        collate_fn=collate_crops,
    )
    state = TrainState()
    start = None
    for k, (images, targets, _) in enumerate(loader):
        if k == WARMUP:
            start = time.perf_counter()
        train_step(module, optimizer, scheduler, None, images, targets, state, cfg)
    return steps / (time.perf_counter() - start)


def ray_rate(cfg_dict: dict, root: str, steps: int) -> tuple[float, float]:
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        rate = timed_steps(config["cfg"], config["root"], config["steps"], use_ray=True)
        # Ray Train V2 keeps the metrics of reports that come with a checkpoint.
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "rate.txt").write_text(f"{rate}\n")
            ray.train.report(
                {"steps_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(folder)
            )

    start = time.perf_counter()
    ray.init(num_cpus=2)
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            loop,
            train_loop_config={"cfg": cfg_dict, "root": root, "steps": steps},
            # the worker gets both cores, as the plain loop has them (Ray sets a worker's
            # OMP_NUM_THREADS to its CPU count)
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
            run_config=RunConfig(name="overhead", storage_path=storage),
        )
        result = trainer.fit()
    ray.shutdown()
    if result.error is not None or not result.metrics:
        raise RuntimeError(f"the Ray Train run reported nothing: {result.error}")
    return result.metrics["steps_per_s"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    cfg = load_config("cpu_quickstart", ["data.loader_workers=1"])
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "data")
        write_synthetic_dataset(root, num_train=24, num_val=4, seed=0, height=256, width=512)
        before = timed_steps(config_to_dict(cfg), root, args.steps, use_ray=False)
        under_ray, wall = ray_rate(config_to_dict(cfg), root, args.steps)
        after = timed_steps(config_to_dict(cfg), root, args.steps, use_ray=False)
        plain = (before + after) / 2
    print(
        f"cpu_quickstart, batch {cfg.data.batch_size} crops {list(cfg.data.crop_size)}, "
        f"{args.steps} steps after {WARMUP} warm-up:"
    )
    print(f"  without Ray: {before:.3f} steps/s before, {after:.3f} after the Ray run")
    print(f"  Ray Train, 1 worker: {under_ray:.3f} steps/s (wall time with start-up {wall:.0f} s)")
    print(f"  ratio Ray / mean(without): {under_ray / plain:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
