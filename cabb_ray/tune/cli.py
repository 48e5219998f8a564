"""``python -m cabb_ray.tune``: a hyper-parameter search on Ray Tune, Optuna and MLflow.

    python -m cabb_ray.tune --space search_spaces/quickstart.yaml [--name NAME] [--resume]
        [--num-samples N] [--no-early-stopping] [--address ADDR] [--storage PATH|s3://...]
        [--mlflow-uri URI] [--experiment NAME] [--set KEY=VALUE ...] [--verbose]

The space file (``search_spaces/README.md``) is validated whole before Ray starts. Each trial
trains one config with Ray Train and is recorded as an MLflow child run of the search's parent
run. ``--resume`` continues an interrupted search (Tune state and Optuna study) to exactly
``num_samples`` trials. At the end the leaderboard is printed and logged, and the best trial's
checkpoint and config are copied to ``<storage>/<name>/best/``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cabb_ray.config import flatten_config
from cabb_ray.errors import ArgumentParser, CabbRayError, check_name
from cabb_ray.tune.driver import STATE_FILE

LOCK_FILE = "driver.lock"
# config keys that say where results go, not what trials train: not in the fingerprint
WHERE_RESULTS_GO = ("run.output_dir", "run.mlflow_uri", "run.experiment", "data.cache_dir")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
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
    parser.add_argument(
        "--no-early-stopping",
        action="store_true",
        help="run every trial to the end (no ASHA), e.g. for `cabb_ray.report --fidelity`",
    )
    parser.add_argument("--address", help="Ray cluster to join ('auto'; default: RAY_ADDRESS)")
    parser.add_argument(
        "--storage",
        help="folder or s3:// URI for results (default: $CABB_RAY_STORAGE, else run.output_dir)",
    )
    parser.add_argument(
        "--mlflow-uri",
        help="tracking URI (default: the search's own when resuming, else $MLFLOW_TRACKING_URI, "
        "else run.mlflow_uri)",
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: space file name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=10, help="leaderboard rows printed")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines")
    return parser.parse_args(argv)


def _search_folder(
    storage: Path, space: Path, name: str | None, resume: bool
) -> tuple[str, Path, dict[str, Any]]:
    """The search's name, local folder and saved state; a new search never reuses a folder
    (created here, atomically: two drivers cannot take one name), a resumed one must belong
    to the same space file."""
    if name is not None:
        check_name("--name", name)
    if name is None and resume:
        candidates = sorted(
            (p for p in storage.glob("*") if _state(p).get("space") == str(space)),
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise CabbRayError(f"--resume: no search of {space} in {storage} (give --name)")
        name = candidates[-1].name
    if not resume:
        return _new_search_folder(storage, space, name)
    folder = storage / name
    state = _state(folder)
    if not state:
        raise CabbRayError(f"--resume --name {name}: no search in {folder}")
    if state.get("space") != str(space):
        raise CabbRayError(
            f"--resume --name {name}: that search ran {state.get('space')}, not {space}"
        )
    return name, folder, state


def _new_search_folder(
    storage: Path, space: Path, name: str | None
) -> tuple[str, Path, dict[str, Any]]:
    """Create the folder of a new search. A default name is the space file's stem, the time
    and a random suffix (two searches started in one second get different names)."""
    storage.mkdir(parents=True, exist_ok=True)
    if name is None:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", space.stem)  # names go into MLflow filters
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    folder = storage / name
    try:
        folder.mkdir()
    except FileExistsError:
        raise CabbRayError(
            f"--name {name}: {folder} already holds a search; --resume continues it, "
            "another --name starts a new one"
        ) from None
    return name, folder, {}


def _state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _driver_lock(folder: Path, name: str):
    """Hold the search folder's lock while this driver runs: a second driver of the same
    search (two ``--resume`` at once) is refused in one line."""
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise CabbRayError(
                f"search {name}: {folder} is being run by another driver ({owner}); wait for "
                "it to end or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


def _check_same_search(name: str, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """A resume must run the configuration the search started with: the restored searcher
    samples the old space, so an edited space file, ``fixed:`` or a new ``--set`` would mix
    two searches in one study."""
    if "space_sha256" not in state:  # saved before fingerprints existed: nothing to compare
        return
    if state["space_sha256"] != fingerprint["space_sha256"]:
        raise CabbRayError(
            f"--resume --name {name}: the space file {state.get('space')} changed since the "
            "search started (its searched ranges would no longer match the study); restore it, "
            "or start a new search"
        )
    saved, now = state.get("config", {}), fingerprint["config"]
    # keys that a newer or older version lacks are not compared (an upgrade may resume)
    differs = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
    if differs:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in differs[:4])
        more = f" and {len(differs) - 4} more" if len(differs) > 4 else ""
        raise CabbRayError(
            f"--resume --name {name}: the configuration differs from the one the search "
            f"started with: {shown}{more}; resume with the same --set values and files"
        )


def _same_uri(given: str, saved: str) -> bool:
    from cabb_ray.tracking import resolve_tracking_uri

    return resolve_tracking_uri(given).rstrip("/") == saved.rstrip("/")


def search_fingerprint(spec) -> dict[str, Any]:
    """What a resume must find unchanged: the space file's text and the resolved config
    (base, ``fixed:``, ``--set``) as plain values."""
    config = {
        k: _plain(v)
        for k, v in flatten_config(spec.config).items()
        if k not in WHERE_RESULTS_GO  # checked on their own: the folder, --mlflow-uri
    }
    return {"space_sha256": hashlib.sha256(spec.text.encode()).hexdigest(), "config": config}


def _plain(value: Any) -> Any:
    """JSON's view of a config value (tuples become lists), so saved and new ones compare."""
    return json.loads(json.dumps(value))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from cabb_ray.tune.space import load_space

    overrides = list(args.set)
    storage = args.storage or os.environ.get("CABB_RAY_STORAGE")  # set on cluster nodes
    if storage:
        overrides.append(f"run.output_dir={storage}")
    spec = load_space(args.space, overrides)
    if args.num_samples is not None:
        spec.set_num_samples(args.num_samples, "--num-samples")
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    cfg = spec.config  # load_space built it with the same overrides
    experiment = args.experiment or spec.path.stem

    from cabb_ray.training.ray_env import check_fits_locally, on_cluster, worker_resources

    resources = worker_resources(cfg, share=spec.max_concurrent_trials)
    if not on_cluster():
        check_fits_locally(
            spec.max_concurrent_trials * (resources.cpus + spec.resources.driver_cpus),
            spec.max_concurrent_trials * resources.gpus,
            f"{spec.max_concurrent_trials} concurrent trial(s) of {resources.workers} worker(s) "
            f"x {resources.cpus_per_worker:g} CPUs + {spec.resources.driver_cpus:g} for the trial "
            "driver",
        )
    # With s3:// storage, Tune and Train write there; the search's own files (state, Optuna
    # study, leaderboard, best/) stay in ./runs/<name> on the machine that runs this command.
    storage_text = cfg.run.output_dir
    remote_storage = "://" in storage_text
    local_storage = Path("runs" if remote_storage else storage_text).expanduser().resolve()
    space_path = spec.path.resolve()
    fingerprint = search_fingerprint(spec)
    storage_existed = local_storage.exists()
    name, folder, state = _search_folder(local_storage, space_path, args.name, args.resume)
    try:
        with _driver_lock(folder, name):
            return _drive(args, spec, cfg, experiment, resources, name, folder, state, fingerprint)
    except KeyboardInterrupt:  # Ctrl-C outside tuner.fit (start-up, results): saved state stays
        if not (folder / STATE_FILE).exists():
            print(
                f"search {name} interrupted before it started; nothing to resume", file=sys.stderr
            )
            return 130
        print(
            f"search {name} interrupted; continue it with: python -m cabb_ray.tune --space "
            f"{args.space} --name {name} --resume",
            file=sys.stderr,
        )
        return 130
    finally:
        _drop_if_unstarted(folder, remove_parent=not storage_existed)


def _drop_if_unstarted(folder: Path, remove_parent: bool = False) -> None:
    """A new search that failed before writing its state leaves no folder behind (its name
    stays usable), nor the storage folder created for it."""
    if folder.is_dir() and not (folder / STATE_FILE).exists():
        leftovers = [p for p in folder.iterdir() if p.name != LOCK_FILE]
        if not leftovers:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()
            if remove_parent and not any(folder.parent.iterdir()):
                folder.parent.rmdir()


def _drive(args, spec, cfg, experiment, resources, name, folder, state, fingerprint) -> int:
    """The search once its folder is held: resume checks, MLflow, the run and its results."""
    from cabb_ray.train import prepare

    storage_text = cfg.run.output_dir
    remote_storage = "://" in storage_text
    local_storage = folder.parent
    if state:
        _check_same_search(name, state, fingerprint)
        started_with = state.get("num_samples", spec.num_samples)
        if args.num_samples is not None and args.num_samples != started_with:
            raise CabbRayError(
                f"--num-samples {args.num_samples}: search {name} was started with "
                f"{started_with} trials, which a resume keeps"
            )
        spec.num_samples = started_with
        if state.get("scheduler") == "none":
            args.no_early_stopping = True  # a resume keeps what the search started with
        elif args.no_early_stopping and spec.scheduler is not None:
            raise CabbRayError(
                f"--no-early-stopping: search {name} was started with early stopping, which a "
                "resume keeps"
            )
    if args.no_early_stopping:
        spec.scheduler = None
    saved_uri = state.get("mlflow_uri")
    if args.mlflow_uri and saved_uri and not _same_uri(args.mlflow_uri, saved_uri):
        raise CabbRayError(
            f"--mlflow-uri {args.mlflow_uri}: search {name} records its runs at {saved_uri}; "
            "resume without --mlflow-uri (or with that one)"
        )
    uri = args.mlflow_uri or saved_uri or os.environ.get("MLFLOW_TRACKING_URI")
    cfg, uri, root = prepare(cfg, uri, experiment)

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
        fingerprint=fingerprint,
    )
    if state and search.finished(state):
        print(f"search {name} already finished ({spec.num_samples} trials); nothing to resume")
        search.print_summary(args.top)
        return 0
    search.start(state)
    complete = False
    try:
        complete = search.run(bool(state))
    finally:  # whatever happened, no run is left RUNNING
        search.finish(complete, args.top)
    if not complete:
        print(
            f"search {name} interrupted; continue it with: python -m cabb_ray.tune --space "
            f"{args.space} --name {name} --resume",
            file=sys.stderr,
        )
        return 130
    return 0
