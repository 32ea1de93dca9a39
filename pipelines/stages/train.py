"""`train`: one model on a stratified train/validation split; the parent run is its only unit."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from pipelines.config import TrainConfig
from pipelines.data import holdout_split, load_dataset
from pipelines.models import resolve_model
from pipelines.stages.common import fit_unit, open_stage, restore_unit, unit_done
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict[str, float]:
    data = load_dataset(cfg.data, cfg.text_column, cfg.label_column, cfg.max_samples, cfg.fold_seed)
    is_valid = np.zeros(len(data), dtype=bool)
    is_valid[holdout_split(data, cfg.validation_fraction, cfg.fold_seed)] = True
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_model(cfg.model, Path(cache))
        ctx = open_stage("train", cfg, data, model, tracker)
        if ctx.resumed and unit_done(tracker.get_run(ctx.parent_id)):
            logger.info("train run %s already finished: nothing to do", ctx.parent_id)
            result = restore_unit(ctx, ctx.parent_id)
        else:
            if ctx.resumed:
                tags = tracker.get_run(ctx.parent_id).data.tags
                checkpoint = tags.get("checkpoint")
                logger.info("resuming train run %s from %s", ctx.parent_id,
                            f"epoch {tags.get('checkpoint_epoch')} checkpoint ({checkpoint})"
                            if checkpoint else "the start (no checkpoint)")
            frame = data.frame
            result = fit_unit(ctx, ctx.parent_id, frame[~is_valid], frame[is_valid])
        tracker.finish(ctx.parent_id)
    logger.info("train run %s finished: accuracy=%.4f f1_macro=%.4f", ctx.parent_id,
                result.metrics["accuracy"], result.metrics["f1_macro"])
    return result.metrics
