"""What Ray costs a training run, measured side by side in one run (target ratio >= 0.97).

    python benchmarks/ray_overhead.py [--steps 30] [--epochs 4] [--epoch-steps 10]

1. Steps: training steps/s under Ray Train (1 worker, DDP via prepare_model) vs the same loop
   without Ray, same config and crops. The plain loop is timed before and after the Ray run
   and the ratio uses their mean, so that drift of this shared machine does not land on one
   side only; each side measures its steady-state rate after 3 warm-up steps.
2. Whole epochs: the training loop launched as a one-worker search trial in the Tune trial's
   own process (the product's path for one worker) and under Ray Train (the path for several
   workers, here with one), each with evaluation every epoch, checkpoint, MLflow logging and
   the report, timed per epoch by the loop as ``time/epoch_s``, vs a plain loop of the same
   steps and evaluations without Ray, checkpoints or MLflow (before and after). The first
   epoch of each side is left out (warm-up).

Ray's start-up (cluster, worker group, DDP init) is a one-off cost per run, printed separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cabb_ray.config import config_from_dict, config_to_dict, load_config
from cabb_ray.data.synthetic import write_synthetic_dataset

WARMUP = 3


def timed_steps(cfg_dict: dict, root: str, steps: int, use_ray: bool) -> float:
    """Steady-state steps/s of the training loop (inside a Ray worker when ``use_ray``)."""
    from cabb_ray.data.crop_dataset import CropDataset, crop_loader, epoch_batches
    from cabb_ray.data.panoptic_format import load_split
    from cabb_ray.training.engine import train_step
    from cabb_ray.training.state import build_training

    cfg = config_from_dict(cfg_dict)
    categories = load_split(root, "val").categories
    module, optimizer, scheduler, _, state = build_training(cfg, categories, torch.device("cpu"))
    if use_ray:
        import ray.train.torch

        module = ray.train.torch.prepare_model(module)
    dataset = CropDataset(root, cfg, length=(steps + WARMUP) * cfg.data.batch_size)
    start = None
    for k, (images, targets, _) in enumerate(epoch_batches(crop_loader(dataset), 0)):
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


def plain_epochs(cfg, root: str) -> list[float]:
    """Wall seconds of each epoch of training steps + evaluation, without Ray."""
    from cabb_ray.data.crop_dataset import CropDataset, crop_loader, epoch_batches
    from cabb_ray.data.panoptic_format import load_split
    from cabb_ray.losses.balancing import host_values
    from cabb_ray.training.engine import evaluate, train_step
    from cabb_ray.training.state import build_training

    val = load_split(root, cfg.data.val_split)
    module, optimizer, scheduler, _, state = build_training(
        cfg, val.categories, torch.device("cpu")
    )
    loader = crop_loader(CropDataset(root, cfg))
    seconds = []
    for epoch in range(cfg.optim.epochs):
        start = time.perf_counter()
        for images, targets, _ in epoch_batches(loader, epoch):
            values = train_step(module, optimizer, scheduler, None, images, targets, state, cfg)
            if values is not None and state.step % cfg.run.log_every == 0:
                host_values(values)
        evaluate(module.model, val, cfg, torch.device("cpu"))
        module.train()
        seconds.append(time.perf_counter() - start)
    return seconds


def _trial_function(config: dict) -> None:
    """A one-worker search trial as the product runs it: the loop in the Tune trial's process."""
    from cabb_ray.training.loop import LoopArgs, train_loop
    from cabb_ray.training.sessions import TuneTrialSession

    train_loop(LoopArgs.from_dict(config), TuneTrialSession(torch.device("cpu")))


def launched_epochs(cfg, root: str, folder: Path, launcher: str) -> tuple[list[float], float]:
    """Wall seconds of each epoch (the loop's own ``time/epoch_s``, with evaluation, checkpoint,
    MLflow and the report) of a one-worker run holding both cores, launched as a Tune trial in
    its own process (``tune_trial``, today's search path) or under Ray Train (``ray_train``),
    and the run's whole wall time."""
    import ray
    from ray import tune

    from cabb_ray.tracking import RunLogger, check_tracking, start_run
    from cabb_ray.training.loop import LoopArgs
    from cabb_ray.training.ray_env import WorkerResources, init_ray
    from cabb_ray.training.ray_train import build_trainer

    uri = check_tracking(f"sqlite:///{folder / 'mlflow.db'}")
    run_id = start_run(cfg, uri, "ray_overhead", launcher)
    args = LoopArgs(config_to_dict(cfg), root, run_id, uri, threads=2)
    start = time.perf_counter()
    init_ray(dashboard=launcher != "tune_trial")  # as the search starts Ray for each path
    if launcher == "tune_trial":
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial_function), {"CPU": 2}),
            param_space=args.to_dict(),
            run_config=tune.RunConfig(name=launcher, storage_path=str(folder / "tune")),
        )
        error = tuner.fit()[0].error
    else:
        resources = WorkerResources(1, 2.0, 0.0)
        error = build_trainer(cfg, args, launcher, resources, folder / "train").fit().error
    wall = time.perf_counter() - start
    ray.shutdown()
    if error is not None:
        raise RuntimeError(f"the {launcher} run failed: {error}")
    logger = RunLogger(uri, run_id)
    for phase in ("steps", "eval", "checkpoint", "mlflow", "report"):
        seconds = [v for _, v in logger.history(f"time/epoch_{phase}_s")][1:]
        print(f"  {launcher} epoch phase {phase}: {statistics.mean(seconds):.2f} s (epochs 2..)")
    return [v for _, v in logger.history("time/epoch_s")], wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--epoch-steps", type=int, default=10)
    args = parser.parse_args()
    cfg = load_config("cpu_quickstart", ["data.loader_workers=1"])
    epochs_cfg = load_config(
        "cpu_quickstart",
        [
            "data.loader_workers=1",
            f"optim.epochs={args.epochs}",
            f"optim.steps_per_epoch={args.epoch_steps}",
            "optim.warmup_steps=5",
            "eval.every=1",
            "run.overlays=1",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "data")
        write_synthetic_dataset(root, num_train=24, num_val=4, seed=0, height=256, width=512)
        before = timed_steps(config_to_dict(cfg), root, args.steps, use_ray=False)
        under_ray, wall = ray_rate(config_to_dict(cfg), root, args.steps)
        after = timed_steps(config_to_dict(cfg), root, args.steps, use_ray=False)
        plain = (before + after) / 2
        epochs_cfg = dataclasses.replace(
            epochs_cfg, run=dataclasses.replace(epochs_cfg.run, output_dir=str(Path(tmp) / "runs"))
        )
        plain_before = plain_epochs(epochs_cfg, root)
        launched = {
            name: launched_epochs(epochs_cfg, root, Path(tmp), name)
            for name in ("tune_trial", "ray_train")
        }
        plain_after = plain_epochs(epochs_cfg, root)
    plain_epoch = statistics.mean(plain_before[1:] + plain_after[1:])
    print(
        f"cpu_quickstart, batch {cfg.data.batch_size} crops {list(cfg.data.crop_size)}, "
        f"{args.steps} steps after {WARMUP} warm-up:"
    )
    print(f"  without Ray: {before:.3f} steps/s before, {after:.3f} after the Ray run")
    print(f"  Ray Train, 1 worker: {under_ray:.3f} steps/s (wall time with start-up {wall:.0f} s)")
    print(f"  ratio Ray / mean(without): {under_ray / plain:.3f} (target >= 0.95)")
    print(
        f"whole epochs ({args.epoch_steps} steps + evaluation of 4 images, "
        f"epochs 2..{args.epochs}):"
    )
    print(
        f"  without Ray: {plain_epoch:.2f} s/epoch (mean of the runs before and after: "
        f"{statistics.mean(plain_before[1:]):.2f}, {statistics.mean(plain_after[1:]):.2f})"
    )
    targets = {"tune_trial": " (target >= 0.97)", "ray_train": ""}
    for name, (seconds, wall) in launched.items():
        epoch = statistics.mean(seconds[1:])
        print(
            f"  {name} (1 worker, 2 CPUs), with checkpoint + MLflow: {epoch:.2f} s/epoch "
            f"(wall time with start-up {wall:.0f} s); ratio epochs/s {name} / without: "
            f"{plain_epoch / epoch:.3f}{targets[name]}"
        )


if __name__ == "__main__":
    main()
