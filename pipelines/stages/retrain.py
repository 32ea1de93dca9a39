"""`retrain`: one model on all the data with the parameters of an optuna or kfold run; resumable like `train`."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipelines.config import RetrainConfig
from pipelines.errors import ConfigError
from pipelines.models import resolve_training_model
from pipelines.stages.common import run_as_unit
from pipelines.stages.contract import open_stage
from pipelines.tasks import get_task
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)


def run(cfg: RetrainConfig) -> dict[str, float]:
    if not cfg.params_from and not cfg.epochs:
        raise ConfigError("retrain needs params_from=<optuna or kfold run id|latest> or an explicit epochs=N")
    task = get_task(cfg.task)
    data = task.load(cfg)
    with tempfile.TemporaryDirectory(prefix="pipelines-model-") as cache, Tracker(cfg.experiment_name) as tracker:
        model = resolve_training_model(cfg, Path(cache), task, tracker, "retrain")
        ctx = open_stage("retrain", cfg, data, model, tracker)
        logger.info("retrain on all %d rows for %d epochs with %s", len(data), ctx.cfg.epochs,
                    {k: getattr(ctx.cfg, k) for k in ("learning_rate", "batch_size", "weight_decay")})
        run_as_unit(ctx, data.frame, None)
    return {"epochs": ctx.cfg.epochs}
