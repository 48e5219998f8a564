"""One search trial: a Tune function trainable that runs a Ray Train run for its config.

The trial applies its sampled values to the typed base config (an invalid combination ends
the trial at once, with the reason, before any worker starts), opens its MLflow child run
(the same one again when Tune restarts or resumes the trial, found by the trial-id tag) and
fits a ``TorchTrainer`` whose run name is the trial id, so that a restarted trial continues
from Train's last checkpoint. ``TuneReportCallback`` forwards rank 0's reports to Tune.
The driver's ``ChildRunCallback`` gives every child run its final status.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from cabb_ray.config import config_from_dict
from cabb_ray.errors import CabbRayError
from cabb_ray.launch import WorkerResources
from cabb_ray.train import REPORT_FIRST

TAG_SEARCH = "cabb_ray.search"  # on the parent and every child: the search's name
TAG_TRIAL = "cabb_ray.trial_id"
TAG_OUTCOME = "cabb_ray.outcome"  # finished | early_stopped | failed | invalid | interrupted
TAG_SAMPLED = "cabb_ray.sampled"  # JSON of the searched values
TAG_BEST = "cabb_ray.best"
TAG_VARIANT = "cabb_ray.variant"  # an ablation row's name (space files with variants:)
INVALID_KEY = "invalid_config"


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
    fault: dict[str, Any] | None = None  # test hook, see cabb_ray.train._maybe_die
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


def children_filter(search: str, trial_id: str | None = None) -> str:
    """MLflow filter for a search's child runs (names are checked to hold no quotes)."""
    trial = f"= '{trial_id}'" if trial_id else "!= ''"
    return f"tags.`{TAG_SEARCH}` = '{search}' and tags.`{TAG_TRIAL}` {trial}"


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
    from cabb_ray.tracking import RunLogger, experiment_id, start_run
    from cabb_ray.tune.space import sampled_values, trial_config

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
        "mlflow.parentRunId": setup.parent_run_id,
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
    from ray.tune.integration.ray_train import TuneReportCallback

    from cabb_ray.launch import build_trainer
    from cabb_ray.tune.space import trial_config

    started_at = time.time()
    context = ray.tune.get_context()
    trial_id, name = context.get_trial_id(), context.get_trial_name()
    try:
        cfg = trial_config(config_from_dict(setup.base_config), config, setup.variants)
    except CabbRayError as err:
        _report_invalid(setup, trial_id, name, config, str(err))
        return
    run_id = open_child_run(setup, trial_id, name, config, cfg)
    trainer = build_trainer(
        cfg,
        setup.uri,
        setup.root,
        run_id,
        trial_id,
        setup.resources,
        setup.train_storage,
        eval_epochs=list(setup.eval_epochs),
        callbacks=[TuneReportCallback()],
        fault=setup.fault,
        verbose=setup.verbose,
        started_at=started_at,
    )
    trainer.fit()


def _report_invalid(setup: TrialSetup, trial_id, name, config, reason: str) -> None:
    """End an invalid trial at once: its child run records the reason, and Tune gets one
    report with every metric NaN (the searcher marks the Optuna trial failed)."""
    import ray.tune

    from cabb_ray.tracking import RunLogger

    print(f"trial {name}: invalid config, not trained: {reason}", flush=True)
    run_id = open_child_run(setup, trial_id, name, config)
    RunLogger(setup.uri, run_id).tags({"cabb_ray.invalid_reason": reason[:4000]})
    ray.tune.report(
        {
            **{metric: math.nan for metric in REPORT_FIRST},  # Tune's table shows these first
            **{metric: math.nan for metric in setup.metric_names},
            "epoch": 0,
            "step": 0,
            "best_pq": math.nan,
            INVALID_KEY: reason,
        }
    )
