"""Seconds per 1024x2048 image: cabb_ray's evaluator vs cityscapesscripts' pq_compute.

    python benchmarks/metrics.py [--images 8] [--height 1024 --width 2048]

Writes synthetic ground truth and randomised predictions (shifted, split, relabelled segments,
false positives, void) to a temporary folder, then times on the same files, one process each:

* reference: cityscapesscripts ``pq_compute_single_core`` (PQ/SQ/RQ only, reads the PNGs);
* ours, files: ``evaluate_folders`` without mask AP (PQ/SQ/RQ + PC + mIoU + PQ-dagger);
* ours, files + mask AP;
* ours, in memory: ``PanopticEvaluator.update`` on decoded id maps, the path training uses
  every epoch (predictions come from the model, not from PNGs).

Each figure is the fastest of 3 runs after a warm-up run (the first call pays one-off
start-up costs of torch's thread pool and torchvision's image module).

It checks that the per-class PQ/SQ/RQ agree to 1e-12 and prints the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fake_predictions

from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as reference

from cabb_ray.data.panoptic_format import read_ids
from cabb_ray.data.synthetic import write_synthetic_split
from cabb_ray.metrics import PanopticEvaluator, evaluate_folders
from tests.fake_predictions import write_fake_predictions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_split(
            root, "val", args.images, seed=3, height=args.height, width=args.width
        )
        pred_json, pred_folder = write_fake_predictions(root, "val", root / "out", seed=1)
        gt = json.loads((root / "val.json").read_text())
        pred = {a["image_id"]: a for a in json.loads(pred_json.read_text())["annotations"]}
        categories = {c["id"]: c for c in gt["categories"]}
        pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
        n = len(pairs)

        def best_of(run, repeats: int = 3) -> float:
            """Seconds per image: the fastest of a few runs, after one warm-up run."""
            run()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) / n)
            return min(times)

        def run_reference():
            with contextlib.redirect_stdout(io.StringIO()):
                return reference.pq_compute_single_core(
                    0, pairs, str(root / "val"), str(pred_folder), categories
                )

        stat = run_reference()
        expected = reference.average_pq(stat, categories)
        t_ref = best_of(run_reference)

        def run_files(mask_ap: bool):
            return evaluate_folders(
                root / "val.json", root / "val", pred_json, pred_folder, mask_ap=mask_ap
            )

        ours = run_files(False)
        t_files = best_of(lambda: run_files(False))
        t_files_ap = best_of(lambda: run_files(True))

        decoded = [
            (
                a["image_id"],
                read_ids(root / "val" / a["file_name"]),
                a["segments_info"],
                read_ids(pred_folder / p["file_name"]),
                p["segments_info"],
            )
            for a, p in pairs
        ]

        def run_memory():
            evaluator = PanopticEvaluator(gt["categories"], mask_ap=False)
            for item in decoded:
                evaluator.update(*item)
            return evaluator.compute()

        t_memory = best_of(run_memory)

        worst = max(
            abs(row[k] - expected["per_class"][row["id"]][k])
            for row in ours.per_class
            if stat[row["id"]].tp + stat[row["id"]].fp + stat[row["id"]].fn
            for k in ("pq", "sq", "rq")
        )
        print(
            f"{n} images of {args.width}x{args.height}; identical numbers: worst per-class "
            f"PQ/SQ/RQ difference {worst:.1e}; PQ ours {ours.metrics['pq']:.6f} vs "
            f"reference {expected['All']['pq']:.6f}"
        )
        print(f"{'evaluator':44s} {'s/image':>8s} {'speed-up':>9s}")
        rows = [
            ("cityscapesscripts pq_compute (files, PQ only)", t_ref),
            ("cabb_ray, files (PQ, PC, mIoU, PQ-dagger)", t_files),
            ("cabb_ray, files + mask AP", t_files_ap),
            ("cabb_ray, in memory (training path, no AP)", t_memory),
        ]
        for name, seconds in rows:
            print(f"{name:44s} {seconds:8.4f} {t_ref / seconds:8.1f}x")


if __name__ == "__main__":
    main()
