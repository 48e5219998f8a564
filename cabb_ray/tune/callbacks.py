"""Driver-side hooks: final status and cost of each child run, our console lines, and the
Optuna searcher's handling of invalid trials."""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from cabb_ray.tune.tags import ERROR_KEY, INVALID_KEY, TAG_OUTCOME
from cabb_ray.tune.trial import TrialSetup, open_child_run


class ChildRunCallback(Callback):
    """Ends each trial's MLflow child run with the status that matches how the trial ended
    (no run is left RUNNING), records its cost, and prints one line per trial start/end."""

    def __init__(self, setup: TrialSetup):
        self.trial_setup = setup
        self.started: dict[str, float] = {}

    # -- Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("evaluated"):
            print(
                f"trial {trial.trial_id} epoch {result.get('epoch')}: pq {result.get('pq', 0):.4f} "
                f"pq_th {result.get('pq_th', 0):.4f} pc {result.get('pc', 0):.4f}",
                flush=True,
            )

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        epoch = int(result.get("epoch", 0) or 0)
        if INVALID_KEY in result:
            self._close(trial, "FAILED", "invalid", result)
        elif ERROR_KEY in result:
            self._close(trial, "FAILED", "failed", result)
        elif epoch < self._last_epoch(trial):
            # FINISHED, as Ray's MLflowLoggerCallback ends trials its scheduler stops: the run
            # did what the search asked of it (the UI draws KILLED as a failure)
            self._close(trial, "FINISHED", "early_stopped", result)
        else:
            self._close(trial, "FINISHED", "finished", result)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._close(trial, "FAILED", "failed", trial.last_result or {})

    # -- helpers
    def _last_epoch(self, trial) -> int:
        """Where this trial ends when not stopped early (optim.epochs may be searched)."""
        own = trial.config.get("optim.epochs")
        last = self.trial_setup.last_epoch
        return min(last, own) if isinstance(own, int) else last

    def _close(self, trial, status: str, outcome: str, result: dict[str, Any]) -> None:
        from cabb_ray.tracking import RunLogger, with_retries

        wall = float(
            result.get("time_total_s")
            or time.time() - self.started.get(trial.trial_id, time.time())
        )
        epoch = int(result.get("epoch", 0) or 0)
        stopped_early = outcome == "early_stopped"
        cost = trial_cost(
            wall,
            self.trial_setup.resources,
            epoch,
            self._last_epoch(trial) if stopped_early else epoch,
        )
        pq = result.get("pq", math.nan)
        where = f"at epoch {result['epoch']}" if "epoch" in result else ""
        print(
            f"trial {trial.trial_id} {outcome.replace('_', ' ')} {where}: pq {pq:.4f}, "
            f"{wall / 60:.1f} min",
            flush=True,
        )
        # a trial that failed before it opened its run still gets one, with the reason;
        # retried: with sqlite and concurrent trials a locked database must not turn a
        # finished trial into a failed one
        opened, run_id = with_retries(
            f"the MLflow run of trial {trial.trial_id}",
            open_child_run,
            self.trial_setup,
            trial.trial_id,
            str(trial),
            trial.config,
        )
        if not opened:
            return
        logger = RunLogger(self.trial_setup.uri, run_id)
        if trial.error_file and outcome == "failed":
            logger.tags({"cabb_ray.error_file": trial.error_file})
        if ERROR_KEY in result:
            logger.tags({"cabb_ray.error": str(result[ERROR_KEY])[:4000]})
        logger.metrics(cost, int(result.get("step", 0) or 0))
        logger.tags({TAG_OUTCOME: outcome})
        logger.finish(status)


def trial_cost(wall_s: float, resources, epochs: int, max_epochs: int) -> dict[str, float]:
    """Wall time, device-hours (GPU-hours on GPUs, CPU-core-hours otherwise) and the
    device-hours this trial would still have needed to reach the last epoch."""
    per_hour = resources.gpus if resources.gpus else resources.cpus
    hours = wall_s / 3600 * per_hour
    remaining = hours / epochs * (max_epochs - epochs) if epochs else 0.0
    return {
        "cost/wall_s": wall_s,
        "cost/device_hours": hours,
        "cost/saved_device_hours": max(0.0, remaining),
    }


class CabbOptunaSearch(OptunaSearch):
    """OptunaSearch that marks trials with an invalid config, or that failed without a
    retry, as FAIL in the study (their NaN metrics would otherwise be refused and leave the
    Optuna trial RUNNING)."""

    def restore(self, checkpoint_path: str) -> None:
        """After a resume: study trials still RUNNING that the restored searcher does not know
        were asked for after Tune's last save (the driver was killed in between). They are
        marked FAIL (no trial stays RUNNING forever) and their points queued again, which
        the trial Tune starts in their place takes."""
        super().restore(checkpoint_path)
        fail_orphan_trials(self._ot_study, {trial.number for trial in self._ot_trials.values()})

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if INVALID_KEY not in result and ERROR_KEY not in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and (INVALID_KEY in result or ERROR_KEY in result):
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def fail_orphan_trials(study, known: set[int]) -> None:
    """Study trials still RUNNING that no Tune trial owns (asked for after Tune's last saved
    state): FAIL, and their points queued again for the trials Tune starts in their place (a
    grid, an ablation's rows, would otherwise count the point as visited and lose it)."""
    import optuna

    for frozen in study.get_trials(deepcopy=False):
        if frozen.state == optuna.trial.TrialState.RUNNING and frozen.number not in known:
            study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(frozen.params, skip_if_exists=False)
            print(
                f"Optuna trial {frozen.number}: started after the search's last saved state; "
                "failed, and its point queued again"
            )
