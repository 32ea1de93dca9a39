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

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import AutoConfig

from pipelines.config import GENERATION, PredictConfig
from pipelines.data import DataError, Dataset, content_digest, folder_digest, read_artifact_csv, read_table
from pipelines.errors import ConfigError
from pipelines.generation import generate, generation_config, is_seq2seq, load_summarizer
from pipelines.inference import load_member, predict_proba
from pipelines.models import ModelError, ModelSource
from pipelines.serving import prediction_frame, pyfunc_task, validate_texts
from pipelines.stages.common import PREDICTIONS_ARTIFACT
from pipelines.stages.contract import open_stage
from pipelines.stages.shards import Shards, finish
from pipelines.tasks.base import TRAINED_WITH
from pipelines.tracking import Tracker, download_model, load_pyfunc, registered_version

logger = logging.getLogger(__name__)
PREDICTION = {"classification": "label", "summarization": "generated"}  # task -> the column holding the prediction
TEXT_OUTPUTS = tuple(PREDICTION.values())  # prediction columns read back as text
# what transformers' generate() does with a generation setting the model leaves unset (None)
UNSET_GENERATION = {"min_new_tokens": 0, "num_beams": 1, "repetition_penalty": 1.0, "length_penalty": 1.0,
                    "no_repeat_ngram_size": 0}


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
        shards = Shards(ctx, texts, cfg.shard_size, Path(tmp) / "check", read=read_predictions)
        predictions = shards.run(lambda rows: pd.concat([rows[["row_id"]], model.predict(rows[["text"]])], axis=1))
        summary = model.summarize(predictions)
        finish(ctx, {PREDICTIONS_ARTIFACT: predictions}, summary)
    if cfg.output:
        predictions.to_csv(cfg.output, index=False)
    logger.info("predict run %s: %d rows, %s", ctx.parent_id, len(predictions), summary)
    return summary


def read_predictions(path: Path) -> pd.DataFrame:
    return read_artifact_csv(path, TEXT_OUTPUTS)


@dataclass
class Model:
    """What predict needs of a model: its identity, the settings it resolves, and its two functions."""

    source: ModelSource
    cfg: PredictConfig  # with the model's own values for the settings left at 0
    task: str  # classification (predicts ``label``) or summarization (``generated``), as the model recorded it
    predict: Callable[[pd.DataFrame], pd.DataFrame]  # DataFrame(text) -> its predictions, one row per text
    summarize: Callable[[pd.DataFrame], dict[str, float]]  # all predictions -> summary metrics


def load_model(cfg: PredictConfig, tmp: Path) -> Model:
    """The model named by ``model_uri``: a pyfunc ensemble (either task), a summarizer or a classifier."""
    source = _fetch(cfg.model_uri, tmp)
    if Path(source.path, "MLmodel").is_file():
        return _pyfunc(cfg, source)
    if _recorded_task(source) == "summarization":
        return _summarizer(cfg, source)
    return _classifier(cfg, source)


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


def _recorded_task(source: ModelSource) -> str:
    """The task a transformers folder does: the one a stage trained it for (``pipelines.json``), else what its
    config says it is (a seq2seq model, or a sequence classifier). Anything else is refused, never guessed: a
    masked-LM model (``tapt``) or a bare encoder would predict with a random head."""
    marker = Path(source.path, TRAINED_WITH)
    task = json.loads(marker.read_text()).get("task") if marker.is_file() else None
    if task == "mlm":
        raise ModelError(f"model {source.name} is a masked-LM model (trained with task=mlm, e.g. by tapt): it predicts "
                         "no labels or summaries. Fine-tune it first (-e train or -e kfold with -P model=<its URI>) "
                         "and predict with that model")
    if task in PREDICTION:
        return task
    config = AutoConfig.from_pretrained(source.path)
    if is_seq2seq(config):
        return "summarization"
    if any(name.endswith("ForSequenceClassification") for name in config.architectures or ()):
        return "classification"
    raise ModelError(f"model {source.name} records no task this stage predicts ({TRAINED_WITH}: {task!r}) and its "
                     f"architectures {config.architectures} are neither a sequence classifier nor a seq2seq model: "
                     "fine-tune it first (-e train or -e kfold with -P model=<it>) and predict with that model")


def _pyfunc(cfg: PredictConfig, source: ModelSource) -> Model:
    """A pyfunc ensemble this project logged; its task is the one its recorded output signature names."""
    task = pyfunc_task(source.path)
    if task is None:
        raise ModelError(f"model {source.name} is a pyfunc model whose signature records neither a 'label' nor a "
                         "'summary' output: it is not an ensemble logged by this project. Pass an ensemble's "
                         "models:/<name>@<alias>, a runs:/<run id>/model of a train/kfold fold run, or a model folder")
    own = {name: getattr(cfg, name) for name in ("max_length", *GENERATION) if getattr(cfg, name)}
    if own:
        raise ConfigError(f"model {source.name} is a {task} ensemble: its members keep the lengths and generation "
                          f"settings they were trained with, so {', '.join(f'{k}={v}' for k, v in own.items())} "
                          "would be ignored; remove them")
    model = load_pyfunc(source.path)
    if task == "classification":
        return Model(source, cfg, task, model.predict, _class_counts)
    return Model(source, cfg, task, lambda frame: model.predict(frame).rename(columns={"summary": "generated"}),
                 _summary_lengths)


def _classifier(cfg: PredictConfig, source: ModelSource) -> Model:
    config = json.loads(Path(source.path, "config.json").read_text())
    labels = [label for _, label in sorted(config.get("id2label", {}).items(), key=lambda kv: int(kv[0]))]
    cfg = dataclasses.replace(cfg, max_length=cfg.max_length or _trained_length(source))
    member = load_member(source.path, 1.0, labels, cfg.max_length)

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        return prediction_frame(predict_proba([member], validate_texts(frame), cfg.eval_batch_size), labels)

    return Model(source, cfg, "classification", predict, _class_counts)


def _summarizer(cfg: PredictConfig, source: ModelSource) -> Model:
    network, tokenizer = load_summarizer(source.path)
    resolved = {name: getattr(cfg, name) or getattr(network.generation_config, name) for name in GENERATION}
    if not resolved["max_new_tokens"]:
        raise ConfigError(f"model {source.name} records no max_new_tokens (it was not trained by a pipelines stage); "
                          "pass max_new_tokens=N (and num_beams, ... as wanted)")
    resolved = {name: UNSET_GENERATION.get(name) if value is None else value for name, value in resolved.items()}
    cfg = dataclasses.replace(cfg, **resolved, max_length=cfg.max_length or _trained_length(source))
    generation = generation_config(network, cfg)
    logger.info("summarizer %s: generation %s, source truncated to %d tokens", source.name, resolved, cfg.max_length)

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        texts = validate_texts(frame)
        return pd.DataFrame({"generated": generate(network, tokenizer, texts, generation, cfg.eval_batch_size,
                                                   cfg.max_length)})

    return Model(source, cfg, "summarization", predict, _summary_lengths)


def _trained_length(source: ModelSource) -> int:
    """The input length a stage trained the model with (``pipelines.json`` beside it): never a guess."""
    marker = Path(source.path, TRAINED_WITH)
    if not marker.is_file():
        raise ConfigError(f"model {source.name} has no {TRAINED_WITH} (it was not saved by a pipelines stage of this "
                          "version), so the input length it was trained with is unknown: pass max_length=N")
    return int(json.loads(marker.read_text())["max_length"])


def _summary_lengths(predictions: pd.DataFrame) -> dict[str, float]:
    return {"rows": len(predictions), "generated_chars_mean": float(predictions["generated"].str.len().mean())}


def _class_counts(predictions: pd.DataFrame) -> dict[str, float]:
    counts = predictions["label"].value_counts()
    return {**{f"count_{k}": int(v) for k, v in counts.items()},
            **{f"pct_{k}": 100.0 * v / len(predictions) for k, v in counts.items()}}
