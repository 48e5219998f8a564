"""One search trial: a Tune function trainable that trains its config.

The trial applies its sampled values to the typed base config (an invalid combination ends
the trial at once, with the reason, before any training starts) and opens its MLflow child run
(the same one again when Tune restarts or resumes the trial, found by the trial-id tag). A
one-worker trial then runs the training loop in its own process (``TuneTrialSession``: each
epoch a ``ray.tune.report`` with a checkpoint; a restarted trial continues from
``ray.tune.get_checkpoint()``). A trial of several workers fits a ``TorchTrainer`` whose run
name is the trial id, so that a restarted trial continues from Train's last checkpoint, and
``TuneReportCallback`` forwards rank 0's reports. Both run the same loop. The driver's
``ChildRunCallback`` gives every child run its final status.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from cabb_ray.config import config_from_dict, config_to_dict
from cabb_ray.errors import CabbRayError
from cabb_ray.tracking_relay import needs_relay, worker_tracking_uri
from cabb_ray.training.loop import LoopArgs, failure_report, train_loop
from cabb_ray.training.ray_env import WorkerResources, on_cluster
from cabb_ray.training.sessions import TuneTrialSession, local_device
from cabb_ray.tune.tags import (
    ERROR_KEY,
    INVALID_KEY,
    TAG_SAMPLED,
    TAG_SEARCH,
    TAG_TRIAL,
    TAG_VARIANT,
    children_filter,
)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one search shares (plain values: it travels to trial actors)."""

    search: str
    base_config: dict[str, Any]
    metric_names: tuple[str, ...]
    uri: str
    experiment: str
    parent_run_id: str
    root: str
    train_storage: str
    eval_epochs: tuple[int, ...]
    last_epoch: int  # where every trial ends: optim.epochs, or ASHA's max_t
    resources: WorkerResources
    verbose: bool = False
    fault: dict[str, Any] | None = None  # test hook, see cabb_ray.training.loop._maybe_die
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # one worker trains in the trial's own process; see in_process_trials
    in_process: bool = True
    # the search's (first) objective: each trial keeps its best epoch by it as best/
    objective: str = "pq"
    objective_mode: str = "max"


def in_process_trials(resources: WorkerResources, uri: str) -> bool:
    """Whether trials train in their own Tune process: one worker, and a tracking store that
    the node running the trial reaches. On a cluster whose MLflow only the head reaches
    (cluster/*.yaml: a server on the head's loopback), the trial's process stays on the head
    and its one worker runs under Ray Train on a GPU node, where MLflow goes through the relay.
    """
    return resources.workers == 1 and not (on_cluster() and needs_relay(uri))


def find_child_run(uri: str, experiment_id: str, search: str, trial_id: str) -> str | None:
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs(
        [experiment_id], filter_string=children_filter(search, trial_id), max_results=1
    )
    return runs[0].info.run_id if runs else None


def open_child_run(
    setup: TrialSetup, trial_id: str, name: str, config: dict[str, Any], cfg=None
) -> str:
    """The trial's MLflow child run: the existing one when Tune restarts or resumes the trial
    (no duplicates), otherwise a new one with the trial's config (the base config when the
    sampled values are invalid)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from cabb_ray.tracking import RunLogger, experiment_id, start_run
    from cabb_ray.tune.sampling import sampled_values, trial_config

    found = find_child_run(
        setup.uri, experiment_id(setup.uri, setup.experiment), setup.search, trial_id
    )
    if found is not None:
        RunLogger(setup.uri, found).reopen()
        return found
    if cfg is None:  # the driver's callback, for a trial that never opened its run
        base = config_from_dict(setup.base_config)
        try:
            cfg = trial_config(base, config, setup.variants)
        except CabbRayError:
            cfg = base
    tags = {
        MLFLOW_PARENT_RUN_ID: setup.parent_run_id,
        TAG_SEARCH: setup.search,
        TAG_TRIAL: trial_id,
        TAG_SAMPLED: json.dumps(sampled_values(config), sort_keys=True),
        "cabb_ray.workers": str(setup.resources.workers),
        "cabb_ray.cpus": f"{setup.resources.cpus:g}",
        "cabb_ray.gpus": f"{setup.resources.gpus:g}",
    }
    variant = sampled_values(config).get("variant")
    if variant is not None:
        tags[TAG_VARIANT] = str(variant)
    return start_run(cfg, setup.uri, setup.experiment, run_name=name, tags=tags)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable (bound to ``setup`` with ``tune.with_parameters``)."""
    import ray.tune

    from cabb_ray.tune.sampling import trial_config

    started_at = time.time()
    context = ray.tune.get_context()
    trial_id, name = context.get_trial_id(), context.get_trial_name()
    try:
        cfg = trial_config(config_from_dict(setup.base_config), config, setup.variants)
    except CabbRayError as err:
        _report_invalid(setup, trial_id, name, config, str(err))
        return
    run_id = open_child_run(setup, trial_id, name, config, cfg)
    args = LoopArgs(
        config=config_to_dict(cfg),
        root=setup.root,
        run_id=run_id,
        mlflow_uri=setup.uri,
        fault=setup.fault,
        eval_epochs=setup.eval_epochs,
        verbose=setup.verbose,
        started_at=started_at,
        objective=setup.objective,
        objective_mode=setup.objective_mode,
    )
    if setup.in_process:  # the trial holds the worker's CPUs
        args.threads = max(1, int(setup.resources.cpus))
        try:
            train_loop(args, TuneTrialSession(local_device(setup.resources.gpus > 0)))
        except CabbRayError as err:  # bad data, divergence: a restart would fail the same way
            report_trial_error(setup.metric_names, str(err), name)
        return
    # several workers: DDP under Ray Train; its import (~2 s) only for such trials
    from ray.tune.integration.ray_train import TuneReportCallback

    from cabb_ray.training.ray_train import build_trainer

    args.mlflow_uri = worker_tracking_uri(
        setup.uri, on_cluster()
    )  # a relay where workers cannot reach it
    trainer = build_trainer(
        cfg,
        args,
        trial_id,
        setup.resources,
        setup.train_storage,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def report_trial_error(metric_names: tuple[str, ...], reason: str, name: str) -> None:
    """End a trial that raised a ``CabbRayError`` without Tune's retries: its last report
    carries the reason (the trial ends normally; the callback records it as failed)."""
    import ray.tune

    print(f"trial {name} failed, not retried: {reason}", flush=True)
    ray.tune.report(failure_report(metric_names, ERROR_KEY, reason[:4000]))


def _report_invalid(setup: TrialSetup, trial_id, name, config, reason: str) -> None:
    """End an invalid trial at once: its child run records the reason, and Tune gets one
    report with every metric NaN (the searcher marks the Optuna trial failed)."""
    import ray.tune

    from cabb_ray.tracking import RunLogger

    print(f"trial {name}: invalid config, not trained: {reason}", flush=True)
    run_id = open_child_run(setup, trial_id, name, config)
    RunLogger(setup.uri, run_id).tags({"cabb_ray.invalid_reason": reason[:4000]})
    ray.tune.report(
        {**failure_report(setup.metric_names, INVALID_KEY, reason), "epoch": 0, "step": 0}
    )
