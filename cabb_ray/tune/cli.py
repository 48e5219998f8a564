"""``python -m cabb_ray.tune``: a hyper-parameter search on Ray Tune, Optuna and MLflow.

    python -m cabb_ray.tune --space search_spaces/quickstart.yaml [--name NAME] [--resume]
        [--num-samples N] [--address ADDR] [--storage PATH] [--mlflow-uri URI]
        [--experiment NAME] [--set KEY=VALUE ...] [--verbose]

The space file (``search_spaces/README.md``) is validated whole before Ray starts. Each trial
trains one config with Ray Train and is recorded as an MLflow child run of the search's parent
run. ``--resume`` continues an interrupted search (Tune state and Optuna study) to exactly
``num_samples`` trials. At the end the leaderboard is printed and logged, and the best trial's
checkpoint and config are copied to ``<storage>/<name>/best/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cabb_ray.errors import CabbRayError
from cabb_ray.tune.driver import STATE_FILE


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cabb_ray.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--space", required=True, help="search-space YAML file")
    parser.add_argument("--name", help="search name (default: <space file name>-<time>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the search --name (default: the newest one of this space file)",
    )
    parser.add_argument("--num-samples", type=int, help="trials in all (overrides the file)")
    parser.add_argument("--address", help="Ray cluster to join ('auto'; default: RAY_ADDRESS)")
    parser.add_argument("--storage", help="folder or s3:// URI for results (run.output_dir)")
    parser.add_argument("--mlflow-uri", help="tracking URI (run.mlflow_uri)")
    parser.add_argument("--experiment", help="MLflow experiment (default: space file name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=10, help="leaderboard rows printed")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines")
    return parser.parse_args(argv)


def _search_folder(storage: Path, stem: str, name: str | None, resume: bool) -> tuple[str, Path]:
    """The search's name and local folder; a new search never reuses an old folder."""
    if name is None and resume:
        candidates = sorted(
            (p for p in storage.glob(f"{stem}-*") if (p / STATE_FILE).is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise CabbRayError(f"--resume: no search of {stem!r} in {storage} (give --name)")
        name = candidates[-1].name
    name = name or time.strftime(f"{stem}-%Y%m%d-%H%M%S")
    folder = storage / name
    if resume and not (folder / STATE_FILE).is_file():
        raise CabbRayError(f"--resume --name {name}: no search in {folder}")
    if not resume and folder.exists():
        raise CabbRayError(
            f"--name {name}: {folder} already holds a search; --resume continues it, another "
            "--name starts a new one"
        )
    return name, folder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from cabb_ray.tune.space import load_space

    spec = load_space(args.space)
    if args.num_samples is not None:
        if args.num_samples <= 0:
            raise CabbRayError(f"--num-samples: expected a positive number, got {args.num_samples}")
        if spec.searcher == "grid" and args.num_samples > spec.grid_size():
            raise CabbRayError(
                f"--num-samples {args.num_samples}: more than the grid's {spec.grid_size()} points"
            )
        spec.num_samples = args.num_samples
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    overrides = list(args.set)
    if args.storage:
        overrides.append(f"run.output_dir={args.storage}")
    cfg = spec.base_config(overrides)
    stem = spec.path.stem
    experiment = args.experiment or stem

    from cabb_ray.launch import check_fits_locally, on_cluster, worker_resources
    from cabb_ray.train import prepare

    resources = worker_resources(cfg, share=spec.max_concurrent_trials)
    if not on_cluster():
        check_fits_locally(
            spec.max_concurrent_trials * (resources.cpus + spec.resources.driver_cpus),
            spec.max_concurrent_trials * resources.gpus,
            f"{spec.max_concurrent_trials} concurrent trial(s) of {resources.workers} worker(s) "
            f"x {resources.cpus_per_worker:g} CPUs + {spec.resources.driver_cpus:g} for the trial "
            "driver",
        )
    storage_text = cfg.run.output_dir
    remote_storage = "://" in storage_text
    local_storage = Path("runs" if remote_storage else storage_text).expanduser().resolve()
    name, folder = _search_folder(local_storage, stem, args.name, args.resume)
    state = json.loads((folder / STATE_FILE).read_text()) if args.resume else {}
    cfg, uri, root = prepare(cfg, args.mlflow_uri or state.get("mlflow_uri"), experiment)

    from cabb_ray.tune.driver import Search

    search = Search(
        spec=spec,
        cfg=cfg,
        uri=uri,
        root=root,
        name=name,
        folder=folder,
        storage=storage_text if remote_storage else str(local_storage),
        experiment=state.get("experiment", experiment),
        resources=resources,
        verbose=args.verbose,
    )
    if args.resume and search.finished(state):
        print(f"search {name} already finished ({spec.num_samples} trials); nothing to resume")
        search.print_summary(args.top)
        return 0
    search.start(state)
    complete = search.run(args.resume)
    search.finish(complete, args.top)
    if not complete:
        print(
            f"search {name} interrupted; continue it with: python -m cabb_ray.tune --space "
            f"{args.space} --name {name} --resume",
            file=sys.stderr,
        )
        return 130
    return 0
