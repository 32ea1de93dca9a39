"""What every training stage shares: the resume contract for its parent run, and running one unit."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.checkpoints import CheckpointStore
from pipelines.config import TUNABLE, NotFound, StageConfig, UserError, convert_value, describe_differences, fingerprint
from pipelines.data import Dataset
from pipelines.models import ModelSource
from pipelines.tracking import UNFINISHED, Tracker
from pipelines.training import FitResult, fit

logger = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config.json"
PREDICTIONS_ARTIFACT = "predictions.csv"
BEST_PARAMS_ARTIFACT = "best_params.json"
UNIT_METRIC_PREFIX = "final_"  # a unit run's result metrics: final_accuracy, final_f1_macro, final_loss, ...
UNIT_DONE_METRIC = f"{UNIT_METRIC_PREFIX}epochs_trained"  # logged by every unit, last


class ResumeError(UserError):
    """A resume request cannot be honoured; the message says why and what to run instead."""


@dataclass
class StageContext:
    """Everything a stage's units need: settings, data, model and the open parent run."""

    stage: str
    cfg: StageConfig
    data: Dataset
    model: ModelSource
    tracker: Tracker
    inputs: dict  # fingerprint inputs
    fingerprint: str
    parent_id: str = ""
    resumed_status: str = ""  # status of the parent run before this invocation re-attached to it

    @property
    def resumed(self) -> bool:
        return bool(self.resumed_status)


def open_stage(stage: str, cfg: StageConfig, data: Dataset, model: ModelSource, tracker: Tracker,
               extra_inputs: dict | None = None) -> StageContext:
    """Start a new parent run or re-attach to one, following the resume contract (DESIGN.md section 3).

    ``extra_inputs`` are further result-affecting values for the fingerprint (e.g. a parsed search space).
    """
    if getattr(cfg, "params_from", ""):
        cfg = _with_best_params(cfg, tracker)
    inputs = {"stage": stage, **cfg.result_settings(), "data_digest": data.digest, "model_digest": model.digest,
              **(extra_inputs or {})}
    ctx = StageContext(stage, cfg, data, model, tracker, inputs, fingerprint(inputs))
    previous = tracker.parent_runs(stage)
    same = [run for run in previous if run.data.tags.get("fingerprint") == ctx.fingerprint]
    if cfg.resume_from:
        parent = tracker.get_run(cfg.resume_from)
        if parent.data.tags.get("stage") != stage:
            raise ResumeError(f"resume_from={cfg.resume_from} is not a {stage} parent run "
                              f"(its stage tag is {parent.data.tags.get('stage')!r}); pass the id of a {stage} run")
        _refuse_if_different(ctx, parent)
    elif cfg.resume and same:
        parent = same[0]
    elif cfg.resume and previous:
        _refuse_if_different(ctx, previous[0])
    else:
        if cfg.resume:
            logger.warning("resume=true but experiment has no %s run to resume: starting a new run", stage)
        unfinished = [run for run in same if run.info.status in UNFINISHED]
        if unfinished:
            run = unfinished[0]
            logger.warning("an unfinished %s run %s with the same settings exists (status %s); pass resume=true "
                           "to continue it. Starting a new run.", stage, run.info.run_id, run.info.status)
        source = getattr(cfg, "params_from", "")
        tags = {"data_digest": data.digest, **({"params_source": source} if source else {})}
        ctx.parent_id = tracker.start_parent(stage, ctx.fingerprint, tags)
        _record_config(ctx)
        logger.info("started %s run %s fingerprint=%s", stage, ctx.parent_id, ctx.fingerprint)
        return ctx
    ctx.parent_id, ctx.resumed_status = parent.info.run_id, parent.info.status
    if parent.info.status == "RUNNING":
        logger.warning("run %s is marked RUNNING: its process crashed or was killed without cleanup", ctx.parent_id)
    tracker.reopen(ctx.parent_id)
    tracker.note_resume(ctx.parent_id)
    return ctx


def _with_best_params(cfg: StageConfig, tracker: Tracker) -> StageConfig:
    """``cfg`` with the parameters of the optuna or kfold run ``cfg.params_from`` (``latest``: newest search).

    From an optuna run: its best parameters. From a kfold run: its tunable settings, and for ``epochs=0``
    (retrain) the mean best epoch over its folds, rounded to the nearest whole epoch.
    """
    source = cfg.params_from
    if source == "latest":
        runs = [r for r in tracker.parent_runs("optuna") if r.info.status == "FINISHED"]
        if not runs:
            raise NotFound("params_from=latest: no finished optuna run in this experiment; run -e optuna first")
        source = runs[0].info.run_id
    run = tracker.get_run(source)
    stage = run.data.tags.get("stage")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    if stage not in ("optuna", "kfold"):
        raise NotFound(f"params_from={cfg.params_from}: run {source} is a {stage or 'non-stage'} run; pass an "
                          "optuna or kfold run id (or latest)")
    settings = {name: convert_value(name, run.data.params[name], defaults[name])
                for name in TUNABLE if name != "epochs" and name in run.data.params}
    if stage == "optuna":
        with tempfile.TemporaryDirectory() as tmp:
            settings.update(json.loads(tracker.download(source, BEST_PARAMS_ARTIFACT, tmp).read_text()))
    if not cfg.epochs and "epochs" not in settings:  # retrain's epochs=0: take them from the source
        folds = [r for r in tracker.child_runs(source, "fold").values() if "final_best_epoch" in r.data.metrics]
        best = [r.data.metrics["final_best_epoch"] for r in folds]
        settings["epochs"] = (max(1, round(float(np.mean(best)))) if best
                              else convert_value("epochs", run.data.params["epochs"], 1))
    logger.info("params_from=%s: using parameters of %s run %s: %s", cfg.params_from, stage, source, settings)
    return dataclasses.replace(cfg, params_from=source, **settings)


def recorded_settings(tracker: Tracker, run_id: str) -> dict:
    """The resolved settings a stage run recorded in its ``config.json``: the values it actually used.

    Never read a run's params for this: under ``mlflow run`` they may hold the literal ``-P`` values.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            record = json.loads(tracker.download(run_id, CONFIG_ARTIFACT, tmp).read_text())
            return record["settings"]
        except Exception as exc:  # noqa: BLE001 - missing, unreadable or not ours
            raise NotFound(f"run {run_id} has no readable {CONFIG_ARTIFACT} ({exc}); it was not made by a pipelines "
                           "stage, or died before recording its settings: pass a finished stage run") from None


def _record_config(ctx: StageContext) -> None:
    ctx.tracker.log_params(ctx.parent_id, {**ctx.cfg.to_dict(), "data_digest": ctx.data.digest,
                                           "model_digest": ctx.model.digest, "fingerprint": ctx.fingerprint})
    record = {"settings": ctx.cfg.to_dict(), "fingerprint_inputs": ctx.inputs, "fingerprint": ctx.fingerprint}
    upload_json(ctx.tracker, ctx.parent_id, CONFIG_ARTIFACT, record)


def _refuse_if_different(ctx: StageContext, run) -> None:
    if run.data.tags.get("fingerprint") == ctx.fingerprint:
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            old = json.loads(ctx.tracker.download(run.info.run_id, CONFIG_ARTIFACT, tmp).read_text())
            differences = describe_differences(old["fingerprint_inputs"], ctx.inputs)
        except Exception:  # noqa: BLE001 - the run died before its config was recorded
            differences = ["(the earlier run recorded no config)"]
    raise ResumeError(
        f"cannot resume {ctx.stage} run {run.info.run_id}: these result-affecting settings differ: "
        f"{'; '.join(differences)}. Pass the original values to continue it, or resume=false to start a new run."
    )


def fit_unit(ctx: StageContext, run_id: str, train: pd.DataFrame, valid: pd.DataFrame, callbacks: list = (),
             save_model: bool = True) -> FitResult:
    """Train one unit in run ``run_id`` (continuing from its checkpoint) and log its results."""
    store = CheckpointStore(ctx.tracker, run_id, ctx.fingerprint)
    with tempfile.TemporaryDirectory(prefix="pipelines-unit-") as work:
        result = fit(ctx.cfg, ctx.model, ctx.data.labels, train, valid, ctx.tracker, run_id, store, Path(work),
                     callbacks=list(callbacks), save_model=save_model)
    if result.predictions is not None:
        upload_frame(ctx.tracker, run_id, PREDICTIONS_ARTIFACT, result.predictions)
    # the final metrics come last: once they are there, the unit is done even if the process dies now
    log_once(ctx.tracker, run_id, {f"{UNIT_METRIC_PREFIX}{k}": v for k, v in result.metrics.items()})
    store.clear()
    return result


def run_as_unit(ctx: StageContext, train: pd.DataFrame, valid: pd.DataFrame | None) -> FitResult:
    """Stages whose parent run is their only unit (`train`, `retrain`): restore it when done, else fit it."""
    tracker, run_id = ctx.tracker, ctx.parent_id
    if ctx.resumed and unit_done(tracker.get_run(run_id)):
        logger.info("%s run %s already finished: nothing to do", ctx.stage, run_id)
        result = restore_unit(ctx, run_id)
    else:
        if ctx.resumed:
            tags = tracker.get_run(run_id).data.tags
            checkpoint = tags.get("checkpoint")
            logger.info("resuming %s run %s from %s", ctx.stage, run_id,
                        f"epoch {tags.get('checkpoint_epoch')} checkpoint ({checkpoint})"
                        if checkpoint else "the start (no checkpoint)")
        result = fit_unit(ctx, run_id, train, valid)
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
            predictions = pd.read_csv(ctx.tracker.download(run_id, PREDICTIONS_ARTIFACT, tmp),
                                      dtype={"label": str, "predicted": str})
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


def upload_json(tracker: Tracker, run_id: str, name: str, payload: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, name).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        tracker.upload(run_id, Path(tmp, name))
