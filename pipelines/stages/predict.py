"""`predict`: batch predictions of any model for a data file; each shard of rows is a resumable unit.

A shard's predictions are logged as ``shards/shard-<i>.csv`` as soon as it is done; a resumed run
skips the shards already there. The parent run gets ``predictions.csv``: for a classifier (or a pyfunc
ensemble) ``row_id``, ``label``, ``prob_<class>``... and the predicted class distribution (``count_<label>``,
``pct_<label>``); for a summarizer ``row_id``, ``generated`` and the mean summary length.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from transformers import AutoConfig

from pipelines import faults
from pipelines.config import GENERATION, ConfigError, PredictConfig
from pipelines.data import DataError, Dataset, content_digest, read_table
from pipelines.inference import load_member, predict_proba
from pipelines.models import ModelError, ModelSource, folder_digest
from pipelines.serving import prediction_frame, validate_texts
from pipelines.stages.common import PREDICTIONS_ARTIFACT, log_once, share_units, upload_frame
from pipelines.stages.contract import open_stage
from pipelines.tasks.base import TRAINED_WITH
from pipelines.tasks.summarization import generate, generation_config, is_seq2seq, load_summarizer
from pipelines.tracking import Tracker, download_model, load_pyfunc, registered_version

logger = logging.getLogger(__name__)
SHARDS = "shards"
TEXT_OUTPUTS = ("label", "generated")  # prediction columns read back as text
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
        model = _load(cfg, Path(tmp))
        ctx = open_stage("predict", model.cfg, data, model.source, tracker)
        shards = Shards(ctx, texts, cfg.shard_size, Path(tmp) / "check")
        if ctx.resumed:
            logger.info("resuming predict run %s: %d/%d shards done", ctx.parent_id, len(shards.done), len(shards))
        share_units(ctx, len(shards), lambda i: shards.attempt(i, model.predict), "shards")
        with ctx.leases.wait_for(ctx.parent_id, "finish"):  # workers that end together finish it once
            local = tracker.download(ctx.parent_id, SHARDS, Path(tmp) / "shards")
            predictions = pd.concat([pd.read_csv(path, dtype=dict.fromkeys(TEXT_OUTPUTS, str), keep_default_na=False)
                                     for path in sorted(local.glob("*.csv"))])
            upload_frame(tracker, ctx.parent_id, PREDICTIONS_ARTIFACT, predictions)
            if cfg.output:
                predictions.to_csv(cfg.output, index=False)
            summary = model.summarize(predictions)
            log_once(tracker, ctx.parent_id, summary)
            tracker.finish(ctx.parent_id)
    logger.info("predict run %s: %d rows, %s", ctx.parent_id, len(predictions), summary)
    return summary


class Shards:
    """The shards of rows of a predict run: ``shards/shard-<i>.csv`` artifacts, each done under its lease."""

    def __init__(self, ctx, texts: pd.DataFrame, size: int, tmp: Path):
        self.ctx, self.texts, self.size, self.tmp = ctx, texts, size, tmp
        self.starts = range(0, len(texts), size)
        listed = {Path(p).name for p in ctx.tracker.list_artifacts(ctx.parent_id, SHARDS)}
        self.done = {i for i in range(len(self)) if self.name(i) in listed and self._verified(i, listed)}

    def __len__(self) -> int:
        return len(self.starts)

    @staticmethod
    def name(i: int) -> str:
        return f"shard-{i:05d}.csv"

    def attempt(self, i: int, predict) -> bool | None:
        """True once shard ``i`` is done (by this worker now, or before); None while another worker holds it."""
        if i in self.done:
            return True
        lease = self.ctx.leases.acquire(self.ctx.parent_id, f"shard-{i}")
        if lease is None:
            return None
        with lease:
            if not self._verified(i):  # another worker may have finished it meanwhile
                rows = self.texts.iloc[self.starts[i]:self.starts[i] + self.size].reset_index(drop=True)
                result = pd.concat([rows[["row_id"]], predict(rows[["text"]])], axis=1)
                lease.check()
                upload_frame(self.ctx.tracker, self.ctx.parent_id, self.name(i), result, artifact_path=SHARDS)
                faults.failpoint("predict_shard")
        self.done.add(i)
        return True

    def _verified(self, i: int, listed: set[str] | None = None) -> bool:
        """Whether shard ``i`` is logged and holds exactly its rows (a copy torn by a crash is done again)."""
        name, run_id = self.name(i), self.ctx.parent_id
        if listed is None:
            listed = {Path(p).name for p in self.ctx.tracker.list_artifacts(run_id, SHARDS)}
        if name not in listed:
            return False
        try:
            local = self.ctx.tracker.download(run_id, f"{SHARDS}/{name}", self.tmp)
            rows = pd.read_csv(local, usecols=["row_id"])["row_id"].tolist()
        except (ValueError, pd.errors.ParserError, OSError):
            rows = []
        start = self.starts[i]
        if rows == list(range(start, min(start + self.size, len(self.texts)))):
            return True
        logger.warning("shard %s of run %s is incomplete: it is predicted again", name, run_id)
        return False


@dataclass
class Model:
    """What predict needs of a model: its identity, the settings it resolves, and its two functions."""

    source: ModelSource
    cfg: PredictConfig  # with the model's own values for the settings left at 0
    predict: Callable[[pd.DataFrame], pd.DataFrame]  # DataFrame(text) -> its predictions, one row per text
    summarize: Callable[[pd.DataFrame], dict[str, float]]  # all predictions -> summary metrics


def _load(cfg: PredictConfig, tmp: Path) -> Model:
    """The model named by ``model_uri``: a pyfunc (e.g. a registered ensemble), a summarizer or a classifier."""
    uri = cfg.model_uri
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
    source = ModelSource(uri, str(local), identity)
    if (local / "MLmodel").is_file():
        return Model(source, cfg, load_pyfunc(str(local)).predict, _class_counts)
    if not (local / "config.json").is_file():
        raise ModelError(f"model_uri {uri}: {local} has neither MLmodel nor config.json; pass a model logged by a "
                         "stage (runs:/<run id>/model) or a transformers model folder")
    if is_seq2seq(AutoConfig.from_pretrained(local)):
        return _summarizer(cfg, source)
    return _classifier(cfg, source)


def _classifier(cfg: PredictConfig, source: ModelSource) -> Model:
    config = json.loads(Path(source.path, "config.json").read_text())
    labels = [label for _, label in sorted(config.get("id2label", {}).items(), key=lambda kv: int(kv[0]))]
    cfg = dataclasses.replace(cfg, max_length=cfg.max_length or _trained_length(source))
    member = load_member(source.path, 1.0, labels, cfg.max_length)

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        return prediction_frame(predict_proba([member], validate_texts(frame), cfg.eval_batch_size), labels)

    return Model(source, cfg, predict, _class_counts)


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

    def summarize(predictions: pd.DataFrame) -> dict[str, float]:
        return {"rows": len(predictions), "generated_chars_mean": float(predictions["generated"].str.len().mean())}

    return Model(source, cfg, predict, summarize)


def _trained_length(source: ModelSource) -> int:
    """The input length a stage trained the model with (``pipelines.json`` beside it): never a guess."""
    marker = Path(source.path, TRAINED_WITH)
    if not marker.is_file():
        raise ConfigError(f"model {source.name} has no {TRAINED_WITH} (it was not saved by a pipelines stage of this "
                          "version), so the input length it was trained with is unknown: pass max_length=N")
    return int(json.loads(marker.read_text())["max_length"])


def _class_counts(predictions: pd.DataFrame) -> dict[str, float]:
    counts = predictions["label"].value_counts()
    return {**{f"count_{k}": int(v) for k, v in counts.items()},
            **{f"pct_{k}": 100.0 * v / len(predictions) for k, v in counts.items()}}
