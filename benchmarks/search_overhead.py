"""What a search costs beyond training: share of wall time inside training steps, trial
start-up (from the trial function's start to its first training step) and the gap between
trials (from one trial's MLflow run closing to the next trial's first training step).

    python benchmarks/search_overhead.py [--trials 3] [--space search_spaces/quickstart.yaml]
        [--reuse both|on|off] [--set KEY=VALUE ...]

Runs a small real search (the quickstart space, fewer trials, in a temporary folder) with the
dataset generated beforehand, then reads each trial's MLflow child run: ``time/train_s``
(seconds inside ``train_step``, summed over restarts), ``time/startup_s``, the timestamp of
that first-step metric and the run's end time. ``--reuse both`` runs the search twice, with
Tune's ``reuse_actors`` on and off, side by side. Targets on 2 cores: share >= 0.85, gap
between trials <= 5 s (medians over trials).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gaps_between_trials(client, runs) -> list[float]:
    """Seconds from each trial's MLflow run closing to the next trial's first training step
    (the timestamp of its ``time/startup_s`` metric), trials in the order they started."""
    ordered = sorted(runs, key=lambda r: r.info.start_time)
    gaps = []
    for before, after in itertools.pairwise(ordered):
        first_step = after.data.metrics.get("time/startup_s")
        if first_step is None or before.info.end_time is None:
            continue
        stamp = client.get_metric_history(after.info.run_id, "time/startup_s")[0].timestamp
        gaps.append((stamp - before.info.end_time) / 1000)
    return gaps


def one_search(space: str, trials: int, overrides: list[str], reuse: bool) -> dict:
    from mlflow.tracking import MlflowClient

    import cabb_ray.tune.driver
    from cabb_ray.tune.cli import main as tune_main

    cabb_ray.tune.driver.REUSE_ACTORS = reuse  # read when the Tuner is built
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        argv = ["--space", space, "--name", "bench", "--num-samples", str(trials)]
        argv += ["--storage", str(folder / "runs"), "--mlflow-uri", uri]
        argv += [item for text in overrides for item in ("--set", text)]
        start = time.perf_counter()
        code = tune_main(argv)
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"search failed with exit code {code}")
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(Path(space).stem)
        runs = [
            r
            for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in r.data.tags
        ]
        gaps = gaps_between_trials(client, runs)
    return {
        "wall": wall,
        "train": sum(r.data.metrics.get("time/train_s", 0.0) for r in runs),
        "startups": [
            r.data.metrics["time/startup_s"] for r in runs if "time/startup_s" in r.data.metrics
        ],
        "gaps": gaps,
        "epochs": [int(r.data.metrics.get("epoch", 0)) for r in runs],
        "launchers": sorted({r.data.tags.get("cabb_ray.launcher", "?") for r in runs}),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "quickstart.yaml"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--reuse", choices=("both", "on", "off"), default="on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from cabb_ray.data.resolve import resolve_dataset_root
    from cabb_ray.tune.space import load_space

    resolve_dataset_root(load_space(args.space).base_config(args.set).data)  # not timed
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.reuse]
    for reuse in modes:
        r = one_search(args.space, args.trials, args.set, reuse)
        share = r["train"] / r["wall"]
        print(
            f"\nreuse_actors={reuse}: {len(r['epochs'])} trials ({', '.join(r['launchers'])}; "
            f"epochs {r['epochs']}), wall {r['wall']:.1f} s"
        )
        print(f"  inside training steps: {r['train']:.1f} s -> share {share:.3f} (target >= 0.85)")
        print(
            f"  trial start-up to first step: median {_median(r['startups']):.1f} s "
            f"{[round(s, 1) for s in r['startups']]}"
        )
        print(
            f"  one trial's end to the next one's first step: median {_median(r['gaps']):.1f} s "
            f"{[round(s, 1) for s in r['gaps']]} (target <= 5 s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
