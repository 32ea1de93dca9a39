"""What every training stage shares: running, restoring and recording one unit (a fold, a trial, a model)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformers import TrainerCallback

from pipelines import plots
from pipelines.checkpoints import CheckpointStore
from pipelines.leases import Lease
from pipelines.models import resolve_training_model
from pipelines.stages.augmented import with_augmentations
from pipelines.stages.contract import StageContext, open_stage
from pipelines.tasks import get_task
from pipelines.tracking import Tracker
from pipelines.training import FitResult, fit

logger = logging.getLogger(__name__)

PREDICTIONS_ARTIFACT = "predictions.csv"
UNIT_METRIC_PREFIX = "final_"  # a unit run's result metrics: final_accuracy, final_f1_macro, final_loss, ...
UNIT_DONE_METRIC = f"{UNIT_METRIC_PREFIX}epochs_trained"  # logged by every unit, last


class KeepLease(TrainerCallback):
    """Stop a worker whose unit's lease was taken over or has expired (``LeaseLost``), before its next step,
    metric or checkpoint: it must not touch the new owner's run. (Placed before the logging callbacks.)"""

    def __init__(self, lease: Lease):
        self.lease = lease

    def on_step_end(self, args, state, control, **kwargs):
        self.lease.check()

    def on_log(self, args, state, control, **kwargs):
        self.lease.check()

    def on_save(self, args, state, control, **kwargs):
        self.lease.check()


def share_units(ctx: StageContext, count: int, attempt: Callable[[int], Any], what: str,
                stop: Callable[[int, list], bool] | None = None) -> tuple[list, bool]:
    """Do units ``0..count-1`` together with any other workers on the same parent run.

    ``attempt(i)`` restores a done unit or does it under its lease, returning its result, or None while
    another live worker holds it; such units are tried again once nothing else is left (a dead worker's
    unit is taken over when its lease goes stale). Results come in unit order; ``stop(i, results_so_far)``
    may end early (pruning): the second return value says whether it did.
    """
    results: dict[int, Any] = {}
    progress = tqdm(total=count, desc=what, unit=what.rstrip("s"))
    while len(results) < count:
        busy = []
        for i in (i for i in range(count) if i not in results):
            result = attempt(i)
            if result is None:
                busy.append(i)
                continue
            results[i] = result
            progress.update()
            if stop is not None and stop(i, [results[j] for j in sorted(results)]):
                progress.close()
                return [results[j] for j in sorted(results)], True
        if busy:
            logger.info("waiting for %s %s: other workers hold them", what, busy)
            time.sleep(min(ctx.cfg.heartbeat_interval, 5))
    progress.close()
    return [results[j] for j in sorted(results)], False


def fit_unit(ctx: StageContext, run_id: str, train: pd.DataFrame, valid: pd.DataFrame, lease: Lease,
             callbacks: list = (), save_model: bool = True) -> FitResult:
    """Train one unit in run ``run_id`` (continuing from its checkpoint) under its ``lease`` and log its results:
    every checkpoint and the results are committed under the lease's fencing token (``Lease.fence``)."""
    train = with_augmentations(ctx, run_id, train)
    store = CheckpointStore(ctx.tracker, run_id, ctx.fingerprint, guard=lease.fence)
    with tempfile.TemporaryDirectory(prefix="pipelines-unit-") as work:
        result = fit(ctx.cfg, ctx.task, ctx.model, ctx.data, train, valid, ctx.tracker, run_id, store, Path(work),
                     callbacks=[KeepLease(lease), *callbacks], save_model=save_model)
    lease.fence()
    if result.predictions is not None:
        upload_frame(ctx.tracker, run_id, PREDICTIONS_ARTIFACT, result.predictions)
    metric = ctx.cfg.metric
    plots.upload(ctx.tracker, run_id, {"learning_curve.png": lambda path: plots.learning_curves(
        ctx.tracker.history(run_id, ["loss", "eval_loss", f"eval_{metric}"]), metric, path)})
    # the final metrics come last: once they are there, the unit is done even if the process dies now
    lease.fence()
    log_once(ctx.tracker, run_id, {f"{UNIT_METRIC_PREFIX}{k}": v for k, v in result.metrics.items()})
    store.clear()
    return result


def run_as_unit(ctx: StageContext, train: pd.DataFrame, valid: pd.DataFrame | None,
                publish: Callable[[FitResult], None] | None = None) -> FitResult:
    """Stages whose parent run is their only unit (`train`, `retrain`, `tapt`): restore it when done, else fit it.

    A second worker on the same run waits while the first one trains, then restores its result. ``publish``
    (e.g. registering the model) runs after the unit is done and before the run is finished, also on a resume
    of a run that died in between; it must skip what it already did.
    """
    tracker, run_id = ctx.tracker, ctx.parent_id
    with ctx.leases.wait_for(run_id, "unit") as lease:
        run = tracker.get_run(run_id)
        if unit_done(run):
            logger.info("%s run %s already finished: nothing to do", ctx.stage, run_id)
            result = restore_unit(ctx, run_id)
        else:
            if ctx.resumed:
                checkpoint = run.data.tags.get("checkpoint")
                logger.info("resuming %s run %s from %s", ctx.stage, run_id,
                            f"epoch {run.data.tags.get('checkpoint_epoch')} checkpoint ({checkpoint})"
                            if checkpoint else "the start (no checkpoint)")
            result = fit_unit(ctx, run_id, train, valid, lease)
        if publish is not None:
            publish(result)
        tracker.finish(run_id)
    return result


def unit_done(run) -> bool:
    """A unit run is done once FINISHED, or once its final metrics are logged (a crash just after that)."""
    return run.info.status == "FINISHED" or UNIT_DONE_METRIC in run.data.metrics


def restore_unit(ctx: StageContext, run_id: str) -> FitResult:
    """The result of a done unit, from its run's metrics and predictions artifact (none after `retrain`)."""
    CheckpointStore(ctx.tracker, run_id, ctx.fingerprint).clear()  # in case the process died before it did
    with tempfile.TemporaryDirectory() as tmp:
        try:
            predictions = ctx.task.read_predictions(ctx.tracker.download(run_id, PREDICTIONS_ARTIFACT, tmp))
        except Exception:  # noqa: BLE001 - a unit without validation rows has no predictions
            predictions = None
    metrics = ctx.tracker.metrics(run_id)
    return FitResult(metrics={k.removeprefix(UNIT_METRIC_PREFIX): v for k, v in metrics.items()
                              if k.startswith(UNIT_METRIC_PREFIX)},
                     predictions=predictions)


def log_once(tracker: Tracker, run_id: str, metrics: dict[str, float]) -> None:
    """Log summary metrics unless an earlier, interrupted attempt already did."""
    logged = tracker.logged_steps(run_id)
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in logged})


def upload_frame(tracker: Tracker, run_id: str, name: str, frame: pd.DataFrame,
                 artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp, name), index=False)
        tracker.upload(run_id, Path(tmp, name), artifact_path)


def run_on_holdout(stage: str, cfg, publish: Callable[[StageContext, FitResult], None] | None = None
                   ) -> tuple[StageContext, FitResult]:
    """Stages that train one model on a held-out split (`train`, `tapt`): load, open the stage, run its unit."""
    task = get_task(cfg.task)
    data = task.load(cfg)
    is_valid = np.zeros(len(data), dtype=bool)
    is_valid[task.holdout(data, cfg)] = True
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_training_model(cfg, Path(cache), task, tracker, stage)
        ctx = open_stage(stage, cfg, data, model, tracker)
        result = run_as_unit(ctx, data.frame[~is_valid], data.frame[is_valid],
                             (lambda r: publish(ctx, r)) if publish else None)
    return ctx, result
