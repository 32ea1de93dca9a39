"""`kfold`: K-fold cross-validation; each fold is a child run and a resumable unit."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import plots
from pipelines.config import KFoldConfig
from pipelines.leases import LeaseLost
from pipelines.models import resolve_training_model
from pipelines.stages.common import fit_unit, log_once, restore_unit, share_units, unit_done, upload_frame
from pipelines.stages.contract import StageContext, open_stage
from pipelines.tasks import get_task
from pipelines.tracking import Tracker
from pipelines.training import FitResult

logger = logging.getLogger(__name__)

OOF_ARTIFACT = "oof_predictions.csv"


def run(cfg: KFoldConfig) -> dict[str, float]:
    task = get_task(cfg.task)
    data = task.load(cfg)
    folds = task.folds(data, cfg)
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_training_model(cfg, Path(cache), task, tracker, "kfold")
        ctx = open_stage("kfold", cfg, data, model, tracker)
        results, _ = cross_validate(ctx, folds)
        oof = pd.concat([r.predictions.assign(fold=i) for i, r in enumerate(results)]).sort_values("row_id")
        oof = oof[["row_id", "fold", *[c for c in oof if c not in ("row_id", "fold")]]]
        summary = _summary([r.metrics for r in results], tuple(task.metrics(cfg)))
        with ctx.leases.wait_for(ctx.parent_id, "finish"):  # workers that end together finish it once
            upload_frame(tracker, ctx.parent_id, OOF_ARTIFACT, oof)
            plots.upload(tracker, ctx.parent_id, _drawings(results, oof, tuple(task.metrics(cfg))))
            log_once(tracker, ctx.parent_id, summary)
            tracker.finish(ctx.parent_id)
    logger.info("kfold run %s finished: %s", ctx.parent_id,
                " ".join(f"{k}={v:.4f}" for k, v in summary.items() if k.startswith("cv_")))
    return summary


def _drawings(results: list[FitResult], oof: pd.DataFrame, metrics: tuple[str, ...]) -> dict:
    """Per-fold bars of the summary metrics with mean ± std; the out-of-fold confusion matrix (classification)."""
    drawings = {"fold_metrics.png": lambda path: plots.fold_bars(
        {name: [r.metrics[name] for r in results] for name in metrics}, path)}
    if {"label", "predicted"} <= set(oof.columns):
        drawings["confusion_matrix.png"] = lambda path: plots.confusion(oof["label"], oof["predicted"], path)
    return drawings


def cross_validate(ctx: StageContext, folds: list[np.ndarray], after_fold=None,
                   save_model: bool = True) -> tuple[list[FitResult], bool]:
    """Run or restore each fold as a child run of ``ctx.parent_id``, sharing the folds with other workers.

    A fold is trained by whoever holds its lease; folds leased by live workers are skipped, and waited for
    once nothing else is left (a dead worker's fold is taken over when its lease goes stale).
    ``after_fold(fold, results_so_far)`` may return True to stop early (pruning); the second return value
    says whether it did.
    """
    if ctx.resumed:
        logger.info(_resume_summary(ctx, ctx.tracker.child_runs(ctx.parent_id, "fold"), len(folds)))
    return share_units(ctx, len(folds), lambda fold: _fold(ctx, fold, folds, save_model), "folds", after_fold)


def _fold(ctx: StageContext, fold: int, folds: list[np.ndarray], save_model: bool) -> FitResult | None:
    """Restore a finished fold, or train it under its lease (continuing an unfinished fold's run and checkpoint).

    None when another live worker holds the fold.
    """
    run = ctx.tracker.child_runs(ctx.parent_id, "fold").get(str(fold))
    if run is not None and run.info.status == "FINISHED":
        return restore_unit(ctx, run.info.run_id)
    lease = ctx.leases.acquire(ctx.parent_id, f"fold-{fold}")
    if lease is None:
        return None
    with lease:
        run = ctx.tracker.child_runs(ctx.parent_id, "fold").get(str(fold))  # it may have changed meanwhile
        if run is None:
            run_id = ctx.tracker.start_child(ctx.parent_id, f"fold-{fold}", {"fold": str(fold)})
        else:
            run_id = run.info.run_id
            ctx.tracker.reopen(run_id)
        if run is not None and unit_done(run):
            result = restore_unit(ctx, run_id)
        else:
            try:
                result = _train_fold(ctx, fold, run_id, folds, lease, save_model)
            except LeaseLost as exc:
                logger.error("fold %d stopped (%s): leaving it to whoever takes it over", fold, exc)
                ctx.tracker.forget(run_id)
                return None
        ctx.tracker.finish(run_id)
    return result


def _train_fold(ctx: StageContext, fold: int, run_id: str, folds: list[np.ndarray], lease, save_model: bool):
    ctx.tracker.log_params(run_id, {**ctx.cfg.to_record(), "fold": fold, "fingerprint": ctx.fingerprint})
    frame = ctx.data.frame
    is_valid = np.zeros(len(frame), dtype=bool)
    is_valid[folds[fold]] = True
    logger.info("fold %d/%d: %d train rows, %d validation rows, run %s", fold + 1, len(folds), (~is_valid).sum(),
                is_valid.sum(), run_id)
    return fit_unit(ctx, run_id, frame[~is_valid], frame[is_valid], lease, save_model=save_model)


def _summary(fold_metrics: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    summary = {}
    for name in names:
        values = np.array([m[name] for m in fold_metrics])
        summary.update({f"fold{i}_{name}": v for i, v in enumerate(values)})
        summary[f"cv_{name}_mean"] = float(values.mean())
        summary[f"cv_{name}_std"] = float(values.std())
    return summary


def _resume_summary(ctx: StageContext, runs: dict, k: int) -> str:
    finished = sorted(int(f) for f, r in runs.items() if r.info.status == "FINISHED")
    parts = [f"folds {','.join(map(str, finished))} finished" if finished else "no fold finished"]
    for fold, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        if run.info.status != "FINISHED":
            checkpoint = run.data.tags.get("checkpoint")
            epoch = run.data.tags.get("checkpoint_epoch")
            parts.append(f"fold {fold} from epoch {epoch} checkpoint ({checkpoint})" if checkpoint
                         else f"fold {fold} starts over (no checkpoint)")
    parts.append(f"{k - len(finished)} folds to go")
    return f"resuming {ctx.stage} run {ctx.parent_id}: " + ", ".join(parts)
