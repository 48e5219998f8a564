"""Pre-train the CPU network's body + FPN on synthetic scenes: the weights that
``model.pretrained: synthetic`` loads.

    python -m cabb_ray.pretrain [--steps 2000] [--seed 1000] [--images 256] [--out PATH]

The analogue of ImageNet initialisation for a network that cannot download any: the whole
panoptic network trains from scratch on synthetic scenes drawn with a seed that no evaluation
set uses, and only the backbone (body + FPN) is kept, in fp16. Detection and segmentation
heads are thrown away, so every training run that starts from these weights still learns its
heads from scratch. The shipped file was made with the defaults on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cabb_ray.config import load_config
from cabb_ray.data.resolve import resolve_dataset_root
from cabb_ray.errors import CabbRayError
from cabb_ray.local_training import train_locally
from cabb_ray.model.backbones import backbone_payload, builtin_weights_path

# Seeds of the synthetic sets that anything is evaluated on: pre-training must not see them.
EVALUATION_SEEDS = range(0, 100)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cabb_ray.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="cpu_quickstart", help="preset or YAML (network)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1000, help="synthetic scenes' seed")
    parser.add_argument("--images", type=int, default=256, help="synthetic training scenes")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", type=Path, help="default: the package's weights file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config key=value"
    )
    return parser.parse_args(argv)


def _check_writable(out: Path) -> None:
    """Fail before training, not after 40 minutes of it."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise CabbRayError(f"--out {out}: {folder} is not writable; pass --out PATH")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.steps < 2:
            raise CabbRayError(f"--steps: expected >= 2, got {args.steps}")
        cfg = load_config(
            args.config,
            [
                "model.pretrained=none",
                "data.root=null",
                f"data.synthetic.seed={args.seed}",
                f"data.synthetic.num_train={args.images}",
                "data.synthetic.num_val=8",
                "optim.epochs=1",
                f"optim.steps_per_epoch={args.steps}",
                f"optim.warmup_steps={min(100, args.steps // 2)}",
                f"optim.lr={args.lr}",
                "eval.max_images=8",
                f"run.seed={args.seed}",
                *args.overrides,
            ],
        )
        seed = cfg.data.synthetic.seed
        if seed in EVALUATION_SEEDS or cfg.data.root is not None:
            raise CabbRayError(
                f"data.synthetic.seed {seed}: seeds {EVALUATION_SEEDS.start}.."
                f"{EVALUATION_SEEDS.stop - 1} are kept for evaluation sets (and data.root must "
                "stay null); pre-train on another seed"
            )
        out = args.out or builtin_weights_path(cfg.model.preset)
        _check_writable(out)
        root = resolve_dataset_root(cfg.data)
        print(
            f"pre-training {cfg.model.preset} from scratch: {args.steps} steps of "
            f"{cfg.data.batch_size} crops on {args.images} synthetic scenes (seed {seed})",
            flush=True,
        )
        started = time.time()
        run = train_locally(cfg, root, evaluate_at={args.steps}, log=lambda s: print(s, flush=True))
    except CabbRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = run.evaluations.get(args.steps, {})
    summary = " ".join(f"{k} {metrics[k]:.3f}" for k in ("pq", "pq_th", "pq_st") if k in metrics)
    print(f"on its own validation scenes: {summary}")
    meta = {
        "preset": cfg.model.preset,
        "fpn_channels": cfg.model.fpn_channels,
        "steps": args.steps,
        "seed": cfg.data.synthetic.seed,
        "images": args.images,
        "lr": args.lr,
        "train_seconds": round(run.train_seconds, 1),
        "validation": {k: float(v) for k, v in metrics.items()},
        "torch": str(torch.__version__),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(
        backbone_payload(run.module.model.backbone, run.module.model.arch.backbone, meta), tmp
    )
    tmp.replace(out)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MB) in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
