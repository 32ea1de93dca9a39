"""`tapt`: masked-LM continued pretraining (task-adaptive) on unlabelled text; the parent run is its only unit.

Its ``model/`` (weights, config, tokenizer, no optimizer state) feeds the training stages through
``model=runs:/<run_id>/model`` or, registered, ``models:/<name>@<alias>``.
"""

from __future__ import annotations

import logging

from pipelines import tracking
from pipelines.config import TaptConfig
from pipelines.stages.common import log_once, run_on_holdout
from pipelines.stages.contract import StageContext
from pipelines.training import FitResult

logger = logging.getLogger(__name__)
REPORTED = ("perplexity", "top1_accuracy", "top5_accuracy")


def run(cfg: TaptConfig) -> dict[str, float]:
    ctx, result = run_on_holdout("tapt", cfg, publish)
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
