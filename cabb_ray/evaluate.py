"""``python -m cabb_ray.evaluate``: panoptic metrics of COCO-panoptic predictions.

    python -m cabb_ray.evaluate --gt-json val.json --gt-folder val/ \
        --pred-json pred.json --pred-folder pred/ [--out results.json] [--no-mask-ap]

Prints a per-class table and PQ/SQ/RQ (all, things, stuff), PC, PQ-dagger, mIoU and mask AP
(overall and per instance-size bin); ``--out`` writes the same as JSON (NaN as null).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from cabb_ray.errors import run_cli
from cabb_ray.progress import progress_printer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
