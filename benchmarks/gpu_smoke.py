"""The CUDA path in one command, without Ray (its wheel is too big to carry to a GPU machine).

    python benchmarks/gpu_smoke.py [--steps 3] [--timing-steps 10]
    python benchmarks/gpu_smoke.py --device cpu --preset cpu_quickstart   # the same logic on CPU

On a machine with a CUDA GPU: trains the resnet50 preset (cityscapes_r50, untrained weights)
for a few steps with AMP on a small synthetic set, under DDP on a one-rank NCCL process group
(so the evaluator's and the balancer's collectives run on NCCL, as under Ray Train), writes a
training checkpoint, takes one more step, evaluates, then resumes from the checkpoint in a new
process and checks that parameters, optimizer state and the GradScaler's scale are on the GPU
and that the resumed step's loss equals the uninterrupted one. Last it prints the train-step
time with CABB on and off (``benchmarks/train_step.py``'s measurement). Without CUDA it says
so and exits 0. Any failed check exits 1 with one line saying which.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cabb_ray.config import ExperimentConfig, config_from_dict, load_config
from cabb_ray.data.crop_dataset import CropDataset, collate_crops
from cabb_ray.data.panoptic_format import load_split
from cabb_ray.data.synthetic import write_synthetic_dataset
from cabb_ray.errors import CabbRayError
from cabb_ray.losses.balancing import host_values
from cabb_ray.model.checkpoint import load_checkpoint, save_checkpoint
from cabb_ray.training.engine import evaluate, train_step
from cabb_ray.training.state import build_training, checkpoint_payload

SIZE = 256  # shortest side of the rescaled images and the crop size


class SmokeFailure(Exception):
    """A check of the CUDA path failed."""


def smoke_config(preset: str, device: str, steps: int) -> ExperimentConfig:
    return load_config(
        preset,
        [
            "data.root=null",
            "model.pretrained=none",  # no downloads on the machine that runs this
            f"data.shortest_side={SIZE}",
            f"data.crop_size=[{SIZE},{SIZE}]",
            "data.batch_size=2",
            "data.loader_workers=0",
            "optim.epochs=1",
            f"optim.steps_per_epoch={steps + 1}",
            "optim.warmup_steps=1",
            "eval.max_images=2",
            "eval.stuff_min_area=64",
            f"optim.amp={device == 'cuda'}",
            "loss.balancing=normalized",  # its all-reduce runs on the process group too
        ],
    )


def join_process_group(device: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
    )


def batch(dataset: CropDataset, k: int, device: torch.device):
    """The k-th training batch, the same in every process (drawn by index, not by RNG)."""
    size = dataset.cfg.data.batch_size
    images, targets, _ = collate_crops([dataset[(0, k * size + j)] for j in range(size)])
    return (
        [img.to(device) for img in images],
        [{key: v.to(device) for key, v in t.items()} for t in targets],
    )


def step_loss(module, optimizer, scheduler, scaler, images, targets, state, cfg) -> float:
    """One step's loss. With AMP, a step the GradScaler skips while it calibrates its scale
    (normal on the first steps) is taken again on the same batch, up to
    ``optim.max_nonfinite_steps`` in a row (then train_step raises)."""
    while True:
        values = train_step(module, optimizer, scheduler, scaler, images, targets, state, cfg)
        if values is not None:
            return host_values(values)["loss"]
        if scaler is None:
            raise SmokeFailure(f"step {state.step + 1} was skipped (non-finite loss or gradients)")
        print(f"step {state.step + 1}: skipped by the GradScaler, scale now {scaler.get_scale()}")


def check_on_device(module, optimizer, device: torch.device) -> None:
    for name, param in module.named_parameters():
        if param.device.type != device.type:
            raise SmokeFailure(f"parameter {name} is on {param.device}, expected {device.type}")
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device.type != device.type:
                raise SmokeFailure(f"optimizer state {key} is on {value.device}")


def first_run(cfg: ExperimentConfig, root: Path, device: torch.device, steps: int, out: Path):
    """Train ``steps`` steps, checkpoint, one more step, evaluate; returns that step's loss."""
    val = load_split(root, "val")
    parts = build_training(cfg, val.categories, device)
    module, optimizer, scheduler, scaler, state = parts
    ddp = DistributedDataParallel(module)
    dataset = CropDataset(root, cfg)
    times = []
    for k in range(steps):
        start = time.perf_counter()
        loss = step_loss(ddp, optimizer, scheduler, scaler, *batch(dataset, k, device), state, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        print(f"step {state.step}: loss {loss:.4f} ({times[-1]:.2f} s)", flush=True)
    check_on_device(module, optimizer, device)
    save_checkpoint(
        out,
        module.model,
        cfg,
        val.categories,
        **checkpoint_payload(parts),
    )
    loss = step_loss(ddp, optimizer, scheduler, scaler, *batch(dataset, steps, device), state, cfg)
    print(f"step {state.step}: loss {loss:.6f} (uninterrupted)", flush=True)
    result, _ = evaluate(module.model, val, cfg, device)  # all-reduces on the process group
    print(f"evaluation of {result.images} images: PQ {result.metrics['pq']:.4f}", flush=True)
    if result.images != cfg.eval.max_images:
        raise SmokeFailure(f"evaluated {result.images} images, expected {cfg.eval.max_images}")
    return loss


def resumed_run(root: Path, device: torch.device, checkpoint: Path) -> dict:
    """In a new process: restore the checkpoint, check placement, take the next step."""
    payload = load_checkpoint(checkpoint)
    cfg = config_from_dict(payload["config"])
    module, optimizer, scheduler, scaler, state = build_training(
        cfg, payload["categories"], device, payload
    )
    check_on_device(module, optimizer, device)
    saved_scale = (payload.get("scaler") or {}).get("scale")
    if scaler is not None and scaler.get_scale() != saved_scale:
        raise SmokeFailure(f"GradScaler scale {scaler.get_scale()} restored, saved {saved_scale}")
    ddp = DistributedDataParallel(module)
    images, targets = batch(CropDataset(root, cfg), state.step, device)
    loss = step_loss(ddp, optimizer, scheduler, scaler, images, targets, state, cfg)
    check_on_device(module, optimizer, device)
    scale_device = scaler._scale.device.type if scaler is not None else None
    if scaler is not None and scale_device != device.type:
        raise SmokeFailure(f"GradScaler scale tensor on {scale_device}")
    return {"loss": loss, "step": state.step, "scale": saved_scale}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--preset", default="cityscapes_r50")
    parser.add_argument("--steps", type=int, default=3, help="steps before the checkpoint")
    parser.add_argument("--timing-steps", type=int, default=10, help="0: no CABB on/off timing")
    parser.add_argument("--resume", help=argparse.SUPPRESS)  # the second process
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device on this machine, nothing to check (exit 0)")
        return 0
    device = torch.device(args.device)
    join_process_group(args.device)
    try:
        if args.resume:
            print(json.dumps(resumed_run(Path(args.root), device, Path(args.resume))))
            return 0
        return smoke(args, device)
    except (SmokeFailure, CabbRayError) as failure:
        print(f"gpu_smoke: FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()


def smoke(args, device: torch.device) -> int:
    tolerance = 1e-4 if device.type == "cuda" else 1e-6
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_synthetic_dataset(root, num_train=6, num_val=2, seed=0, height=SIZE, width=2 * SIZE)
        cfg = smoke_config(args.preset, device.type, args.steps)
        print(f"gpu_smoke: {args.preset} on {device.type}, AMP {cfg.optim.amp}", flush=True)
        checkpoint = Path(tmp) / "checkpoint.pt"
        expected = first_run(cfg, root, device, args.steps, checkpoint)
        command = [sys.executable, __file__, "--device", device.type, "--root", str(root)]
        child = subprocess.run(
            [*command, "--resume", str(checkpoint)],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            raise SmokeFailure(f"the resumed process failed: {child.stderr.strip()[-400:]}")
        resumed = json.loads(child.stdout.strip().splitlines()[-1])
        difference = abs(resumed["loss"] - expected)
        print(
            f"resumed in a new process at step {resumed['step']}: loss {resumed['loss']:.6f}, "
            f"uninterrupted {expected:.6f}, difference {difference:.2e}; parameters, optimizer "
            f"state{' and GradScaler scale' if cfg.optim.amp else ''} on {device.type}",
            flush=True,
        )
        if difference > tolerance * max(1.0, abs(expected)):
            raise SmokeFailure(f"resumed loss differs by {difference:.3g} (> {tolerance:g})")
        if args.timing_steps > 0:
            sys.path.insert(0, str(Path(__file__).parent))
            from train_step import measure

            overrides = ["data.root=null", "model.pretrained=none", f"data.shortest_side={SIZE}"]
            measure(
                args.preset,
                [*overrides, f"data.crop_size=[{SIZE},{SIZE}]"],
                root,
                args.timing_steps,
                cfg.data.batch_size * 2,
                device.type,
            )
    print("gpu_smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
