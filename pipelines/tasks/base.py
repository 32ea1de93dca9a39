"""The interface every task module implements, and what the tasks share."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, ShuffleSplit
from transformers import Trainer, TrainerCallback

from pipelines.config import StageConfig
from pipelines.data import DataError, Dataset, read_artifact_csv, read_table
from pipelines.errors import ConfigError
from pipelines.models import ModelSource
from pipelines.tasks import task_settings
from pipelines.tasks.ensemble import Ensemble

logger = logging.getLogger(__name__)
TRAINED_WITH = "pipelines.json"  # beside a saved model: how a stage trained it


@dataclass
class Built:
    """A model ready to train, with its tokenizer."""

    network: torch.nn.Module
    tokenizer: object


@dataclass(frozen=True)
class Target:
    """One value a task predicts per row, as `validate` scores it: the columns of its scores frame holding the truth
    and the prediction, and the setting naming the column of ``data`` that holds the truth."""

    truth: str  # ``reference`` (one target) or the data column's name (several)
    prediction: str  # ``prediction`` (one target) or ``predicted_<column>`` (several)
    setting: str  # ``label_column``, ``target_column``...
    column: str  # the column of ``data`` it names


@dataclass
class LoadedModel:
    """A saved model loaded to predict (stages `predict` and `validate`)."""

    source: ModelSource
    task: str  # the task it does, as it recorded it
    cfg: object  # the stage's settings, with the model's own values for those left at 0 (input length, generation)
    predict: Callable[[pd.DataFrame], pd.DataFrame]  # DataFrame(text) -> its predictions, one row per text
    summarize: Callable[[pd.DataFrame], dict[str, float]]  # all predictions -> the `predict` run's metrics


class Task:
    """What a stage needs to know about a task; each method is a plain function of its arguments.

    ``text_columns``: columns of the predictions frame that hold text (read back as strings).
    ``input_length_setting``: the setting holding the tokens per input text (``max_length``, ``max_source_length``).
    ``row_score``: the per-row score column of `validate`'s scores; its lowest rows are the worst examples.
    ``ensemble``: how the `ensemble` stage makes one served model of this task's runs (pipelines/tasks/ensemble.py:
    voting, metrics, the served model's spec and predictions); None: the task has none.
    """

    name: str
    text_columns: tuple[str, ...]
    input_length_setting: str
    row_score: str = ""
    ensemble: Ensemble | None = None

    def metrics(self, cfg: StageConfig) -> dict[str, bool | None]:
        """The validation metrics of a unit (kfold aggregates each as ``cv_<name>_mean`` / ``_std``): its settings'."""
        return task_settings(self.name).metrics(cfg)

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
        return getattr(cfg, self.input_length_setting)

    def loss(self, cfg: StageConfig, data: Dataset, train: pd.DataFrame) -> Callable | None:
        """The Trainer's ``compute_loss_func`` for training on ``train`` with these settings; None: the model's own."""
        return None

    def generation_objective(self, cfg: StageConfig, path: str) -> Callable[[StageConfig, pd.DataFrame], tuple]:
        """objective=generate: a function of a trial's settings and validation rows -> (metrics, predictions frame)
        of what the fixed model at ``path`` generates; refused (ConfigError), before any run, when it cannot."""
        raise ConfigError(f"objective=generate searches generation settings; task={self.name} generates no text")

    # ---- inference: `predict` and `validate`

    def recognizes(self, config) -> bool:
        """Whether a transformers config that records no task (a folder not trained here) is a model of this task."""
        return False

    def load_model(self, cfg, source: ModelSource) -> LoadedModel:
        """The model folder ``source`` (saved by ``save``, or a transformers model this task ``recognizes``) loaded
        to predict, with ``cfg``'s settings left at 0 resolved from the model; refused (ModelError) when it cannot,
        before anything runs."""
        raise NotImplementedError

    def pyfunc_model(self, cfg, source: ModelSource, model) -> LoadedModel:
        """The loaded pyfunc ensemble ``model`` of this task (``source``): its predictions frame has the columns of
        ``load_model``'s."""
        raise NotImplementedError

    def targets(self, cfg) -> list[Target]:
        """What `validate` compares, in the order of its scores frame's columns."""
        raise NotImplementedError

    def artifact_columns(self, stage: str, cfg) -> dict[str, str] | None:
        """Where the predictions artifact of a ``stage`` run of this task keeps the scores frame's columns: scores
        column (a target's ``prediction`` or ``truth``, or ``text``) -> artifact column. A truth not there is joined
        from ``data`` by ``row_id``; None: such runs hold no predictions of this task."""
        return None

    def check_references(self, cfg, items: pd.DataFrame) -> None:
        """Refuse, before any run, truths of the scores frame ``items`` that the settings cannot score."""

    def score(self, cfg, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` (``row_id``, ``text``, the targets' truth and prediction) with their per-row scores."""
        raise NotImplementedError

    def summarize_scores(self, cfg, scores: pd.DataFrame) -> dict[str, float]:
        """The metrics of a frame of ``score``'s rows (also of part of them: the running metrics)."""
        raise NotImplementedError

    def reports(self, cfg, scores: pd.DataFrame, folder: Path) -> tuple[dict[str, pd.DataFrame], list[Path]]:
        """Further `validate` artifacts: frames to log as CSV by name, and files written into ``folder`` (plots)."""
        return {}, []

    def save(self, trainer: Trainer, built: Built, folder: Path, cfg: StageConfig) -> None:
        """The trained model for inference: weights, config, tokenizer, no optimizer state; and ``pipelines.json``
        with the task and the input length it was trained with (what `predict` truncates to)."""
        trainer.save_model(str(folder))
        (folder / TRAINED_WITH).write_text(json.dumps({"task": self.name, "max_length": self.input_length(cfg)}))

    def read_predictions(self, path: Path) -> pd.DataFrame:
        """Predictions as logged (a unit's, a `predict` shard's): restored on resume, they equal the fresh ones
        (labels such as ``NA``)."""
        return read_artifact_csv(path, self.text_columns)


def trained_length(source: ModelSource) -> int:
    """The input length a stage trained the model with (``pipelines.json`` beside it): never a guess."""
    marker = Path(source.path, TRAINED_WITH)
    if not marker.is_file():
        raise ConfigError(f"model {source.name} has no {TRAINED_WITH} (it was not saved by a pipelines stage of this "
                          "version), so the input length it was trained with is unknown: pass max_length=N")
    return int(json.loads(marker.read_text())["max_length"])


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
