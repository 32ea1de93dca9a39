"""`train`: one model on a train/validation split; the parent run is its only unit."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from pipelines.config import TrainConfig
from pipelines.models import resolve_training_model
from pipelines.stages.common import run_as_unit
from pipelines.stages.contract import open_stage
from pipelines.tasks import get_task
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict[str, float]:
    task = get_task(cfg.task)
    data = task.load(cfg)
    is_valid = np.zeros(len(data), dtype=bool)
    is_valid[task.holdout(data, cfg)] = True
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_training_model(cfg, Path(cache), task)
        ctx = open_stage("train", cfg, data, model, tracker)
        result = run_as_unit(ctx, data.frame[~is_valid], data.frame[is_valid])
    logger.info("train run %s finished: %s", ctx.parent_id,
                " ".join(f"{k}={result.metrics[k]:.4f}" for k in task.summary_metrics))
    return result.metrics
