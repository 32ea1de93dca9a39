"""`train`: one model on a stratified train/validation split; the parent run is its only unit."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from pipelines.config import TrainConfig
from pipelines.data import holdout_split, load_dataset
from pipelines.models import resolve_model
from pipelines.stages.common import run_as_unit
from pipelines.stages.contract import open_stage
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict[str, float]:
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column, cfg.max_samples, cfg.fold_seed)
    is_valid = np.zeros(len(data), dtype=bool)
    is_valid[holdout_split(data, cfg.validation_fraction, cfg.fold_seed)] = True
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_model(cfg.model, Path(cache))
        ctx = open_stage("train", cfg, data, model, tracker)
        result = run_as_unit(ctx, data.frame[~is_valid], data.frame[is_valid])
    logger.info("train run %s finished: accuracy=%.4f f1_macro=%.4f", ctx.parent_id,
                result.metrics["accuracy"], result.metrics["f1_macro"])
    return result.metrics
