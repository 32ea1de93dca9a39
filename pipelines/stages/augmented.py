"""``augment_from``: the rows of an `augment` run joined to a training set without leaking validation rows.

An augmentation is a rewrite of one source row; joined to a fold whose *validation* set holds that row, it would
let the model train on (a paraphrase of) what it is scored on. So a unit's training set gets exactly the
augmentations whose ``source_row_id`` is one of its own training rows, and the unit run records which
(``augmentations_used.csv``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import pandas as pd

from pipelines.config import ConfigError, NotFound
from pipelines.data import read_table
from pipelines.stages.contract import StageContext, recorded_settings

logger = logging.getLogger(__name__)
AUGMENTED, ORIGINAL, USED = "augmented.csv", "original", "augmentations_used.csv"
_loaded: dict[tuple[str, str], pd.DataFrame] = {}


def with_augmentations(ctx: StageContext, run_id: str, train: pd.DataFrame) -> pd.DataFrame:
    """``train`` plus the augmentations of its rows (none without ``augment_from``)."""
    source = getattr(ctx.cfg, "augment_from", "")
    if not source:
        return train
    extra = augmentations(ctx, source)
    chosen = extra[extra["source_row_id"].isin(train["row_id"])]
    logger.info("augment_from=%s: %d augmentations of this unit's %d training rows joined (%d of validation rows "
                "left out)", source, len(chosen), len(train), len(extra) - len(chosen))
    with tempfile.TemporaryDirectory() as tmp:
        chosen[["source_row_id", "method"]].to_csv(Path(tmp, USED), index=False)
        ctx.tracker.upload(run_id, Path(tmp, USED))
    return pd.concat([train, chosen.drop(columns=["source_row_id", "method"])], ignore_index=True)


def augmentations(ctx: StageContext, source: str) -> pd.DataFrame:
    """The new rows of augment run ``source`` in the task's frame format, with ``source_row_id`` and ``method``."""
    key = (source, ctx.data.digest)
    if key not in _loaded:
        _loaded[key] = _load(ctx, source)
    return _loaded[key]


def _load(ctx: StageContext, source: str) -> pd.DataFrame:
    run = ctx.tracker.get_run(source)
    if run.data.tags.get("stage") != "augment" or run.info.status != "FINISHED":
        raise NotFound(f"augment_from={source} is not a finished augment run (stage "
                       f"{run.data.tags.get('stage')!r}, status {run.info.status}); run -e augment to the end first")
    used = recorded_settings(ctx.tracker, source)
    if used["text_column"] != ctx.cfg.text_column:
        raise ConfigError(f"augment run {source} rewrote column {used['text_column']!r}, this stage trains on "
                          f"text_column={ctx.cfg.text_column!r}: pass the same column")
    with tempfile.TemporaryDirectory() as tmp:
        path = ctx.tracker.download(source, AUGMENTED, tmp)
        raw = read_table(str(path))
        loaded = ctx.task.load(dataclasses.replace(ctx.cfg, data=str(path), max_samples=0)).frame
    meta = raw.iloc[loaded["row_id"].to_numpy()].reset_index(drop=True)
    loaded = loaded.assign(source_row_id=meta["source_row_id"].to_numpy(), method=meta["method"].to_numpy())
    _check_originals(ctx, source, loaded[loaded["method"] == ORIGINAL])
    extra = loaded[loaded["method"] != ORIGINAL].reset_index(drop=True)
    if "label_id" in extra.columns:  # the label ids of this stage's data
        ids = {label: i for i, label in enumerate(ctx.data.labels)}
        extra = extra[extra["label"].isin(ids)].assign(label_id=lambda f: f["label"].map(ids).astype(int))
    return extra.assign(row_id=-1 - pd.RangeIndex(len(extra)))  # never one of the data's row ids


def _check_originals(ctx: StageContext, source: str, originals: pd.DataFrame) -> None:
    """The augment run's source rows are this stage's rows, at the same positions (``row_id``)."""
    theirs = originals.set_index("source_row_id")["text"]
    ours = ctx.data.frame.set_index("row_id")["text"]
    if not ours.index.isin(theirs.index).all() or not (theirs.reindex(ours.index) == ours).all():
        raise ConfigError(f"augment run {source} augmented another data file (its original rows differ from "
                          f"{ctx.cfg.data}): pass the augment run of this data")
