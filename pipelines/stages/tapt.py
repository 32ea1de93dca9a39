"""`tapt`: masked-LM continued pretraining (task-adaptive) on unlabelled text; the parent run is its only unit.

Its ``model/`` (weights, config, tokenizer, no optimizer state) feeds the training stages through
``model=runs:/<run_id>/model`` or, registered, ``models:/<name>@<alias>``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from pipelines import tracking
from pipelines.config import TaptConfig
from pipelines.models import resolve_training_model
from pipelines.stages.common import log_once, run_as_unit
from pipelines.stages.contract import StageContext, open_stage
from pipelines.tasks import get_task
from pipelines.tracking import Tracker
from pipelines.training import FitResult

logger = logging.getLogger(__name__)
REPORTED = ("perplexity", "top1_accuracy", "top5_accuracy")


def run(cfg: TaptConfig) -> dict[str, float]:
    task = get_task(cfg.task)
    data = task.load(cfg)
    is_valid = np.zeros(len(data), dtype=bool)
    is_valid[task.holdout(data, cfg)] = True
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_training_model(cfg, Path(cache), task)
        ctx = open_stage("tapt", cfg, data, model, tracker)
        result = run_as_unit(ctx, data.frame[~is_valid], data.frame[is_valid], lambda r: publish(ctx, r))
    logger.info("tapt run %s finished: %s", ctx.parent_id, " ".join(f"{k}={result.metrics[k]:.4f}"
                                                                      for k in ("loss", *REPORTED)))
    return result.metrics


def publish(ctx: StageContext, result: FitResult) -> None:
    """The final model's metrics under their plain names (``eval_loss`` stays the Trainer's per-evaluation
    curve; the final model's loss is ``final_loss``, which differs from its last point with early stopping or
    SWA), the base model's (``base_*``: the evaluation at step 0), and the model registered when
    ``registered_model_name`` is set."""
    tracker, run_id = ctx.tracker, ctx.parent_id
    base = tracker.first_values(run_id, ["eval_loss", *(f"eval_{k}" for k in REPORTED)])
    log_once(tracker, run_id, {**{k: result.metrics[k] for k in REPORTED},
                               **{f"base_{k.removeprefix('eval_')}": v for k, v in base.items()}})
    if ctx.cfg.registered_model_name:
        register(ctx)


def register(ctx: StageContext) -> None:
    """Register ``runs:/<run>/model`` once (a resume after a crash in between does not register it again)."""
    name, cfg = ctx.cfg.registered_model_name, ctx.cfg
    versions = tracking.model_versions_of_run(name, ctx.parent_id)
    version = versions[-1] if versions else tracking.register_run_folder(ctx.parent_id, "model", name)
    if cfg.alias:
        tracking.set_alias(name, cfg.alias, version)
    ctx.tracker.set_tags(ctx.parent_id, {"registered_model": f"{name}/{version}"})
    logger.info("registered %s version %s%s", name, version, f" as @{cfg.alias}" if cfg.alias else "")
