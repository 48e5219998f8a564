"""``python -m cabb_ray.report``: reports on a finished search, read from MLflow.

    python -m cabb_ray.report --experiment ablation [--search NAME] [--out DIR]
    python -m cabb_ray.report --fidelity --experiment quickstart [--search NAME] [--tau 0.6]

Without ``--fidelity``: the ablation's Table 1 (``ablation.md``, ``ablation.csv``), Fig. 5
(``size_bins.png`` with its numbers in ``size_bins.csv``) and the paper's comparisons per size
bin in units of seed std (``comparisons.md``, ``comparisons.csv``). With ``--fidelity``:
Kendall tau of each epoch's PQ against the final PQ (``fidelity.csv``, ``fidelity.png``) and
from which epoch rankings can be trusted. Files go to ``--out`` (default
``runs/<search>/report``) and are logged to the search's MLflow parent run under ``report/``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from cabb_ray.errors import ArgumentParser, CabbRayError, check_name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m cabb_ray.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the search")
    parser.add_argument("--search", help="search name (default: the experiment's newest)")
    parser.add_argument(
        "--mlflow-uri",
        help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--out", help="output folder (default: runs/<search>/report)")
    parser.add_argument("--fidelity", action="store_true", help="early-stopping fidelity check")
    parser.add_argument(
        "--tau", type=float, default=0.6, help="Kendall tau taken as trustworthy (--fidelity)"
    )
    parser.add_argument("--no-mlflow-log", action="store_true", help="only write files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.search is not None:  # it goes into an MLflow filter string: no quotes
        check_name("--search", args.search)
    if not -1.0 <= args.tau <= 1.0:
        raise CabbRayError(f"--tau {args.tau}: expected a value in -1..1")
    from cabb_ray.report.source import load_search, skipped_line
    from cabb_ray.tracking import RunLogger, resolve_tracking_uri

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise CabbRayError(f"--mlflow-uri {uri}: no such database file")
    record = load_search(uri, args.experiment, args.search)
    out = Path(args.out or Path("runs") / record.name / "report")
    out.mkdir(parents=True, exist_ok=True)
    print(f"search {record.name}: {len(record.trials)} finished trial(s)")
    if line := skipped_line(record):
        print(line)
    written = _fidelity(record, out, args.tau) if args.fidelity else _ablation(record, out)
    if not args.no_mlflow_log:
        parent = RunLogger(uri, record.parent_run_id)
        for path in written:
            parent.artifact(path, "report")
        print(f"logged to MLflow parent run {record.parent_run_id} under report/")
    for path in written:
        print(f"wrote {path}")
    return 0


def _ablation(record, out: Path) -> list[Path]:
    from cabb_ray.report.ablation import (
        ablation_table,
        comparison_markdown,
        comparison_table,
        markdown,
        size_bin_table,
    )
    from cabb_ray.viz import size_bin_plot

    table = ablation_table(record)
    text = markdown(table, f"Ablation {record.name}")
    print(text)
    paths = [out / "ablation.md", out / "ablation.csv", out / "size_bins.csv"]
    paths[0].write_text(text)
    table.to_csv(paths[1], index=False)
    bins = size_bin_table(record)
    bins.to_csv(paths[2], index=False)
    comparisons = comparison_table(record)
    if not comparisons.empty:
        compared = comparison_markdown(comparisons)
        print(compared)
        paths += [out / "comparisons.md", out / "comparisons.csv"]
        paths[-2].write_text(compared)
        comparisons.to_csv(paths[-1], index=False)
    paths.append(size_bin_plot(bins, out / "size_bins.png", f"AP by instance size, {record.name}"))
    return paths


def _fidelity(record, out: Path, threshold: float) -> list[Path]:
    from cabb_ray.report.fidelity import fidelity_table, verdict
    from cabb_ray.viz import fidelity_plot

    table = fidelity_table(record)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(verdict(table, threshold))
    paths = [out / "fidelity.csv"]
    table.to_csv(paths[0], index=False)
    title = f"early-stopping fidelity, {record.name}"
    paths.append(fidelity_plot(table, threshold, out / "fidelity.png", title))
    return paths
