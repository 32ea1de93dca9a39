"""`predict`: batch predictions of any model for a data file; each shard of rows is a resumable unit.

A shard's predictions are logged as ``shards/shard-<i>.csv`` (pipelines/stages/shards.py) as soon as it is done;
a resumed run skips the shards already there. The parent run gets ``predictions.csv``: for a classifier (or a
classification ensemble) ``row_id``, ``label``, ``prob_<class>``... and the predicted class distribution
(``count_<label>``, ``pct_<label>``); for a summarizer (or a summary ensemble, with the ``member`` it chose)
``row_id``, ``generated`` and the mean summary length.

What a model does is read from what it recorded before anything runs: a pyfunc model's output signature, a folder's
``pipelines.json`` (the task it was trained for) or, for a folder not trained here, its transformers config.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import PredictConfig
from pipelines.data import DataError, Dataset, content_digest, folder_digest, read_table
from pipelines.errors import ConfigError
from pipelines.models import ModelError, ModelSource
from pipelines.serving import pyfunc_task
from pipelines.stages.common import PREDICTIONS_ARTIFACT
from pipelines.stages.contract import open_stage
from pipelines.stages.shards import Shards, finish
from pipelines.tasks import get_task
from pipelines.tasks.base import LoadedModel
from pipelines.tasks.recorded import folder_task
from pipelines.tasks.summarization.settings import GENERATION
from pipelines.tracking import Tracker, download_model, load_pyfunc, registered_version

logger = logging.getLogger(__name__)


def run(cfg: PredictConfig) -> dict[str, float]:
    frame = read_table(cfg.data)
    if cfg.text_column not in frame.columns:
        raise DataError(f"{cfg.data} has no column {cfg.text_column!r}; its columns are {list(frame.columns)}. "
                        "Pass text_column=<one of them>.")
    texts = pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[cfg.text_column].fillna("").astype(str)})
    data = Dataset(frame=texts, labels=[], digest=content_digest(texts, ["row_id", "text"]))
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-pred-") as tmp:
        model = load_model(cfg, Path(tmp))
        ctx = open_stage("predict", model.cfg, data, model.source, tracker)
        shards = Shards(ctx, texts, cfg.shard_size, Path(tmp) / "check",
                        read=get_task(model.task).read_predictions)  # the predictions: labels and text, verbatim
        predictions = shards.run(lambda rows: pd.concat([rows[["row_id"]], model.predict(rows[["text"]])], axis=1))
        summary = model.summarize(predictions)
        finish(ctx, {PREDICTIONS_ARTIFACT: predictions}, summary)
    if cfg.output:
        predictions.to_csv(cfg.output, index=False)
    logger.info("predict run %s: %d rows, %s", ctx.parent_id, len(predictions), summary)
    return summary


def load_model(cfg: PredictConfig, tmp: Path) -> LoadedModel:
    """The model named by ``model_uri``: a pyfunc ensemble, or a model folder of the task it recorded."""
    source = _fetch(cfg.model_uri, tmp)
    if Path(source.path, "MLmodel").is_file():
        return _pyfunc(cfg, source)
    return folder_task(source).load_model(cfg, source)


def _fetch(uri: str, tmp: Path) -> ModelSource:
    """The model's local folder and identity (registered version, run URI or content digest)."""
    if uri.startswith(("models:/", "runs:/")):
        try:
            local = download_model(uri, tmp / "model")
        except FileNotFoundError as exc:
            raise ModelError(f"{exc}; check the run id / registered model name and alias") from None
        identity = registered_version(uri) if uri.startswith("models:/") else uri  # run artifacts do not change
    else:
        local = Path(uri)
        if not local.is_dir():
            raise ModelError(f"model_uri {uri} is neither models:/..., runs:/... nor an existing folder")
        identity = folder_digest(local, recursive=True)
    if not (local / "MLmodel").is_file() and not (local / "config.json").is_file():
        raise ModelError(f"model_uri {uri}: {local} has neither MLmodel nor config.json; pass a model logged by a "
                         "stage (runs:/<run id>/model) or a transformers model folder")
    return ModelSource(uri, str(local), identity)


def _pyfunc(cfg: PredictConfig, source: ModelSource) -> LoadedModel:
    """A pyfunc ensemble this project logged; its task is the one its recorded output signature names."""
    recorded = pyfunc_task(source.path)
    if recorded is None:
        raise ModelError(f"model {source.name} is a pyfunc model whose signature records neither a 'label' nor a "
                         "'summary' output: it is not an ensemble logged by this project. Pass an ensemble's "
                         "models:/<name>@<alias>, a runs:/<run id>/model of a train/kfold fold run, or a model folder")
    own = {name: getattr(cfg, name) for name in ("max_length", *GENERATION) if getattr(cfg, name)}
    if own:
        raise ConfigError(f"model {source.name} is a {recorded} ensemble: its members keep the lengths and generation "
                          f"settings they were trained with, so {', '.join(f'{k}={v}' for k, v in own.items())} "
                          "would be ignored; remove them")
    return get_task(recorded).pyfunc_model(cfg, source, load_pyfunc(source.path))
