"""`predict`: batch predictions of any model for a data file; each shard of rows is a resumable unit.

A shard's predictions are logged as ``shards/shard-<i>.csv`` as soon as it is done; a resumed run
skips the shards already there. The parent run gets ``predictions.csv`` (``row_id``, ``label``,
``prob_<class>``...) and the predicted class distribution (``count_<label>``, ``pct_<label>``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipelines import faults
from pipelines.config import PredictConfig
from pipelines.data import DataError, Dataset, content_digest, read_table
from pipelines.inference import load_member, predict_proba
from pipelines.models import ModelError, ModelSource, folder_digest
from pipelines.serving import prediction_frame, validate_texts
from pipelines.stages.common import PREDICTIONS_ARTIFACT, log_once, open_stage, upload_frame
from pipelines.tracking import Tracker, download_model, load_pyfunc, registered_version

logger = logging.getLogger(__name__)
SHARDS = "shards"


def run(cfg: PredictConfig) -> dict[str, float]:
    frame = read_table(cfg.data)
    if cfg.text_column not in frame.columns:
        raise DataError(f"{cfg.data} has no column {cfg.text_column!r}; its columns are {list(frame.columns)}. "
                        "Pass text_column=<one of them>.")
    texts = pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[cfg.text_column].fillna("").astype(str)})
    data = Dataset(frame=texts, labels=[], digest=content_digest(texts, ["row_id", "text"]))
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-pred-") as tmp:
        source, predict = _load(cfg, Path(tmp))
        ctx = open_stage("predict", cfg, data, source, tracker)
        starts = range(0, len(texts), cfg.shard_size)
        done = _verified_shards(tracker, ctx.parent_id, starts, cfg.shard_size, len(texts), Path(tmp) / "check")
        if ctx.resumed:
            logger.info("resuming predict run %s: %d/%d shards done", ctx.parent_id, len(done), len(starts))
        for i, start in enumerate(tqdm(starts, desc="shards", unit="shard")):
            name = f"shard-{i:05d}.csv"
            if name in done:
                continue
            rows = texts.iloc[start:start + cfg.shard_size]
            result = predict(rows[["text"]].reset_index(drop=True))
            upload_frame(tracker, ctx.parent_id, name, pd.concat([rows[["row_id"]].reset_index(drop=True), result],
                                                                 axis=1), artifact_path=SHARDS)
            faults.failpoint("predict_shard")
        shards = tracker.download(ctx.parent_id, SHARDS, Path(tmp) / "shards")
        predictions = pd.concat([pd.read_csv(path, dtype={"label": str}) for path in sorted(shards.glob("*.csv"))])
        upload_frame(tracker, ctx.parent_id, PREDICTIONS_ARTIFACT, predictions)
        if cfg.output:
            predictions.to_csv(cfg.output, index=False)
        counts = predictions["label"].value_counts()
        summary = {**{f"count_{k}": int(v) for k, v in counts.items()},
                   **{f"pct_{k}": 100.0 * v / len(predictions) for k, v in counts.items()}}
        log_once(tracker, ctx.parent_id, summary)
        tracker.finish(ctx.parent_id)
    logger.info("predict run %s: %d rows, class distribution %s", ctx.parent_id, len(predictions), counts.to_dict())
    return summary


def _verified_shards(tracker: Tracker, run_id: str, starts: range, size: int, n_rows: int, tmp: Path) -> set[str]:
    """Names of the logged shards holding exactly their rows (a copy torn by a crash is done again)."""
    if not tracker.list_artifacts(run_id, SHARDS):
        return set()
    good = set()
    for path in tracker.download(run_id, SHARDS, tmp).glob("*.csv"):
        start = starts[int(path.stem.split("-")[1])]
        try:
            rows = pd.read_csv(path, usecols=["row_id"])["row_id"].tolist()
        except (ValueError, pd.errors.ParserError):
            rows = []
        if rows == list(range(start, min(start + size, n_rows))):
            good.add(path.name)
        else:
            logger.warning("shard %s of run %s is incomplete: it is predicted again", path.name, run_id)
    return good


def _load(cfg: PredictConfig, tmp: Path):
    """The model's identity for the fingerprint, and a DataFrame(text) -> DataFrame(label, prob_*) function."""
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
    if (local / "MLmodel").is_file():  # a pyfunc model, e.g. a registered ensemble
        model = load_pyfunc(str(local))
        return ModelSource(uri, str(local), identity), model.predict
    config = (local / "config.json").read_text() if (local / "config.json").is_file() else "{}"
    labels = [label for _, label in sorted(json.loads(config).get("id2label", {}).items(), key=lambda kv: int(kv[0]))]
    member = load_member(local, 1.0, labels, cfg.max_length)

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        return prediction_frame(predict_proba([member], validate_texts(frame), cfg.eval_batch_size), labels)

    return ModelSource(uri, str(local), identity), predict
