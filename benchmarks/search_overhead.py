"""What a search costs beyond training: share of wall time inside training steps, and trial
start-up (from the trial function's start to its first training step).

    python benchmarks/search_overhead.py [--trials 3] [--space search_spaces/quickstart.yaml]

Runs a small real search (the quickstart space, fewer trials, in a temporary folder) with the
dataset generated beforehand, then reads each trial's MLflow child run: ``time/train_s``
(seconds inside ``train_step``, summed over restarts) and ``time/startup_s``. Targets on
2 cores: share >= 0.75, start-up <= 10 s (median over trials).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "quickstart.yaml"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from cabb_ray.data.resolve import resolve_dataset_root
    from cabb_ray.tune.cli import main as tune_main
    from cabb_ray.tune.space import load_space

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        resolve_dataset_root(load_space(args.space).base_config(args.set).data)  # not timed
        argv = ["--space", args.space, "--name", "bench", "--num-samples", str(args.trials)]
        argv += ["--storage", str(folder / "runs"), "--mlflow-uri", uri]
        argv += [item for text in args.set for item in ("--set", text)]
        start = time.perf_counter()
        code = tune_main(argv)
        wall = time.perf_counter() - start
        if code != 0:
            print(f"search failed with exit code {code}", file=sys.stderr)
            return 1
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(Path(args.space).stem)
        runs = [
            r
            for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in r.data.tags
        ]
        train = sum(r.data.metrics.get("time/train_s", 0.0) for r in runs)
        startups = [
            r.data.metrics["time/startup_s"] for r in runs if "time/startup_s" in r.data.metrics
        ]
        epochs = [int(r.data.metrics.get("epoch", 0)) for r in runs]

    share = train / wall
    startup = statistics.median(startups) if startups else float("nan")
    print(f"\nsearch of {len(runs)} trials (epochs reached {epochs}): wall {wall:.1f} s")
    print(f"inside training steps: {train:.1f} s -> share {share:.3f} (target >= 0.75)")
    print(
        f"trial start-up to first step: median {startup:.1f} s over {len(startups)} trials "
        f"{[round(s, 1) for s in startups]} (target <= 10 s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
