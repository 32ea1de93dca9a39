"""`optuna`: hyperparameter search on an Optuna RDB storage; trials resume from their checkpoints.

Each logical trial (see pipelines/study.py) is one child run tagged ``trial=<logical number>``, shared
by all its attempts; the Optuna trial records its run id.  A trial that was running when its process
died is failed and re-queued (immediately when its process on this host is gone, otherwise once its
trial lease is older than that worker's own ``grace_period`` by the database's clock).  A holdout trial
trains its run under the run's unit lease, so two attempts never train or prune one trial's run at once.
A trial that raised is marked FAILED in Optuna and MLflow (tag ``error``, the traceback under
``errors/``) and re-queued at most ``max_retries`` times.  A retry continues in the
same MLflow run from the latest checkpoint (objective=holdout) or its finished folds (objective=cv).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import tempfile
import traceback
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from transformers import TrainerCallback

from pipelines import plots
from pipelines.config import OptunaConfig
from pipelines.faults import raise_if
from pipelines.leases import LeaseLost
from pipelines.models import resolve_training_model
from pipelines.settings import fingerprint
from pipelines.stages.common import PREDICTIONS_ARTIFACT, fit_unit, log_once, upload_frame
from pipelines.stages.contract import BEST_PARAMS_ARTIFACT, StageContext, open_stage, upload_json
from pipelines.stages.kfold import cross_validate
from pipelines.study import (
    ERROR_ATTR,
    FINISHED,
    LOGICAL_ATTR,
    SearchLimits,
    StudySettings,
    describe_error,
    grid_of,
    grid_size,
    load_search_space,
    logical_numbers,
    logical_trials,
    open_study,
    optimize,
    recover_dead_trials,
    storage_for,
    study_scope,
    trial_budget,
)
from pipelines.tasks import get_task
from pipelines.tracking import Tracker, state_storage

logger = logging.getLogger(__name__)
PRUNED_TAG = "pruned_at_step"
RUN_ATTR = "mlflow_run_id"
ERROR_TAG, FAILED_ATTEMPTS_TAG = "error", "failed_attempts"


class ReportToOptuna(TrainerCallback):
    """Report the validation metric to Optuna at each evaluation; stop training when pruned.

    The decision is tagged on the trial's run (``pruned_at_step``) before the checkpoint of that evaluation is
    saved: a process killed after it must not come back and call a pruned trial complete. The evaluation before
    training (step 0, masked-LM's ``eval_on_start``) is the untrained model's: not reported, nothing to prune on.
    """

    def __init__(self, trial: optuna.Trial, metric: str, tracker: Tracker, run_id: str):
        self.trial, self.metric, self.pruned = trial, metric, False
        self.tracker, self.run_id = tracker, run_id

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0:
            return
        step = round(state.epoch) if not args.eval_steps else state.global_step
        self.trial.report(metrics[f"eval_{self.metric}"], step)
        if self.trial.should_prune():
            self.tracker.set_tags(self.run_id, {PRUNED_TAG: str(state.global_step)})
            self.pruned = control.should_training_stop = True


def run(cfg: OptunaConfig) -> dict:
    tunable = {name: getattr(cfg, name) for name in cfg.tunable()}
    space = load_search_space(cfg.search_space, tunable)
    cfg.refuse_failing_trials(space)
    grid = grid_of(space) if cfg.sampler == "grid" else None
    n_trials = trial_budget(cfg.n_trials, grid)
    task = get_task(cfg.task)
    data = task.load(cfg)
    folds = task.folds(data, cfg) if cfg.objective == "cv" else None
    valid = task.holdout(data, cfg) if cfg.objective != "cv" else None
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_training_model(cfg, Path(cache), task, tracker, "optuna")
        generator = task.generation_objective(cfg, model.path) if cfg.objective == "generate" else None
        settings = StudySettings(
            storage=state_storage(cfg.optuna_storage), study_name=cfg.study_name,
            direction=cfg.optimization_direction(), sampler=cfg.sampler, pruner=cfg.pruner, seed=cfg.seed,
            heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period, grid=grid)
        storage = storage_for(settings)  # a bad storage URL fails before any run is created
        extra = {"search_space": {name: repr(dist) for name, dist in sorted(space.items())}}
        ctx = open_stage("optuna", cfg, data, model, tracker, extra_inputs=extra)
        # a resumed search keeps its study, even when resumed from another experiment
        settings.study_name = (cfg.study_name or tracker.get_run(ctx.parent_id).data.tags.get("optuna_study")
                               or f"{tracker.experiment_name}-{ctx.fingerprint}-{ctx.parent_id[:8]}")
        study = open_study(settings, storage)
        tracker.set_tags(ctx.parent_id, {"optuna_study": settings.study_name})
        study.set_user_attr("mlflow_parent_run_id", ctx.parent_id)
        lock = _study_lock(ctx, storage, study)
        with lock():
            recovered = recover_dead_trials(study, storage, ctx.leases)
        if ctx.resumed:
            logger.info(_resume_summary(ctx, study, n_trials, recovered))
        limits = SearchLimits(n_trials, cfg.max_retries, cfg.timeout, poll=min(cfg.heartbeat_interval, 5),
                              max_trials=grid_size(grid) if grid else 0)
        objective = _Objective(ctx, space, folds, valid, n_trials, generator)
        done = optimize(study, storage, objective, limits, lock, ctx.leases)
        with ctx.leases.wait_for(ctx.parent_id, "finish"):  # workers that end together report once
            summary = _report(ctx, study)
            if done or not ctx.others_working():
                tracker.finish(ctx.parent_id)
        if not done:
            logger.warning("timeout=%ss reached: %d/%d trials finished; continue with resume=true", cfg.timeout,
                           _finished(study), n_trials)
    return summary


def _study_lock(ctx: StageContext, storage, study: optuna.Study):
    """The lock under which every worker of this study creates, fails and re-queues trials (a lease)."""
    scope = study_scope(study)
    return lambda: ctx.leases.wait_for(scope, "trials")


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class _Objective:
    """One trial: its child run (tag ``trial=<logical number>``, shared by all its attempts), training, result."""

    def __init__(self, ctx: StageContext, space: dict, folds, valid, n_trials: int, generator=None):
        self.ctx, self.space, self.folds, self.valid, self.n_trials = ctx, space, folds, valid, n_trials
        self.generator = generator  # objective=generate: the task's scoring of the fixed model's output

    def __call__(self, trial: optuna.Trial) -> float:
        ctx, tracker = self.ctx, self.ctx.tracker
        number = trial.user_attrs[LOGICAL_ATTR]
        params = {name: _suggest(trial, name, dist) for name, dist in self.space.items()}
        run_id, run = self._open_run(number)
        trial.set_user_attr(RUN_ATTR, run_id)
        if run is not None and "objective" in run.data.metrics and "optuna_state" in run.data.tags:
            # finished in MLflow, but the process died before Optuna recorded it: report, do not retrain
            value, pruned = run.data.metrics["objective"], run.data.tags["optuna_state"] == "PRUNED"
            logger.info("trial %d already finished in run %s: objective=%s", number, run_id, value)
            tracker.finish(run_id)
            if pruned:
                raise optuna.TrialPruned(f"trial {number} pruned")
            return value
        logger.info("trial %d (optuna #%d; %d/%d trials finished) run=%s params=%s", number, trial.number,
                    _finished(trial.study), self.n_trials, run_id, params)
        try:
            raise_if(params)
            unit = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, **params), parent_id=run_id,
                                       resumed_status=run.info.status if run else "",
                                       fingerprint=fingerprint({**ctx.inputs, "trial_params": params}))
            tracker.log_params(run_id, {**params, "optuna_trial_number": trial.number})
            value, pruned = self._evaluate(trial, unit, run_id)
            if not math.isfinite(value):
                raise ValueError(f"objective {ctx.cfg.metric} is {value}: the training diverged")
        except (optuna.TrialPruned, LeaseLost):  # lost: the trial's run is another worker's now, never touch it
            raise
        except Exception as exc:
            _record_failure(tracker, run_id, trial.number, exc)
            raise
        tracker.set_tags(run_id, {"optuna_state": "PRUNED" if pruned else "COMPLETE"})
        log_once(tracker, run_id, {"objective": value})  # last: with the tag, it marks the trial done
        tracker.finish(run_id)
        if pruned:
            raise optuna.TrialPruned(f"trial {number} pruned")
        return value

    def _open_run(self, number: int):
        """The trial's child run, continued (a retry: same run, from its checkpoint) or started."""
        tracker = self.ctx.tracker
        run = tracker.child_runs(self.ctx.parent_id, "trial").get(str(number))
        if run is None:
            return tracker.start_child(self.ctx.parent_id, f"trial-{number}", {"trial": str(number)}), None
        tracker.reopen(run.info.run_id)
        tracker.delete_tag(run.info.run_id, ERROR_TAG)  # the failed attempts' errors stay under errors/
        return run.info.run_id, run

    def _evaluate(self, trial: optuna.Trial, unit: StageContext, run_id: str) -> tuple[float, bool]:
        metric = unit.cfg.metric
        if unit.cfg.objective == "generate":
            return self._generate(unit, run_id)[metric], False
        if self.folds is None:
            frame = unit.data.frame
            is_valid = np.zeros(len(frame), dtype=bool)
            is_valid[self.valid] = True
            reporter = ReportToOptuna(trial, metric, unit.tracker, run_id)
            with unit.leases.wait_for(run_id, "unit") as lease:  # one attempt at a time trains the trial's run
                result = fit_unit(unit, run_id, frame[~is_valid], frame[is_valid], lease, callbacks=[reporter],
                                  save_model=False)
            pruned = reporter.pruned or PRUNED_TAG in unit.tracker.get_run(run_id).data.tags
            return result.metrics[metric], pruned

        def after_fold(fold: int, results: list) -> bool:
            trial.report(float(np.mean([r.metrics[metric] for r in results])), fold)
            return trial.should_prune()

        results, stopped = cross_validate(unit, self.folds, after_fold=after_fold, save_model=False)
        return float(np.mean([r.metrics[metric] for r in results])), stopped


    def _generate(self, unit: StageContext, run_id: str) -> dict[str, float]:
        """objective=generate: the fixed model's output for the validation rows with this trial's generation
        settings, scored (a unit without training: nothing to checkpoint)."""
        metrics, predictions = self.generator(unit.cfg, unit.data.frame.iloc[self.valid])
        upload_frame(unit.tracker, run_id, PREDICTIONS_ARTIFACT, predictions)
        log_once(unit.tracker, run_id, {f"final_{k}": v for k, v in metrics.items()})
        return metrics


def _record_failure(tracker: Tracker, run_id: str, optuna_number: int, exc: Exception) -> None:
    """Mark the trial's run (and its unfinished fold runs) FAILED with the error: tag ``error``, the count in
    ``failed_attempts`` and the traceback in ``errors/optuna-trial-<n>.txt``."""
    error = describe_error(exc)
    try:
        run = tracker.get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, f"optuna-trial-{optuna_number}.txt")
            path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
            tracker.upload(run_id, path, "errors")
        failed = int(run.data.tags.get(FAILED_ATTEMPTS_TAG, "0")) + 1
        tracker.set_tags(run_id, {ERROR_TAG: error, FAILED_ATTEMPTS_TAG: str(failed)})
        for fold in tracker.child_runs(run_id, "fold").values():
            if fold.info.status == "RUNNING":
                tracker.mark_dead(fold.info.run_id, "FAILED", f"its trial failed: {error}")
                tracker.forget(fold.info.run_id)
        tracker.mark_dead(run_id, "FAILED", error)
        tracker.forget(run_id)
    except Exception as record_exc:  # noqa: BLE001 - the trial's own error matters more; Optuna records it
        logger.warning("could not record the failure of run %s in MLflow: %s", run_id, record_exc)


def _suggest(trial: optuna.Trial, name: str, dist):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _report(ctx: StageContext, study: optuna.Study) -> dict:
    """``trials.csv`` (one row per logical trial: its latest attempt), best parameters, plots; the summary."""
    trials = study.get_trials(deepcopy=False)
    latest = logical_trials(trials)
    names = sorted({name for t in latest.values() for name in t.params})
    table = pd.DataFrame({
        "number": list(latest),
        "state": [t.state.name for t in latest.values()],
        "value": [t.value for t in latest.values()],
        **{f"params_{name}": [t.params.get(name) for t in latest.values()] for name in names},
        "error": [t.user_attrs.get(ERROR_ATTR, "") if t.state == TrialState.FAIL else "" for t in latest.values()],
    })
    upload_frame(ctx.tracker, ctx.parent_id, "trials.csv", table)
    failed = [n for n, t in latest.items() if t.state == TrialState.FAIL]
    summary = {"n_finished": sum(t.state in FINISHED for t in latest.values()), "n_failed": len(failed)}
    if failed:
        logger.warning("%d trial(s) failed and were not retried further (max_retries=%d): numbers %s; their errors "
                       "are in trials.csv and in the error tag of their runs", len(failed), ctx.cfg.max_retries,
                       failed)
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        summary.update(best_value=best.value, best_trial=logical_numbers(trials)[best.number],
                       best_params=best.params)
        upload_json(ctx.tracker, ctx.parent_id, BEST_PARAMS_ARTIFACT, best.params)
        logged = ctx.tracker.logged_steps(ctx.parent_id)
        if logged.get("best_value", -1) < summary["n_finished"]:
            ctx.tracker.log_metrics(ctx.parent_id, {"best_value": best.value, "best_trial": summary["best_trial"]},
                                    step=summary["n_finished"])
        _plots(ctx, study)
        logger.info("optuna run %s: %d trials finished, best %s=%.4f (trial %d) params=%s", ctx.parent_id,
                    summary["n_finished"], ctx.cfg.metric, best.value, summary["best_trial"], best.params)
    return summary


def _plots(ctx: StageContext, study: optuna.Study) -> None:
    """Optimization history, parallel coordinates and importances (these need 2+ finished trials: else skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    kinds = {"optimization_history.png": optuna_plots.plot_optimization_history,
             "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
             "param_importances.png": optuna_plots.plot_param_importances}
    plots.upload(ctx.tracker, ctx.parent_id,
                 {name: functools.partial(plots.optuna_figure, plot, study) for name, plot in kinds.items()})


def _resume_summary(ctx: StageContext, study: optuna.Study, n_trials: int, recovered: list[int]) -> str:
    trials = study.get_trials(deepcopy=False)
    numbers = logical_numbers(trials)
    parts = [f"{_finished(study)}/{n_trials} trials finished"]
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        parts.append(f"best {best.value:.4f} (trial {numbers[best.number]})")
    failed = [n for n, t in logical_trials(trials).items() if t.state == TrialState.FAIL]
    if failed:
        parts.append(f"trials {failed} failed (their numbers stay used)")
    children = ctx.tracker.child_runs(ctx.parent_id, "trial")
    for t in trials:
        if t.state == TrialState.WAITING and "failed_trial" in t.system_attrs:
            run = children.get(str(numbers[t.number]))
            epoch = run.data.tags.get("checkpoint_epoch") if run else None
            parts.append(f"trial {numbers[t.number]} continues from epoch {epoch}" if epoch
                         else f"trial {numbers[t.number]} restarts")
    if recovered:
        parts.append(f"recovered crashed trials {recovered}")
    return f"resuming optuna run {ctx.parent_id}: " + ", ".join(parts)
