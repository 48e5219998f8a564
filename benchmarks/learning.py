"""How fast the CPU network learns: PQ, PQ_th, PQ_st and mask AP over a training budget, for
several seeds, with the seed-to-seed spread a search has to see through.

    python benchmarks/learning.py [--seeds 0 1 2] [--at 25 50 100] [--config cpu_quickstart]
                                  [--set key=value ...]

Each seed trains the preset once, in one process without Ray (``cabb_ray.training.local``),
on the preset's synthetic scenes, and is evaluated on the preset's validation images at each
percentage of its budget, and at the end also on validation scenes of a seed that nothing was
trained or tuned on (``--holdout-seed``: generalisation, not memorised scenes). Printed per
checkpoint: mean and standard deviation over seeds, the training seconds spent to get there,
and steps/s; the ``start`` rows are the pre-trained network before any fine-tuning (on both
validation sets), so that the table shows what the run adds to what the file already knows.
Targets (issue 20, fine-tuning ``synthetic_full``): at the end of the preset's run
PQ_th >= 0.35, mask AP >= 0.25, PQ >= 0.45 on the preset's validation set and PQ_th >= 0.30
on the held-out seed's; within one quickstart trial's budget PQ_th >= 0.25.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cabb_ray.config import load_config
from cabb_ray.data.panoptic_format import load_split
from cabb_ray.data.resolve import resolve_dataset_root
from cabb_ray.errors import ArgumentParser, run_cli
from cabb_ray.model.network import build_model
from cabb_ray.training.engine import evaluate
from cabb_ray.training.local import train_locally

COLUMNS = (
    ("pq", "PQ"),
    ("pq_th", "PQ_th"),
    ("pq_st", "PQ_st"),
    ("map", "mask AP"),
    ("box_map", "box AP"),
    ("box_map_over_crop", "box AP > crop"),  # the things every training crop cuts
)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _row(label: str, percent: str, seconds: str, evaluations: list[dict]) -> list[str]:
    """One table row: its label cells, then mean ± std of each column over ``evaluations``."""
    return [label, percent, seconds] + [
        _mean_std([e[key] for e in evaluations]) for key, _ in COLUMNS
    ]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cpu_quickstart")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--at", type=float, nargs="+", default=[25, 50, 100], help="%% of budget")
    parser.add_argument("--holdout-seed", type=int, default=50, help="scenes nothing saw")
    parser.add_argument("--holdout-images", type=int, default=48)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    total = cfg.optim.epochs * cfg.optim.steps_per_epoch
    steps = sorted({max(1, round(total * p / 100)) for p in args.at})
    root = resolve_dataset_root(cfg.data)
    holdout_cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"data.synthetic.seed={args.holdout_seed}",
            f"data.synthetic.num_val={args.holdout_images}",
            "data.synthetic.num_train=1",
            "eval.max_images=null",
        ],
    )
    holdout = load_split(resolve_dataset_root(holdout_cfg.data), "val")
    val = load_split(root, cfg.data.val_split)
    cpu = torch.device("cpu")
    pretrained = build_model(cfg, val.categories)  # every seed starts from the same weights
    start = {
        "val": evaluate(pretrained, val, cfg, cpu)[0].scalars(),
        "holdout": evaluate(pretrained, holdout, holdout_cfg, cpu)[0].scalars(),
    }
    del pretrained
    print(
        f"{args.config} {' '.join(args.overrides)}: {total} steps of {cfg.data.batch_size} "
        f"crops {list(cfg.data.crop_size)}, evaluated at steps {steps} on "
        f"{cfg.eval.max_images or 'all'} validation images, seeds {args.seeds}",
        flush=True,
    )
    runs = []
    for seed in args.seeds:
        started = time.perf_counter()
        seeded = load_config(args.config, [*args.overrides, f"run.seed={seed}"])
        run = train_locally(seeded, root, evaluate_at=set(steps), log=None)
        result, _ = evaluate(run.module.model, holdout, holdout_cfg, cpu)
        run.evaluations["holdout"] = result.scalars()
        runs.append(run)
        last = run.evaluations[steps[-1]]
        held = run.evaluations["holdout"]
        print(
            f"  seed {seed}: PQ {last['pq']:.3f} PQ_th {last['pq_th']:.3f} (held-out scenes: "
            f"PQ {held['pq']:.3f} PQ_th {held['pq_th']:.3f}) "
            f"({total / run.train_seconds:.2f} steps/s, "
            f"{time.perf_counter() - started:.0f} s with evaluation)",
            flush=True,
        )
    header = ["step", "% budget", "train s"] + [name for _, name in COLUMNS]
    rows = [_row("start", "0", "0", [start["val"]])]
    for step in steps:
        seconds = statistics.fmean(r.step_seconds[step] for r in runs)
        evaluations = [r.evaluations[step] for r in runs]
        rows.append(_row(str(step), f"{100 * step / total:.0f}", f"{seconds:.0f}", evaluations))
    rows.append(_row("held-out start", "0", "-", [start["holdout"]]))
    rows.append(_row("held-out end", "100", "-", [r.evaluations["holdout"] for r in runs]))
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    print()
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"(start: the pre-trained network before fine-tuning; held-out: "
        f"{len(holdout.images)} validation scenes of seed {args.holdout_seed}, which nothing was "
        "trained or tuned on)"
    )
    rate = statistics.fmean(total / r.train_seconds for r in runs)
    print(f"\nmean over {len(runs)} seeds (± standard deviation); {rate:.2f} training steps/s")


if __name__ == "__main__":
    run_cli(main)
