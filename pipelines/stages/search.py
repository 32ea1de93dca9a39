"""`optuna`: hyperparameter search on an Optuna RDB storage; trials resume from their checkpoints.

Each trial is a child run tagged ``trial=<logical number>``; the Optuna trial records its run id.
A trial that was running when its process died is failed and re-queued (immediately when its
process on this host is gone, otherwise once its heartbeat is stale) and its retry continues in
the same MLflow run from the latest checkpoint (objective=holdout) or its finished folds
(objective=cv).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from transformers import TrainerCallback

from pipelines.config import OptunaConfig, fingerprint
from pipelines.data import fold_plan, holdout_split, load_dataset
from pipelines.models import resolve_model
from pipelines.stages.common import (
    BEST_PARAMS_ARTIFACT,
    StageContext,
    fit_unit,
    log_once,
    open_stage,
    upload_frame,
    upload_json,
)
from pipelines.stages.kfold import cross_validate
from pipelines.study import (
    FINISHED,
    OWNER_ATTR,
    StudySettings,
    grid_of,
    load_search_space,
    logical_number,
    open_study,
    recover_dead_trials,
    redact,
    storage_for,
    worker_id,
)
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)
RUN_ATTR, LOGICAL_ATTR = "mlflow_run_id", "logical_number"


class SurplusTrial(Exception):
    """Another worker already started the last trial the study needs."""


class ReportToOptuna(TrainerCallback):
    """Report the validation metric to Optuna at each evaluation; stop training when pruned."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric, self.pruned = trial, metric, False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        step = round(state.epoch) if not args.eval_steps else state.global_step
        self.trial.report(metrics[f"eval_{self.metric}"], step)
        if self.trial.should_prune():
            self.pruned = control.should_training_stop = True


def run(cfg: OptunaConfig) -> dict:
    tunable = {name: getattr(cfg, name) for name in cfg.tunable()}
    space = load_search_space(cfg.search_space, tunable)
    grid = grid_of(space) if cfg.sampler == "grid" else None
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column, cfg.max_samples, cfg.fold_seed)
    folds = fold_plan(data, cfg.k_folds, cfg.fold_seed) if cfg.objective == "cv" else None
    valid = holdout_split(data, cfg.validation_fraction, cfg.fold_seed) if cfg.objective == "holdout" else None
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_model(cfg.model, Path(cache))
        settings = StudySettings(
            storage=cfg.optuna_storage, study_name=cfg.study_name, direction=cfg.optimization_direction(),
            sampler=cfg.sampler, pruner=cfg.pruner, seed=cfg.seed, heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period, grid=grid)
        storage = storage_for(settings)  # a bad storage URL fails before any run is created
        extra = {"search_space": {name: repr(dist) for name, dist in sorted(space.items())}}
        ctx = open_stage("optuna", cfg, data, model, tracker, extra_inputs=extra)
        # a resumed search keeps its study, even when resumed from another experiment
        settings.study_name = (cfg.study_name or tracker.get_run(ctx.parent_id).data.tags.get("optuna_study")
                               or f"{tracker.experiment_name}-{ctx.fingerprint}")
        study = open_study(settings, storage)
        tracker.set_tags(ctx.parent_id, {"optuna_study": settings.study_name, "optuna_storage": redact(cfg.optuna_storage)})
        study.set_user_attr("mlflow_parent_run_id", ctx.parent_id)
        recovered = recover_dead_trials(study, storage)
        if ctx.resumed:
            logger.info(_resume_summary(ctx, study, cfg.n_trials, recovered))

        _optimize(study, storage, _Objective(ctx, space, folds, valid, cfg.n_trials), cfg)
        summary = _report(ctx, study)
        tracker.finish(ctx.parent_id)
    return summary


def _optimize(study: optuna.Study, storage, objective: "_Objective", cfg: OptunaConfig) -> None:
    """Run trials until the study has ``n_trials`` finished ones, sharing the work with other workers.

    Before each trial, crashed trials are re-queued; when every remaining trial is running in
    another worker, this one waits (a crashed worker's trial comes back once its heartbeat is stale).
    """
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
    waited = False
    while deadline is None or time.monotonic() < deadline:
        recover_dead_trials(study, storage)
        counts = Counter(t.state for t in study.get_trials(deepcopy=False))
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if finished >= cfg.n_trials:
            return
        if counts[TrialState.WAITING] == 0 and finished + counts[TrialState.RUNNING] >= cfg.n_trials:
            if not waited:
                logger.info("waiting for %d trial(s) running in other workers", counts[TrialState.RUNNING])
            waited = True
            time.sleep(min(cfg.heartbeat_interval, 5))
            continue
        waited = False
        study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)
    logger.warning("timeout=%ss reached: %d/%d trials finished; continue with resume=true", cfg.timeout,
                   _finished(study), cfg.n_trials)


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class _Objective:
    def __init__(self, ctx: StageContext, space: dict, folds, valid, n_trials: int):
        self.ctx, self.space, self.folds, self.valid, self.n_trials = ctx, space, folds, valid, n_trials

    def __call__(self, trial: optuna.Trial) -> float:
        ctx, tracker = self.ctx, self.ctx.tracker
        trials = trial.study.get_trials(deepcopy=False)
        number = logical_number(next(t for t in trials if t.number == trial.number), trials)
        if number >= self.n_trials:
            trial.study.stop()
            raise SurplusTrial(f"trial {trial.number} not needed: {self.n_trials} trials are finished or running")
        trial.set_user_attr(OWNER_ATTR, worker_id())
        trial.set_user_attr(LOGICAL_ATTR, number)
        params = {name: _suggest(trial, name, dist) for name, dist in self.space.items()}
        cfg = dataclasses.replace(ctx.cfg, **params)

        run = tracker.child_runs(ctx.parent_id, "trial").get(str(number))
        if run is None:
            run_id = tracker.start_child(ctx.parent_id, f"trial-{number}", {"trial": str(number)})
        else:
            run_id = run.info.run_id
            tracker.reopen(run_id)
        trial.set_user_attr(RUN_ATTR, run_id)
        if run is not None and "objective" in run.data.metrics and "optuna_state" in run.data.tags:
            # finished in MLflow, but the process died before Optuna recorded it: report, do not retrain
            value, pruned = run.data.metrics["objective"], run.data.tags["optuna_state"] == "PRUNED"
            logger.info("trial %d already finished in run %s: objective=%s", number, run_id, value)
            tracker.finish(run_id)
            if pruned:
                raise optuna.TrialPruned(f"trial {number} pruned")
            return value
        tracker.log_params(run_id, {**params, "optuna_trial_number": trial.number})
        unit = dataclasses.replace(ctx, cfg=cfg, parent_id=run_id, resumed_status=run.info.status if run else "",
                                   fingerprint=fingerprint({**ctx.inputs, "trial_params": params}))
        logger.info("trial %d/%d (optuna #%d) run=%s params=%s", number + 1, self.n_trials, trial.number, run_id,
                    params)
        value, pruned = self._evaluate(trial, unit, run_id)
        tracker.set_tags(run_id, {"optuna_state": "PRUNED" if pruned else "COMPLETE"})
        log_once(tracker, run_id, {"objective": value})  # last: with the tag, it marks the trial done
        tracker.finish(run_id)
        if pruned:
            raise optuna.TrialPruned(f"trial {number} pruned")
        return value

    def _evaluate(self, trial: optuna.Trial, unit: StageContext, run_id: str) -> tuple[float, bool]:
        metric = unit.cfg.metric
        if self.folds is None:
            frame = unit.data.frame
            is_valid = np.zeros(len(frame), dtype=bool)
            is_valid[self.valid] = True
            reporter = ReportToOptuna(trial, metric)
            result = fit_unit(unit, run_id, frame[~is_valid], frame[is_valid], callbacks=[reporter], save_model=False)
            return result.metrics[metric], reporter.pruned

        def after_fold(fold: int, results: list) -> bool:
            trial.report(float(np.mean([r.metrics[metric] for r in results])), fold)
            return trial.should_prune()

        results, stopped = cross_validate(unit, self.folds, after_fold=after_fold, save_model=False)
        return float(np.mean([r.metrics[metric] for r in results])), stopped


def _suggest(trial: optuna.Trial, name: str, dist):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _logical_trials(study: optuna.Study) -> list:
    """One row per logical trial, its latest attempt: crashed attempts that were retried, trials that failed
    with an exception (their number is reused) and surplus trials are left out."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.number not in retried and t.state != TrialState.FAIL and LOGICAL_ATTR in t.user_attrs]


def _report(ctx: StageContext, study: optuna.Study) -> dict:
    trials = sorted(_logical_trials(study), key=lambda t: t.user_attrs[LOGICAL_ATTR])
    names = sorted({name for t in trials for name in t.params})
    table = pd.DataFrame({
        "number": [t.user_attrs[LOGICAL_ATTR] for t in trials],
        "state": [t.state.name for t in trials],
        "value": [t.value for t in trials],
        **{f"params_{name}": [t.params.get(name) for t in trials] for name in names},
    })
    upload_frame(ctx.tracker, ctx.parent_id, "trials.csv", table)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    summary = {"n_finished": sum(t.state in FINISHED for t in trials)}
    if finished:
        best = study.best_trial
        summary.update(best_value=best.value, best_trial=best.user_attrs[LOGICAL_ATTR], best_params=best.params)
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
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    with tempfile.TemporaryDirectory() as tmp:
        for name, plot in (("optimization_history.png", plots.plot_optimization_history),
                           ("param_importances.png", plots.plot_param_importances)):
            try:
                axes = plot(study)
                axes.figure.savefig(Path(tmp, name), bbox_inches="tight")
                matplotlib.pyplot.close(axes.figure)
                ctx.tracker.upload(ctx.parent_id, Path(tmp, name), "plots")
            except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ finished trials
                logger.warning("plot %s skipped: %s", name, exc)


def _resume_summary(ctx: StageContext, study: optuna.Study, n_trials: int, recovered: list[int]) -> str:
    trials = study.get_trials(deepcopy=False)
    parts = [f"{_finished(study)}/{n_trials} trials finished"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        parts.append(f"best {best.value:.4f} (trial {best.user_attrs.get(LOGICAL_ATTR, best.number)})")
    children = ctx.tracker.child_runs(ctx.parent_id, "trial")
    for t in trials:
        if t.state == TrialState.WAITING and "failed_trial" in t.system_attrs:
            number = t.user_attrs.get(LOGICAL_ATTR)
            run = children.get(str(number))
            epoch = run.data.tags.get("checkpoint_epoch") if run else None
            parts.append(f"trial {number} continues from epoch {epoch}" if epoch else f"trial {number} restarts")
    if recovered:
        parts.append(f"recovered crashed trials {recovered}")
    return f"resuming optuna run {ctx.parent_id}: " + ", ".join(parts)
