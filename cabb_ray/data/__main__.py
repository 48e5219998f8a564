"""``python -m cabb_ray.data``: synthetic scenes, Cityscapes import, index, size stats."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from cabb_ray.errors import ArgumentParser, CabbRayError, run_cli
from cabb_ray.progress import progress_printer


def _int_at_least(minimum: int):
    """argparse type: an integer >= minimum, with a message that names the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m cabb_ray.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the synthetic street-scene dataset")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--num-train", type=_non_negative, default=200)
    synth.add_argument("--num-val", type=_non_negative, default=20)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--height", type=_positive, default=512)
    synth.add_argument("--width", type=_positive, default=1024)

    index = sub.add_parser("index", help="build <split>.segments.parquet")
    index.add_argument("--root", required=True, type=Path)
    index.add_argument("--split", action="append", help="split name (repeatable; default: all)")
    index.add_argument("--no-verify", action="store_true", help="skip checking PNGs against JSON")

    cityscapes = sub.add_parser("cityscapes", help="convert Cityscapes gtFine to this format")
    cityscapes.add_argument("--cityscapes-root", required=True, type=Path)
    cityscapes.add_argument("--out", required=True, type=Path)
    cityscapes.add_argument("--split", action="append", help="default: train and val")
    cityscapes.add_argument("--copy", action="store_true", help="copy images instead of linking")

    stats = sub.add_parser("stats", help="thing-instance size distribution of a split")
    stats.add_argument(
        "--root", type=Path, help="dataset root (default: the quickstart's synthetic scenes)"
    )
    stats.add_argument("--split", default="train")
    stats.add_argument(
        "--crop",
        type=_positive,
        nargs="?",
        help="crop side in px for the truncation share (default: the cpu_quickstart preset's)",
    )
    stats.add_argument("--plot", type=Path, help="also write a PNG histogram here")
    preview = sub.add_parser("preview", help="PNG grid and samples.json of training crops")
    preview.add_argument("--root", required=True, type=Path)
    preview.add_argument("--sampler", required=True, choices=["random", "cus", "isus", "full"])
    preview.add_argument("--num", type=_positive, default=16)
    preview.add_argument("--out", required=True, type=Path)
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--config", default="cpu_quickstart", help="preset or YAML")
    preview.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    preview.add_argument("--split", default=None, help="default: data.train_split")

    levels = sub.add_parser("levels", help="instances per FPN level under cus and isus")
    levels.add_argument("--root", required=True, type=Path)
    levels.add_argument("--num", type=_positive, default=5000)
    levels.add_argument("--config", default="cpu_quickstart", help="preset or YAML")
    levels.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    levels.add_argument(
        "--samplers", nargs="+", default=["cus", "isus"], choices=["random", "cus", "isus", "full"]
    )
    return parser


def _splits_of(root: Path) -> list[str]:
    if not root.is_dir():
        raise CabbRayError(f"{root}: dataset folder not found")
    splits = sorted(p.stem for p in root.glob("*.json"))
    if not splits:
        raise CabbRayError(f"{root}: no <split>.json files found")
    return splits


def _writable(flag: str, path: Path, folder: bool) -> None:
    """Fail before the work, not after it: ``path`` can be created (or, for a folder, is
    one already) in a writable place."""
    if folder and path.exists() and not path.is_dir():
        raise CabbRayError(f"{flag} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise CabbRayError(f"{flag} {path}: is a folder (expected a file path)")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CabbRayError(f"{flag} {path}: {parent} is not a writable folder")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("out", "plot"):
        if getattr(args, flag, None) is not None:
            _writable(f"--{flag}", getattr(args, flag), folder=flag == "out")
    try:
        return _run(args)
    except OSError as err:  # a file that vanished or cannot be written: one line, not a trace
        where = f"{err.filename}: " if err.filename else ""
        raise CabbRayError(f"{where}{err.strerror or err}") from None


def _run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from cabb_ray.data.synthetic import write_synthetic_dataset

        def progress(split: str, done: int, total: int) -> None:
            progress_printer(f"synth {split}")(done, total)

        figures = write_synthetic_dataset(
            args.out, args.num_train, args.num_val, args.seed, args.height, args.width, progress
        )
        print(
            f"wrote {figures['images']} images to {args.out} in {figures['seconds']:.1f} s "
            f"({figures['images_per_second']:.1f} images/s)"
        )
    elif args.command == "index":
        from cabb_ray.data.index import build_segment_index

        for split in args.split or _splits_of(args.root):
            path = build_segment_index(
                args.root,
                split,
                verify=not args.no_verify,
                progress=progress_printer(f"index {split}"),
            )
            print(f"wrote {path}")
    elif args.command == "cityscapes":
        from cabb_ray.data.cityscapes import import_cityscapes

        splits = tuple(args.split or ("train", "val"))
        for path in import_cityscapes(args.cityscapes_root, args.out, splits, args.copy):
            print(f"wrote {path}")
    elif args.command == "preview":
        from cabb_ray.config import load_config
        from cabb_ray.data.preview import write_preview

        overrides = [*args.set, f"data.sampler={args.sampler}"]
        if args.split:
            overrides.append(f"data.train_split={args.split}")
        cfg = load_config(args.config, overrides)
        for path in write_preview(args.root, cfg, args.num, args.out, args.seed):
            print(f"wrote {path}")
    elif args.command == "levels":
        from cabb_ray.config import load_config
        from cabb_ray.data.crop_dataset import CropDataset
        from cabb_ray.data.level_balance import level_histogram, normalized_entropy

        for sampler in args.samplers:
            cfg = load_config(args.config, [*args.set, f"data.sampler={sampler}"])
            dataset = CropDataset(args.root, cfg, length=args.num)
            every, focus = level_histogram(dataset, args.num, progress_printer(f"levels {sampler}"))
            print(
                f"{sampler:6s} all instances {every} entropy {normalized_entropy(every):.3f}; "
                f"focus instance {focus} entropy {normalized_entropy(focus):.3f}"
            )
    elif args.command == "stats":
        from cabb_ray.data.stats import plot_size_histogram, thing_size_stats

        root, crop = args.root, args.crop
        if root is None or crop is None:
            from cabb_ray.config import load_config
            from cabb_ray.data.resolve import resolve_dataset_root

            quickstart = load_config("cpu_quickstart")
            root = root or resolve_dataset_root(quickstart.data)
            crop = crop or max(quickstart.data.crop_size)
        args.root = root
        print(f"{root} ({args.split}), crop {crop} px")
        print("\n".join(thing_size_stats(root, args.split, crop).lines()))
        if args.plot:
            print(f"wrote {plot_size_histogram(args.root, args.split, args.plot)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
