"""The interface every task module implements, and what the tasks share."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, ShuffleSplit
from transformers import Trainer, TrainerCallback

from pipelines.config import StageConfig
from pipelines.data import DataError, Dataset, read_artifact_csv, read_table

logger = logging.getLogger(__name__)
TRAINED_WITH = "pipelines.json"  # beside a saved model: how a stage trained it


@dataclass
class Built:
    """A model ready to train, with its tokenizer."""

    network: torch.nn.Module
    tokenizer: object


class Task:
    """What a stage needs to know about a task; each method is a plain function of its arguments.

    ``summary_metrics``: the per-unit validation metrics that kfold aggregates (``cv_<name>_mean`` / ``_std``).
    ``text_columns``: columns of the predictions frame that hold text (read back as strings).
    """

    name: str
    summary_metrics: tuple[str, ...]
    text_columns: tuple[str, ...]

    def load(self, cfg: StageConfig) -> Dataset:
        """Read ``cfg.data``, check it (errors name the file, column and fix), cap it to ``cfg.max_samples``."""
        raise NotImplementedError

    def folds(self, data: Dataset, cfg: StageConfig) -> list[np.ndarray]:
        """Validation row positions of each of ``cfg.k_folds`` folds, from ``cfg.fold_seed``."""
        raise NotImplementedError

    def holdout(self, data: Dataset, cfg: StageConfig) -> np.ndarray:
        """Validation row positions of a ``cfg.validation_fraction`` holdout split."""
        raise NotImplementedError

    def check_model(self, path: str) -> None:
        """Raise ModelError, before any run exists, when the model cannot do this task."""

    def build(self, cfg: StageConfig, path: str, data: Dataset) -> Built:
        """The model to train (from ``path``), seeded by the caller, and its tokenizer."""
        raise NotImplementedError

    def trainer(self, cfg: StageConfig, built: Built, args: dict, train: pd.DataFrame, valid: pd.DataFrame | None,
                callbacks: list[TrainerCallback]) -> Trainer:
        """A Trainer over the encoded frames; ``args`` are the task-independent TrainingArguments fields."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer, built: Built, valid: pd.DataFrame, cfg: StageConfig,
                 data: Dataset) -> tuple[dict[str, float], pd.DataFrame]:
        """Validation metrics and the predictions frame (``row_id`` first, one row per validation row)."""
        raise NotImplementedError

    def input_length(self, cfg: StageConfig) -> int:
        """The tokens per input text the model is trained with."""
        raise NotImplementedError

    def save(self, trainer: Trainer, built: Built, folder: Path, cfg: StageConfig) -> None:
        """The trained model for inference: weights, config, tokenizer, no optimizer state; and ``pipelines.json``
        with the task and the input length it was trained with (what `predict` truncates to)."""
        trainer.save_model(str(folder))
        (folder / TRAINED_WITH).write_text(json.dumps({"task": self.name, "max_length": self.input_length(cfg)}))

    def read_predictions(self, path: Path) -> pd.DataFrame:
        """A unit's predictions as logged: restored on resume, they equal the fresh ones (labels such as ``NA``)."""
        return read_artifact_csv(path, self.text_columns)


def read_columns(path: str, columns: dict[str, tuple[str, str]], task: str) -> pd.DataFrame:
    """The file's rows as ``row_id`` (position in the file) and ``columns``: frame name -> (setting, file column),
    each checked to exist; rows with any of them empty are dropped, with a warning."""
    frame = read_table(path)
    for setting, column in columns.values():
        if column not in frame.columns:
            raise DataError(f"{path} has no column {column!r} ({setting}); its columns are {list(frame.columns)}. "
                            f"Pass {setting}=<one of them>.")
    out = pd.DataFrame({"row_id": np.arange(len(frame))})
    for name, (_, column) in columns.items():
        out[name] = frame[column].to_numpy()
    empty = out[list(columns)].apply(lambda c: c.isna() | (c.astype(str).str.strip() == "")).any(axis=1)
    settings = [setting for setting, _ in columns.values()]
    if empty.all():
        raise DataError(f"{path}: no row has all of {', '.join(repr(c) for _, c in columns.values())} filled in; "
                        f"{task} needs them. Check {', '.join(settings)}.")
    if empty.any():
        logger.warning("dropping rows with an empty %s file=%s rows=%d", " or ".join(settings), path, int(empty.sum()))
    out = out[~empty].reset_index(drop=True)
    return out.assign(**{name: out[name].astype(str) for name in columns})


def shuffled_folds(frame: pd.DataFrame, k: int, seed: int) -> list[np.ndarray]:
    """Validation row positions of ``k`` shuffled folds (tasks without labels to stratify on)."""
    if k > len(frame):
        raise DataError(f"k_folds={k} is larger than the {len(frame)} rows; lower k_folds or add data.")
    return [np.sort(valid) for _, valid in KFold(n_splits=k, shuffle=True, random_state=seed).split(frame)]


def shuffled_holdout(frame: pd.DataFrame, fraction: float, seed: int, path: str) -> np.ndarray:
    """Validation row positions of a shuffled holdout split of ``fraction`` of the rows."""
    if len(frame) < 2:
        raise DataError(f"{path} has {len(frame)} usable row(s): too few to hold out validation rows")
    _, valid = next(ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(frame))
    return np.sort(valid)
