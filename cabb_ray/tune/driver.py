"""The search driver: parent MLflow run, Optuna searcher, ASHA, Tuner (new or restored), and
what happens at the end (leaderboard, Pareto front, cost, best trial)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cabb_ray.config import ExperimentConfig, config_to_dict, flatten_config
from cabb_ray.files import copy_atomic, write_text_atomic
from cabb_ray.training.ray_env import WorkerResources
from cabb_ray.tune.space import METRICS, SearchSpec, searched_keys
from cabb_ray.tune.tags import TAG_BEST, TAG_OUTCOME, TAG_SEARCH
from cabb_ray.tune.trial import TrialSetup, in_process_trials

STATE_FILE = "search.json"
# A trial's process serves the next trial (benchmarks/search_overhead.py --reuse both)
REUSE_ACTORS = True
STATE_SAVE_PERIOD_S = "1"  # Tune's experiment state (TUNE_GLOBAL_CHECKPOINT_S, unless set)


@dataclass
class Search:
    spec: SearchSpec
    cfg: ExperimentConfig
    uri: str
    root: Path
    name: str
    folder: Path
    storage: str
    experiment: str
    resources: WorkerResources
    verbose: bool = False
    parent_run_id: str = ""
    experiment_id: str = ""
    # whether one-worker trials train in their Tune process; a search keeps what it started
    # with (searches saved before this existed ran every trial under Ray Train)
    in_process: bool | None = None
    # the space file's hash and resolved config, which a resume must find unchanged
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from cabb_ray.tracking import experiment_id

        self.experiment_id = experiment_id(self.uri, self.experiment)

    # ------------------------------------------------------------------ state
    def finished(self, state: dict[str, Any]) -> bool:
        from cabb_ray.tracking import RunLogger

        return RunLogger(self.uri, state["parent_run_id"]).status() == "FINISHED"

    def start(self, state: dict[str, Any]) -> None:
        """Create (or, on resume, reopen) the parent run and write the folder's state file."""
        from cabb_ray.tracking import RunLogger, start_run

        if state:
            self.in_process = bool(state.get("in_process", False))
            self.parent_run_id = state["parent_run_id"]
            RunLogger(self.uri, self.parent_run_id).reopen()
            print(f"resuming search {self.name} (MLflow parent run {self.parent_run_id})")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parent_run_id = start_run(
            self.cfg,
            self.uri,
            self.experiment,
            run_name=self.name,
            tags={TAG_SEARCH: self.name, "cabb_ray.kind": "search"},
        )
        parent = RunLogger(self.uri, self.parent_run_id)
        parent.text(self.spec.text, f"space/{self.spec.path.name}")
        parent.tags(
            {
                "search.metric": ",".join(self.spec.metrics),
                "search.mode": ",".join(self.spec.modes),
                "search.searcher": self.spec.searcher,
                "search.num_samples": self.spec.num_samples,
                "search.scheduler": json.dumps(self.spec.scheduler.__dict__)
                if self.spec.scheduler
                else "none",
                "search.space": ", ".join(searched_keys(self.spec)),
                "search.folder": str(self.folder),
                **(
                    {"search.variants": json.dumps(list(self.spec.variants))}
                    if self.spec.variants
                    else {}
                ),
            }
        )
        write_text_atomic(
            self.folder / STATE_FILE,
            json.dumps(
                {
                    "parent_run_id": self.parent_run_id,
                    "mlflow_uri": self.uri,
                    "experiment": self.experiment,
                    "space": str(self.spec.path.resolve()),
                    "num_samples": self.spec.num_samples,
                    "scheduler": "asha" if self.spec.scheduler else "none",
                    "in_process": self._in_process(),
                    **self.fingerprint,
                },
                indent=2,
            ),
        )
        print(
            f"search {self.name}: {self.spec.num_samples} trials, MLflow experiment "
            f"{self.experiment!r} (parent run {self.parent_run_id}) at {self.uri}",
            flush=True,
        )

    # ------------------------------------------------------------------ Tune
    def _in_process(self) -> bool:
        if self.in_process is None:
            self.in_process = in_process_trials(self.resources, self.uri)
        return self.in_process

    def _max_failures(self) -> int:
        """Tune's restarts of a trial. An in-process trial has no Ray Train of its own to
        restart its worker ``run.max_failures`` times first: Tune gets those restarts too."""
        extra = self.cfg.run.max_failures if self._in_process() else 0
        return self.spec.max_failures + extra

    def _setup(self) -> TrialSetup:
        rungs = self.spec.scheduler.rungs() if self.spec.scheduler else []
        return TrialSetup(
            search=self.name,
            base_config=config_to_dict(self.cfg),
            metric_names=tuple(METRICS),
            uri=self.uri,
            experiment=self.experiment,
            parent_run_id=self.parent_run_id,
            root=str(self.root),
            train_storage=f"{self.storage.rstrip('/')}/{self.name}/train",
            eval_epochs=tuple(rungs),
            last_epoch=min(self.spec.scheduler.max_t, self.cfg.optim.epochs)
            if self.spec.scheduler
            else self.cfg.optim.epochs,
            resources=self.resources,
            verbose=self.verbose,
            # test hook: {rank, step, marker}, one Train worker of one trial dies once
            fault=json.loads(os.environ.get("CABB_RAY_TEST_FAULT", "null")),
            variants=self.spec.variants,
            in_process=self._in_process(),
            objective=self.spec.metric,
            objective_mode=self.spec.mode,
        )

    def _searcher(self):
        import optuna

        from cabb_ray.tune.callbacks import CabbOptunaSearch

        spec = self.spec
        samplers = {
            "tpe": lambda: optuna.samplers.TPESampler(seed=spec.seed),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=spec.seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=spec.seed),
            "grid": lambda: optuna.samplers.GridSampler(spec.grid_space(), seed=spec.seed),
        }
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.folder / 'optuna.db'}")
        multi = spec.multi_objective
        return CabbOptunaSearch(
            space=spec.define_by_run(flatten_config(self.cfg)),
            metric=spec.metrics if multi else spec.metric,
            mode=spec.modes if multi else spec.mode,
            sampler=samplers[spec.searcher](),
            study_name=self.name,
            storage=storage,
        )

    def _scheduler(self):
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        sched = self.spec.scheduler
        if sched is None:
            return FIFOScheduler()
        return ASHAScheduler(
            time_attr="epoch",
            metric=self.spec.metric,
            mode=self.spec.mode,
            max_t=sched.max_t,
            grace_period=sched.grace_period,
            reduction_factor=sched.reduction_factor,
        )

    def _trainable(self):
        from ray import tune

        from cabb_ray.training.ray_env import TRIAL_SLOT
        from cabb_ray.tune.trial import run_trial

        setup = self._setup()
        if setup.in_process:  # the trial's process trains: it holds the worker's resources
            wanted = {"CPU": self.resources.cpus}
            if self.resources.gpus:
                wanted["GPU"] = self.resources.gpus
        elif self.spec.resources.driver_cpus:
            wanted = {"CPU": self.spec.resources.driver_cpus}
        else:
            wanted = {"CPU": 0, TRIAL_SLOT: 1}
        return tune.with_resources(tune.with_parameters(run_trial, setup=setup), wanted)

    def run(self, resume: bool) -> bool:
        """Run (or continue) the trials; True when every trial has ended."""
        from ray import tune

        from cabb_ray.training.ray_env import init_ray
        from cabb_ray.tune.callbacks import ChildRunCallback

        # Tune saves its state every >= 10 s by default, while Optuna and MLflow record a
        # trial at once: a driver killed in between leaves trials that Tune does not know.
        # Saving every second narrows that window (the resume reconciles what is left).
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_PERIOD_S)
        # in-process trials need no Ray Train, and so no dashboard (Train V2 uses its state API)
        init_ray(verbose=self.verbose, dashboard=self.verbose or not self._in_process())
        self._check_cluster()
        path = f"{self.storage.rstrip('/')}/{self.name}"
        if resume:  # runs and study trials that Tune's saved state does not know
            self._drop_orphan_runs(path)
        if resume and tune.Tuner.can_restore(path):
            # the searcher, scheduler and callbacks come back from the experiment folder (the
            # searcher fails its study's orphans as it is restored)
            tuner = tune.Tuner.restore(
                path, trainable=self._trainable(), resume_unfinished=True, resume_errored=False
            )
        else:
            if resume:  # killed before Tune saved anything: the study may hold orphans
                self._fail_orphan_study_trials()
            tuner = tune.Tuner(
                self._trainable(),
                tune_config=tune.TuneConfig(
                    search_alg=self._searcher(),
                    scheduler=self._scheduler(),
                    num_samples=self.spec.num_samples,
                    max_concurrent_trials=self.spec.max_concurrent_trials,
                    trial_dirname_creator=lambda trial: trial.trial_id,
                    reuse_actors=REUSE_ACTORS,
                ),
                run_config=tune.RunConfig(
                    name=self.name,
                    storage_path=self.storage,
                    failure_config=tune.FailureConfig(max_failures=self._max_failures()),
                    # in-process trials' checkpoints (Train keeps its own for DDP trials)
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=self.cfg.run.keep_checkpoints
                    ),
                    callbacks=[ChildRunCallback(self._setup())],
                    verbose=2 if self.verbose else 1,
                ),
            )
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the state is saved to resume
            tuner.fit()
        return self._all_trials_ended(path)

    def _fail_orphan_study_trials(self) -> None:
        import optuna

        from cabb_ray.tune.callbacks import fail_orphan_trials

        database = self.folder / "optuna.db"
        if database.is_file():
            storage = optuna.storages.RDBStorage(f"sqlite:///{database}")
            with contextlib.suppress(KeyError):  # no study of this name yet
                fail_orphan_trials(optuna.load_study(study_name=self.name, storage=storage), set())

    def _drop_orphan_runs(self, path: str) -> None:
        """Child runs of trials that Tune's saved state does not know: they started after its
        last save (it saves every ~10 s; MLflow is written at once) before the driver was
        killed. Tune starts their trials anew under other ids; the orphans are deleted (MLflow
        keeps deleted runs, restorable) so that each trial is counted once. The searcher does
        the same for the study (``CabbOptunaSearch.restore``)."""
        from mlflow.tracking import MlflowClient
        from ray.tune import ExperimentAnalysis

        from cabb_ray.tune.tags import TAG_TRIAL

        try:
            known = {t.trial_id for t in ExperimentAnalysis(path).trials}
        except (ValueError, OSError):  # no state saved yet
            known = set()
        client = MlflowClient(self.uri)
        for run in self._children():
            trial = run.data.tags.get(TAG_TRIAL)
            if trial not in known:
                client.set_tag(run.info.run_id, TAG_OUTCOME, "orphaned")
                client.delete_run(run.info.run_id)
                print(
                    f"trial {trial}: started after the search's last saved state; its MLflow "
                    f"run {run.info.run_id} is deleted and the trial runs again"
                )

    def _all_trials_ended(self, path: str) -> bool:
        """From Tune's own record: num_samples trials, each TERMINATED or ERROR."""
        from ray.tune import ExperimentAnalysis

        try:
            trials = ExperimentAnalysis(path).trials
        except ValueError:  # interrupted before Tune saved any state
            return False
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        return len(trials) >= self.spec.num_samples and len(ended) == len(trials)

    def _check_cluster(self) -> None:
        """Joining a cluster: drivers need the trial-slot resource somewhere."""
        import ray

        from cabb_ray.errors import CabbRayError
        from cabb_ray.training.ray_env import TRIAL_SLOT

        needs_slot = not self.spec.resources.driver_cpus and not self._setup().in_process
        if needs_slot and TRIAL_SLOT not in ray.cluster_resources():
            raise CabbRayError(
                f"the Ray cluster declares no '{TRIAL_SLOT}' resource for trial drivers: add "
                f"resources: {{{TRIAL_SLOT}: 100}} to its head node or set "
                "resources.driver_cpus in the space file"
            )

    # ------------------------------------------------------------------ results
    def _children(self):
        from cabb_ray.tune.leaderboard import child_runs

        return child_runs(self.uri, self.experiment_id, self.name)

    def table(self):
        from cabb_ray.tune.leaderboard import leaderboard

        return leaderboard(self._children(), self.spec.metrics, self.spec.modes)

    def finish(self, complete: bool, top: int) -> None:
        """Close runs, log the leaderboard, Pareto front and cost, tag and copy the best."""
        from cabb_ray.tracking import RunLogger

        for run in self._children():
            if run.info.status == "RUNNING":  # interrupted mid-trial; --resume reopens it
                child = RunLogger(self.uri, run.info.run_id)
                child.tags({TAG_OUTCOME: "interrupted"})
                child.finish("KILLED")
        table = self.table()
        parent = RunLogger(self.uri, self.parent_run_id)
        self._log_table(parent, table)
        if not complete:
            parent.finish("KILLED")
            return
        best = best_trial(table, self.spec.metrics)
        if best is not None:
            self._mark_best(parent, best)
        else:
            print("no trial finished with its objective: no best trial tagged or copied")
        parent.finish("FINISHED")
        self.print_summary(top, table)

    def _log_table(self, parent, table) -> None:
        from cabb_ray.tune.leaderboard import cost_totals, objective_study, pareto_front
        from cabb_ray.viz import pareto_plot

        if table.empty:
            return
        total, saved = cost_totals(table)
        best = best_trial(table, self.spec.metrics)
        if best is not None:  # the trial tagged best: finished, on the search's objective
            parent.metrics({"search/best_" + self.spec.metric: float(best[self.spec.metric])}, 0)
        parent.metrics(
            {
                "search/trials": len(table),
                "search/device_hours": total,
                "search/saved_device_hours": saved,
            },
            len(table),
        )
        with tempfile.TemporaryDirectory() as tmp:
            csv, parquet = Path(tmp) / "leaderboard.csv", Path(tmp) / "leaderboard.parquet"
            table.to_csv(csv, index=False)
            objects = {c: table[c].astype(str) for c in table if table[c].dtype == object}
            table.assign(**objects).to_parquet(parquet)
            parent.artifact(csv)
            parent.artifact(parquet)
            for path in (csv, parquet):  # the temporary folder may be on another filesystem
                copy_atomic(path, self.folder / path.name)
            if self.spec.multi_objective:
                front = pareto_front(table, self.spec.metrics, self.spec.modes)
                front.to_csv(Path(tmp) / "pareto_front.csv", index=False)
                parent.artifact(Path(tmp) / "pareto_front.csv")
                study = objective_study(table, self.spec.metrics, self.spec.modes)
                plot = pareto_plot(study, Path(tmp) / "pareto_front.png", self.spec.metrics)
                parent.artifact(plot)

    def _trial_best_file(self, trial_id: str) -> Path | None:
        """The best weights kept in the trial's newest Tune checkpoint (in-process trials),
        for when MLflow's copy cannot be fetched."""
        if "://" in self.storage:
            return None
        found = sorted(Path(self.storage, self.name, trial_id).glob("checkpoint_*/best.pt"))
        return found[-1] if found else None

    def _mark_best(self, parent, row) -> None:
        """Tag the best trial and copy its best checkpoint and config next to the results."""
        import mlflow.artifacts

        from cabb_ray.tracking import RunLogger

        RunLogger(self.uri, row["run_id"]).tags({TAG_BEST: "true"})
        parent.tags({"cabb_ray.best_run_id": row["run_id"], "cabb_ray.best_trial": row["trial"]})
        best = self.folder / "best"
        best.mkdir(exist_ok=True)
        for artifact in ("best/checkpoint.pt", "config.yaml"):
            try:
                mlflow.artifacts.download_artifacts(
                    run_id=row["run_id"],
                    artifact_path=artifact,
                    dst_path=str(best),
                    tracking_uri=self.uri,
                )
            except Exception as err:  # a tracking hiccup must not cost the search's results
                kept = self._trial_best_file(str(row["trial"]))
                if kept is not None and "checkpoint" in artifact:
                    copy_atomic(kept, best / "checkpoint.pt")
                    print(f"MLflow has no {artifact} of the best trial; copied {kept} instead")
                else:
                    print(f"warning: could not copy {artifact} of the best trial: {err}")

    def print_summary(self, top: int, table=None) -> None:
        from cabb_ray.tune.leaderboard import cost_totals, format_table

        table = self.table() if table is None else table
        print(f"\nleaderboard of search {self.name} (best {self.spec.metric} first):")
        print(format_table(table, searched_keys(self.spec), self.spec.metrics, top))
        if not table.empty:
            total, saved = cost_totals(table)
            unit = "GPU" if self.resources.gpus else "CPU-core"
            print(
                f"cost: {total:.3f} {unit}-hours; early stopping saved about {saved:.3f} "
                f"{unit}-hours against running every trial to the end"
            )
        best = self.folder / "best"
        if (best / "checkpoint.pt").is_file():
            print(f"best checkpoint: {best / 'checkpoint.pt'}")
            print(f"its config:      {best / 'config.yaml'}")
            print(
                f"  python -m cabb_ray.train --config {best / 'config.yaml'}\n"
                f"  python -m cabb_ray.predict --checkpoint {best / 'checkpoint.pt'} ..."
            )


# Outcomes of trials that trained to the end of their schedule (ASHA may stop the others)
FINISHED_OUTCOMES = ("finished",)


def best_trial(table, metrics: list[str]):
    """The leaderboard row of the best trial that finished, on the search's objectives (the
    table is sorted by them, first objective first: with two, the point of the Pareto front
    best on the first); None if no trial finished with them. Failed, interrupted and
    early-stopped trials are never picked."""
    if table.empty:
        return None
    finished = table[(table["status"] == "FINISHED") & table["outcome"].isin(FINISHED_OUTCOMES)]
    finished = finished.dropna(subset=list(metrics))
    return None if finished.empty else finished.iloc[0]
