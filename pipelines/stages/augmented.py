"""``augment_from``: the rows of an `augment` run joined to a training set without leaking validation rows.

An augmentation is a rewrite of one source row; joined to a fold whose *validation* set holds that row, it would
let the model train on (a paraphrase of) what it is scored on. So a unit's training set gets exactly the
augmentations whose ``source_row_id`` is one of its own training rows, and the unit run records which
(``augmentations_used.csv``).

Only the new *text* comes from the augment run. Every other column training uses (the label, the summary target,
the group) is the source row's value in this stage's data, so a label corrected after augmenting reaches its
augmentations too, and the unit's fingerprint covers everything it trains on: the augment run id (its
``augmented.csv`` never changes once the run has finished) and the data digest (text, labels, targets).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import pandas as pd

from pipelines.data import read_artifact_csv
from pipelines.errors import ConfigError, NotFound
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
    """The new rows of augment run ``source`` in the task's frame format, with ``source_row_id`` and ``method``;
    every column but the text is this stage's data's (see :func:`_with_current_columns`)."""
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
        raw = read_artifact_csv(path, ("method",))  # source_row_id stays a number
        loaded = ctx.task.load(dataclasses.replace(ctx.cfg, data=str(path), max_samples=0)).frame
    meta = raw.iloc[loaded["row_id"].to_numpy()].reset_index(drop=True)
    loaded = loaded.assign(source_row_id=meta["source_row_id"].to_numpy(), method=meta["method"].to_numpy())
    _check_originals(ctx, source, loaded[loaded["method"] == ORIGINAL])
    return _with_current_columns(ctx, source, loaded[loaded["method"] != ORIGINAL])


def _with_current_columns(ctx: StageContext, source: str, new: pd.DataFrame) -> pd.DataFrame:
    """The new rows' text with every other column training uses (label and label id, target, group) taken from
    this stage's data row ``source_row_id``: a label corrected after augmenting reaches its augmentations too."""
    ours = ctx.data.frame.set_index("row_id")
    new = new[new["source_row_id"].isin(ours.index)].reset_index(drop=True)  # the others join no training set
    current = ours.loc[new["source_row_id"]].reset_index(drop=True)
    kept = [c for c in current.columns if c not in ("text", "label_id") and c in new.columns]  # ids: of the names
    changed = new.loc[(new[kept].astype(str) != current[kept].astype(str)).any(axis=1), "source_row_id"].unique()
    if len(changed):
        logger.warning("augment run %s recorded other %s than %s for %d source rows (row ids %s): their "
                       "augmentations take this data's values", source, "/".join(kept), ctx.cfg.data, len(changed),
                       ", ".join(map(str, changed[:20])) + (" ..." if len(changed) > 20 else ""))
    out = current.assign(text=new["text"].to_numpy(), source_row_id=new["source_row_id"].to_numpy(),
                         method=new["method"].to_numpy())
    return out.assign(row_id=-1 - pd.RangeIndex(len(out)))  # never one of the data's row ids


def _check_originals(ctx: StageContext, source: str, originals: pd.DataFrame) -> None:
    """The augment run's source rows are this stage's rows, with the same text at the same positions (``row_id``)."""
    theirs = originals.set_index("source_row_id")["text"]
    ours = ctx.data.frame.set_index("row_id")["text"]
    differ = ours.index[~ours.index.isin(theirs.index) | (theirs.reindex(ours.index) != ours).to_numpy()]
    if len(differ):
        raise ConfigError(f"augment run {source} augmented another data file: the text of {len(differ)} rows of "
                          f"{ctx.cfg.data} differs from its originals (row ids "
                          f"{', '.join(map(str, differ[:20]))}{' ...' if len(differ) > 20 else ''}): pass the "
                          "augment run of this data, or augment it again")
