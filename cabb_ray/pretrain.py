"""Pre-train the whole CPU panoptic network on synthetic scenes: the weights that
``model.pretrained: synthetic_full`` loads (the analogue of a COCO-pretrained Mask R-CNN).

    python -m cabb_ray.pretrain [--steps 4000] [--seed 1000] [--images 512]
    python -m cabb_ray.pretrain --resume              # continue an interrupted run
    python -m cabb_ray.pretrain --init-from FILE      # extend a shipped file by --steps more

Every part trains (body, FPN, RPN, RoI box and mask heads, semantic head) on whole images
(the ``full`` sampler: no crops, so CABB has nothing to act on), with plain smooth-L1 and no
ISUS, on scenes of a seed that no evaluation set uses: no row of the ablation is favoured. The
shipped file keeps every weight in fp16 plus how it was made (total steps over all sittings,
seed, commands, the learning curve on its own held-out scenes).

Long work: a progress line with ETA, an evaluation on held-out scenes of the same seed every
``--eval-every`` steps, and a resumable state (plus a snapshot of the weights) written at each
evaluation in ``--state-dir`` (``--resume``; Ctrl-C prints the command). ``--out`` is written
once the sitting's schedule has ended. A sitting started with ``--init-from`` has its own
warm-up and decay and draws another stream of images and scales.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cabb_ray.config import ExperimentConfig, config_to_dict, load_config
from cabb_ray.data.crop_dataset import CropDataset, crop_loader, epoch_batches
from cabb_ray.data.panoptic_format import load_split
from cabb_ray.data.resolve import resolve_dataset_root
from cabb_ray.errors import ArgumentParser, CabbRayError
from cabb_ray.losses.balancing import host_values
from cabb_ray.model.checkpoint import load_checkpoint, save_checkpoint
from cabb_ray.model.pretrained import (
    FULL_FORMAT,
    builtin_full_weights_path,
    full_network_payload,
    read_full_network_file,
    read_weights_file,
)
from cabb_ray.training.engine import evaluate, train_step
from cabb_ray.training.state import build_training, checkpoint_payload

# Seeds of the synthetic sets that anything is evaluated on: pre-training must not see them.
EVALUATION_SEEDS = range(0, 100)
CURVE_KEYS = ("pq", "pq_th", "pq_st", "map", "box_map", "miou")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m cabb_ray.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="cpu_quickstart", help="preset or YAML (network)")
    parser.add_argument("--steps", type=int, default=4000, help="steps of this sitting")
    parser.add_argument("--seed", type=int, default=1000, help="synthetic scenes' seed")
    parser.add_argument("--images", type=int, default=512, help="synthetic training scenes")
    parser.add_argument("--batch", type=int, default=2, help="whole images a step")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    parser.add_argument("--eval-images", type=int, default=16, help="held-out scenes")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="default: the package's weights file")
    parser.add_argument("--state-dir", type=Path, help="resumable state (default: cache)")
    parser.add_argument("--resume", action="store_true", help="continue from --state-dir")
    parser.add_argument("--init-from", type=Path, help="a pre-trained file to extend")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config key=value"
    )
    return parser.parse_args(argv)


def _check_writable(out: Path) -> None:
    """Fail before training, not after an hour of it."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        raise CabbRayError(f"--out {out}: {folder} is not writable; pass --out PATH")


def pretraining_config(args: argparse.Namespace, first_step: int = 0) -> ExperimentConfig:
    """The network of ``--config`` trained from scratch on whole images: CABB off, no ISUS.
    A later sitting (``first_step`` > 0) draws another stream of images and scales."""
    if args.steps < 2:
        raise CabbRayError(f"--steps: expected >= 2, got {args.steps}")
    if args.eval_every < 1 or args.steps % args.eval_every:
        raise CabbRayError(
            f"--eval-every {args.eval_every}: expected a positive divisor of --steps {args.steps}"
        )
    cfg = load_config(
        args.config,
        [
            "model.pretrained=none",
            "data.root=null",
            f"data.synthetic.seed={args.seed}",
            f"data.synthetic.num_train={args.images}",
            f"data.synthetic.num_val={args.eval_images}",
            "data.sampler=full",
            "data.r_st=[0.75, 1.25]",
            f"data.batch_size={args.batch}",
            "loss.cabb_rpn=false",
            "loss.cabb_roi=false",
            "loss.balancing=fixed",
            f"optim.epochs={args.steps // args.eval_every}",
            f"optim.steps_per_epoch={args.eval_every}",
            f"optim.warmup_steps={min(200, args.steps // 4)}",
            f"optim.lr={args.lr}",
            f"optim.amp={'true' if args.device == 'cuda' else 'false'}",
            "eval.max_images=null",
            f"run.seed={args.seed + first_step}",
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
    if cfg.data.sampler != "full" or cfg.loss.cabb_rpn or cfg.loss.cabb_roi:
        raise CabbRayError(
            "pre-training trains on whole images with plain smooth-L1 (data.sampler=full, "
            "loss.cabb_*=false) so that no ablation row is favoured; do not --set them"
        )
    return cfg


def _recorded_args(args: argparse.Namespace) -> dict[str, str]:
    """The arguments that define a run (a resume must repeat them), as strings."""
    ignored = ("resume", "state_dir", "log_every")
    return {k: str(v) for k, v in vars(args).items() if k not in ignored}


def _eta(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"


def _write_weights(
    out: Path,
    model: torch.nn.Module,
    cfg: ExperimentConfig,
    categories: list[dict[str, Any]],
    history: dict[str, Any],
    state: Any,
    offset: int,
    complete: bool,
) -> Path:
    """The shipped file: fp16 weights and how they were made."""
    meta = {
        "preset": cfg.model.preset,
        "body": model.arch.backbone,
        "fpn_channels": cfg.model.fpn_channels,
        "categories": categories,
        "seed": cfg.data.synthetic.seed,
        "images": cfg.data.synthetic.num_train,
        "total_steps": offset + state.step,
        "complete": complete,  # False: a snapshot in the middle of a sitting's schedule
        "train_seconds": round(history["train_seconds"] + state.train_seconds, 1),
        "sittings": history["sittings"],
        "curve": history["curve"],
        "pretraining": "whole images (sampler full), CABB off, no ISUS, from scratch",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(full_network_payload(model, meta), tmp)
    tmp.replace(out)
    return out


def _state_file(args: argparse.Namespace, cfg: ExperimentConfig | None = None) -> Path:
    """Where a run keeps its resumable state (``--state-dir``, default in the cache)."""
    cfg = cfg or pretraining_config(args)
    folder = args.state_dir or (
        Path(cfg.data.cache_dir).expanduser()
        / "pretrain"
        / f"{cfg.model.preset}-seed{cfg.data.synthetic.seed}"
    )
    return folder / "last.pt"


def run_pretraining(args: argparse.Namespace, argv: Sequence[str]) -> Path:
    cfg = pretraining_config(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CabbRayError("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)
    out = args.out or builtin_full_weights_path(cfg.model.preset)
    _check_writable(out)
    state_file = _state_file(args, cfg)
    state_dir = state_file.parent
    if args.resume and args.init_from:
        raise CabbRayError("--resume continues a run; --init-from starts one: give one of them")
    if not args.resume and state_file.is_file():
        raise CabbRayError(
            f"{state_file} holds an unfinished pre-training: continue it with --resume, or "
            "give another --state-dir"
        )
    if args.resume and not state_file.is_file():
        raise CabbRayError(f"--resume: no pre-training state at {state_file} (see --state-dir)")

    payload, prior = None, None
    history = {"sittings": [], "curve": [], "train_seconds": 0.0, "steps": 0}
    if args.resume:
        payload = load_checkpoint(state_file)
        history = payload["pretrain"]
        saved_args = history["sittings"][-1]["args"]
        mine = _recorded_args(args)
        differs = {k for k, v in saved_args.items() if k != "init_from" and mine.get(k) != v}
        if differs:
            raise CabbRayError(
                f"--resume: {state_file} was started with other arguments "
                f"({', '.join(sorted(differs))}); resume with the same ones"
            )
    elif args.init_from:
        prior = read_weights_file(args.init_from)
        meta = prior.get("meta", {})
        if not meta.get("complete", True):
            print(
                f"warning: {args.init_from} is a snapshot taken in the middle of a schedule "
                f"(step {meta.get('total_steps')}); --resume its state instead if you still "
                "have it",
                file=sys.stderr,
            )
        history = {
            "sittings": list(meta.get("sittings", [])),
            "curve": list(meta.get("curve", [])),
            "train_seconds": float(meta.get("train_seconds", 0.0)),
            "steps": int(meta.get("total_steps", 0)),
        }
    first_step = history["sittings"][-1]["first_step"] if args.resume else history["steps"]
    cfg = pretraining_config(args, first_step)
    if payload is not None and payload["config"] != config_to_dict(cfg):
        raise CabbRayError(
            f"--resume: {state_file} was started with another configuration (the --config "
            "file or the defaults changed since); resume with the same ones"
        )
    root = resolve_dataset_root(cfg.data)
    val = load_split(root, cfg.data.val_split)
    parts = build_training(cfg, val.categories, device, payload)
    if prior is not None:
        read_full_network_file(args.init_from, parts.module.model, val.categories)
    module, optimizer, scheduler, scaler, state = parts
    if not args.resume:
        history["sittings"].append(
            {
                "command": "python -m cabb_ray.pretrain " + shlex.join(argv),
                "args": _recorded_args(args),
                "steps": args.steps,
                "first_step": history["steps"],
                "device": args.device,
                "torch": str(torch.__version__),
            }
        )
    offset = history["sittings"][-1]["first_step"]
    total = cfg.optim.epochs * cfg.optim.steps_per_epoch
    print(
        f"pre-training {cfg.model.preset} (whole network) on {args.images} whole synthetic "
        f"scenes of seed {cfg.data.synthetic.seed}: steps {state.step}..{total} of this "
        f"sitting ({offset} before it), {args.batch} images a step, on {device}; state in "
        f"{state_dir}",
        flush=True,
    )
    dataset = CropDataset(root, cfg, split=cfg.data.train_split)
    loader = crop_loader(dataset, pin_memory=device.type == "cuda")
    transfer = {"non_blocking": device.type == "cuda"}
    sitting_start, steps_at_start = time.perf_counter(), state.step
    for epoch in range(state.epoch, cfg.optim.epochs):
        for images, targets, _ in epoch_batches(loader, epoch):
            step_start = time.perf_counter()
            images = [img.to(device, **transfer) for img in images]
            targets = [{k: v.to(device, **transfer) for k, v in t.items()} for t in targets]
            values = train_step(module, optimizer, scheduler, scaler, images, targets, state, cfg)
            state.train_seconds += time.perf_counter() - step_start
            if values is not None and state.step % args.log_every == 0:
                values = host_values(values)
                rate = (state.step - steps_at_start) / (time.perf_counter() - sitting_start)
                terms = " ".join(
                    f"{k[4:]} {v:.3f}" for k, v in values.items() if k.startswith("raw/")
                )
                print(
                    f"step {state.step}/{total} loss {values['loss']:.3f} ({terms}) "
                    f"lr {values['lr']:.4f} {1 / rate:.2f} s/step "
                    f"ETA {_eta((total - state.step) / rate)}",
                    flush=True,
                )
        state.epoch = epoch + 1
        eval_start = time.perf_counter()
        result, _ = evaluate(module.model, val, cfg, device)
        scalars = result.scalars()
        point = {"step": offset + state.step, **{k: float(scalars[k]) for k in CURVE_KEYS}}
        history["curve"].append(point)
        print(
            f"evaluation at step {point['step']} on {len(val.images)} held-out scenes: "
            + " ".join(f"{k} {point[k]:.3f}" for k in CURVE_KEYS)
            + f" ({time.perf_counter() - eval_start:.0f} s)",
            flush=True,
        )
        save_checkpoint(
            state_file,
            module.model,
            cfg,
            val.categories,
            **checkpoint_payload(parts),
            pretrain=history,
        )
        # a usable file at every evaluation, beside the state: --out only gets finished ones
        snapshot = state_dir / "snapshot.pt"
        _write_weights(snapshot, module.model, cfg, val.categories, history, state, offset, False)
    out = _write_weights(out, module.model, cfg, val.categories, history, state, offset, True)
    state_file.replace(state_dir / "finished.pt")  # nothing left to resume
    size = out.stat().st_size / 2**20
    total_steps = offset + state.step
    print(f"wrote {out} ({size:.1f} MB, {FULL_FORMAT}, {total_steps} steps in all)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        run_pretraining(args, argv)
    except CabbRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = [a for a in argv if a != "--resume"]
        if "--init-from" in again:  # the state now holds the sitting it started
            k = again.index("--init-from")
            del again[k : k + 2]
        print("\ninterrupted", file=sys.stderr)
        if _state_file(args).is_file():
            print(
                "the state of the last evaluation is kept; continue with\n"
                f"  python -m cabb_ray.pretrain {shlex.join([*again, '--resume'])}",
                file=sys.stderr,
            )
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
