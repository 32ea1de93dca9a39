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

from pipelines import faults
from pipelines.config import PredictConfig
from pipelines.data import DataError, Dataset, content_digest, read_table
from pipelines.inference import load_member, predict_proba
from pipelines.models import ModelError, ModelSource, folder_digest
from pipelines.serving import prediction_frame, validate_texts
from pipelines.stages.common import PREDICTIONS_ARTIFACT, log_once, share_units, upload_frame
from pipelines.stages.contract import open_stage
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
        shards = Shards(ctx, texts, cfg.shard_size, Path(tmp) / "check")
        if ctx.resumed:
            logger.info("resuming predict run %s: %d/%d shards done", ctx.parent_id, len(shards.done), len(shards))
        share_units(ctx, len(shards), lambda i: shards.attempt(i, predict), "shards")
        with ctx.leases.wait_for(ctx.parent_id, "finish"):  # workers that end together finish it once
            local = tracker.download(ctx.parent_id, SHARDS, Path(tmp) / "shards")
            predictions = pd.concat([pd.read_csv(path, dtype={"label": str}) for path in sorted(local.glob("*.csv"))])
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
