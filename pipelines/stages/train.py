"""`train`: one model on a train/validation split; the parent run is its only unit."""

from __future__ import annotations

import logging

from pipelines.config import TrainConfig
from pipelines.stages.common import run_on_holdout

logger = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict[str, float]:
    ctx, result = run_on_holdout("train", cfg)
    logger.info("train run %s finished: %s", ctx.parent_id,
                " ".join(f"{k}={result.metrics[k]:.4f}" for k in ctx.task.metrics(cfg)))
    return result.metrics
