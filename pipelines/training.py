"""One fine-tuning run on the transformers Trainer (the task supplies model, data and metrics), tracked and resumable.

MLflow metrics, checkpoint upload and the kill-test failpoint are Trainer callbacks; early
stopping is the built-in ``EarlyStoppingCallback``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainerState, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from pipelines import faults, techniques, warmstart
from pipelines.checkpoints import CheckpointStore
from pipelines.config import StageConfig
from pipelines.data import Dataset
from pipelines.errors import UserError
from pipelines.models import ModelSource
from pipelines.tasks.base import Task
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    metrics: dict[str, float]  # the task's validation metrics and loss; epochs trained, best epoch
    predictions: pd.DataFrame | None  # the task's predictions frame, row_id first (None without validation rows)


class MlflowMetrics(TrainerCallback):
    """Trainer logs -> MLflow metrics of the unit run; a (key, step) is logged once, even across a resume."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id
        self.logged = tracker.logged_steps(run_id)

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and k != "total_flos"}
        if state.epoch is not None:
            metrics["epoch"] = state.epoch
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        self.tracker.log_metrics(self.run_id, fresh, step=step)
        self.logged.update(dict.fromkeys(fresh, step))

    def on_train_begin(self, args, state, control, **kwargs):
        logger.info("training starts at step %d of %d run=%s", state.global_step, state.max_steps, self.run_id)

    def on_step_end(self, args, state, control, **kwargs):
        faults.failpoint("train_step")

    def on_prediction_step(self, args, state, control, **kwargs):
        faults.failpoint("predict_step")  # each batch of evaluation or of the final validation predictions


class TrainingDiverged(UserError):
    """A training step gave a non-finite loss or gradient: the unit fails before any checkpoint holds that step."""


class RefuseNonFinite(TrainerCallback):
    """Fail the unit at the first optimizer step whose gradients are not finite (NaN or inf: a non-finite loss gives
    them too), before the optimizer applies them, and at a logged ``loss`` or ``grad_norm`` that is not finite
    (``logging_nan_inf_filter`` is off, so a NaN loss is logged as NaN); both come before the step's checkpoint
    is saved, so no checkpoint of a diverged model is ever committed."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.stack([grad.norm().to(grads[0].device) for grad in grads]).norm()  # one sync per step
        if not torch.isfinite(norm):
            self._refuse(state.global_step + 1, state.epoch, f"the gradient (norm {norm.item()})", model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
        if bad:
            self._refuse(state.global_step, state.epoch, " and ".join(f"the logged {k} ({v})" for k, v in bad.items()),
                         model)

    def _refuse(self, step: int, epoch: float | None, what: str, model) -> None:
        cfg = self.cfg
        suspects = [f"learning_rate={cfg.learning_rate:g} too high (lower it, or raise warmup_ratio="
                    f"{cfg.warmup_ratio:g})"]
        if getattr(cfg, "loss", "") == "focal":  # a setting of the tasks that train with the focal loss
            suspects.append(f"loss=focal with focal_gamma={cfg.focal_gamma:g}")
        dtype = next(model.parameters()).dtype if model is not None else torch.float32
        if dtype != torch.float32:
            suspects.append(f"the model's {dtype} precision (load it in float32)")
        raise TrainingDiverged(
            f"training diverged at step {step} (epoch {epoch or 0:.2f}): {what} is not finite, and no checkpoint "
            f"holds this step. Likely cause: {'; '.join(suspects)}; max_grad_norm="
            f"{cfg.max_grad_norm:g}. Change the setting and start a new run (resume=false).")


class UploadCheckpoints(TrainerCallback):
    """Each Trainer save -> a verified copy in the artifact store (latest and best kept), uploaded while training
    goes on."""

    def __init__(self, store: CheckpointStore):
        self.store = store

    def on_save(self, args, state, control, **kwargs):
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.store.commit(local, state.epoch, state.best_model_checkpoint)


def fit(
    cfg: StageConfig,
    task: Task,
    model: ModelSource,
    data: Dataset,
    train: pd.DataFrame,
    valid: pd.DataFrame | None,
    tracker: Tracker,
    run_id: str,
    store: CheckpointStore,
    work_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
    save_model: bool = True,
) -> FitResult:
    """Train on ``train``, evaluate every epoch (or ``save_steps``) on ``valid``; resume from ``store``.

    With ``valid=None`` (full-data retraining) nothing is evaluated and no early stopping applies.
    """
    output_dir = work_dir / "trainer"
    checkpoint = store.restore(output_dir)
    set_seed(cfg.seed)
    built = task.build(cfg, model.path, data)
    if checkpoint is None and model.init is not None:
        warmstart.load_weights(built.network, model.init, cfg.init_ema)
    averages = techniques.averaging_callbacks(cfg, checkpoint)
    # the caller's callbacks first: a lost lease must stop a worker before it logs or uploads anything; the
    # averages before the upload: their state goes into each checkpoint folder
    callbacks = [*(callbacks or []), RefuseNonFinite(cfg), *averages, MlflowMetrics(tracker, run_id),
                 UploadCheckpoints(store)]
    if cfg.early_stopping_patience and valid is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = task.trainer(cfg, built, _arguments(cfg, output_dir, validate=valid is not None), train, valid,
                           callbacks)
    techniques.install(cfg, trainer, averages, task.loss(cfg, data, train))
    start = checkpoint or _continue_from(cfg, model, trainer, work_dir)
    if checkpoint is not None:
        trainer.args.eval_on_start = False  # the evaluation before training was logged by the first attempt
    if checkpoint and _stopped(checkpoint):
        _finish_stopped(trainer, checkpoint, run_id, averages)
    else:
        _train(trainer, store, start)
    if save_model:
        model_dir = work_dir / "model"
        task.save(trainer, built, model_dir, cfg)
        tracker.upload(run_id, model_dir, "model", link=True)
    if valid is None:
        return FitResult(metrics={"epochs_trained": trainer.state.epoch}, predictions=None)
    metrics, predictions = task.evaluate(trainer, built, valid, cfg, data)
    metrics.update(epochs_trained=trainer.state.epoch,
                   best_epoch=_best_epoch(trainer.state.log_history, cfg.metric, cfg.greater_is_better()))
    return FitResult(metrics=metrics, predictions=predictions)


def _train(trainer: Trainer, store: CheckpointStore, start: Path | None) -> None:
    """``trainer.train``, then the last checkpoint upload committed. When training fails or is interrupted (also
    while it waits for an upload), the upload in flight stops before its next file."""
    try:
        trainer.train(resume_from_checkpoint=str(start) if start else None)
        store.wait()
    except BaseException:
        store.cancel()
        raise


def _continue_from(cfg: StageConfig, model: ModelSource, trainer: Trainer, work_dir: Path) -> Path | None:
    """With ``init_from`` and ``init_epoch=continue``: a checkpoint folder at its epoch, from which training starts
    with its learning-rate schedule moved on to that step."""
    if model.init is None or cfg.init_epoch != "continue":
        return None
    folder, step = warmstart.continue_folder(trainer, model.init, cfg, work_dir / "init")
    trainer.add_callback(techniques.ScheduleFrom(step))
    return folder


def _arguments(cfg: StageConfig, output_dir: Path, validate: bool) -> dict:
    """The TrainingArguments fields every task shares."""
    strategy = "steps" if cfg.save_steps else "epoch"
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        lr_scheduler_type=cfg.scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        eval_strategy=strategy if validate else "no",
        save_strategy=strategy,
        eval_steps=cfg.save_steps or None,
        save_steps=cfg.save_steps or None,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (RefuseNonFinite), not as the mean before it
        load_best_model_at_end=cfg.early_stopping_patience > 0 and validate,
        metric_for_best_model=f"eval_{cfg.metric}" if validate else None,
        greater_is_better=cfg.greater_is_better(),
        report_to="none",
        restore_callback_states_from_checkpoint=True,  # early stopping's patience counter survives a resume
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _stopped(checkpoint: Path) -> bool:
    """Whether training had decided to stop (early stopping) when ``checkpoint`` was saved."""
    state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {})
    return bool(control.get("args", {}).get("should_training_stop"))


def _finish_stopped(trainer: Trainer, checkpoint: Path, run_id: str, averages: list) -> None:
    """End a run whose process died after early stopping's last checkpoint, without training another step
    (``trainer.train`` would reset the stop decision and train on): the state and the model that the end of
    training would have left (the best checkpoint's weights with ``load_best_model_at_end``)."""
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    best = trainer.state.best_model_checkpoint
    source = Path(best) if trainer.args.load_best_model_at_end and best else checkpoint
    loaded = type(trainer.model).from_pretrained(str(source))
    trainer.model.load_state_dict(loaded.state_dict())
    for average in averages:  # the EMA of that checkpoint, as the end of training would have left it
        average.load(source / average.FILE, trainer.model)
        average.copy_into(trainer.model)
    logger.info("training had already stopped at step %d run=%s: finishing from %s without training",
                trainer.state.global_step, run_id, source.name)


def _best_epoch(history: list[dict], metric: str, greater_is_better: bool) -> float:
    """Epoch of the best evaluation of ``metric`` (the first one on ties)."""
    evals = [(entry[f"eval_{metric}"], entry["epoch"]) for entry in history if f"eval_{metric}" in entry]
    sign = 1 if greater_is_better else -1
    return max(evals, key=lambda pair: sign * pair[0])[1] if evals else 0.0
