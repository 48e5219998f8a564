"""``python -m cabb_ray.evaluate``: panoptic metrics of COCO-panoptic predictions.

    python -m cabb_ray.evaluate --gt-json val.json --gt-folder val/ \
        --pred-json pred.json --pred-folder pred/ [--out results.json] [--no-mask-ap]

Prints a per-class table and PQ/SQ/RQ (all, things, stuff), PC, PQ-dagger, mIoU and mask AP
(overall and per instance-size bin); ``--out`` writes the same as JSON (NaN as null).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from cabb_ray.errors import ArgumentParser, CabbRayError, run_cli
from cabb_ray.progress import progress_printer


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m cabb_ray.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gt-json", required=True, type=Path)
    parser.add_argument("--gt-folder", required=True, type=Path)
    parser.add_argument("--pred-json", required=True, type=Path)
    parser.add_argument("--pred-folder", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="write metrics and per-class rows as JSON")
    parser.add_argument("--no-mask-ap", action="store_true", help="skip COCO mask AP")
    args = parser.parse_args(argv)
    _check_arguments(args)

    from cabb_ray.metrics import evaluate_folders

    start = time.perf_counter()
    result = evaluate_folders(
        args.gt_json,
        args.gt_folder,
        args.pred_json,
        args.pred_folder,
        mask_ap=not args.no_mask_ap,
        progress=progress_printer("evaluated images"),
    )
    print(result.table())
    print(f"{result.images} images in {time.perf_counter() - start:.1f} s")
    if args.out:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(f".{args.out.name}.tmp")  # whole, then renamed over the old
            tmp.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True))
            tmp.replace(args.out)
        except OSError as err:
            raise CabbRayError(f"--out {args.out}: cannot write it ({err.strerror})") from None
        print(f"wrote {args.out}")
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Paths before the (long) evaluation: the inputs exist, and --out can be written."""
    for flag in ("gt_json", "pred_json"):
        path = getattr(args, flag)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "file not found"
            raise CabbRayError(f"--{flag.replace('_', '-')} {path}: {what}")
    for flag in ("gt_folder", "pred_folder"):
        path = getattr(args, flag)
        if not path.is_dir():
            raise CabbRayError(f"--{flag.replace('_', '-')} {path}: folder not found")
    if args.out is not None:
        if args.out.is_dir():
            raise CabbRayError(f"--out {args.out}: is a folder (expected a JSON file path)")
        folder = args.out.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise CabbRayError(f"--out {args.out}: {folder} is not a writable folder")


if __name__ == "__main__":
    run_cli(main)
