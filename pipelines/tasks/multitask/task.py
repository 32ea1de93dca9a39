"""`task=multitask`: one encoder, one classification head per column of ``label_columns``, trained together.

Rows: ``text_column`` and the label columns. A row missing one head's label (an empty cell) trains the other
heads (its label id there is -100: left out of that head's loss) and is scored only by the heads it has a label
for; a row without text, or without any label, is dropped with a warning. Each head's labels are sorted.

Splits (folds, holdout) and the ``max_samples`` sample are stratified on the FIRST label column; its rows without
a label are a group of their own, or count with its largest class when they are too few to be spread over the
splits. Every validation set must hold a labelled row of every head (else: fewer folds, or more labels).

Predictions (kfold, train): ``row_id``, then per head ``<column>`` (the label, empty where the row has none),
``predicted_<column>`` and ``prob_<column>_<class>``; `predict`'s: per head ``predicted_<column>`` and
``prob_<column>_<class>``, and per head the class counts (``count_<column>_<class>``, ``pct_<column>_<class>``).
`validate` (``label_columns``: the heads it scores) scores each head on the rows labelled for it; a row's
``correct`` is the share of its labelled heads predicted right; per head ``per_class_<column>.csv`` and
``confusion_matrix_<column>.png``. The ensemble: vote.py (model.py: the model; heads.py: its probabilities).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from transformers import AutoConfig, AutoModel, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

from pipelines.config import StageConfig
from pipelines.data import DataError, Dataset, content_digest, read_artifact_csv, read_table
from pipelines.models import ModelError, ModelSource
from pipelines.tasks.base import Built, LoadedModel, Target, Task, trained_length
from pipelines.tasks.classification.task import TextDataset, class_metrics, confusion_plot, per_class, softmax
from pipelines.tasks.multitask.heads import (
    check_heads,
    head_counts,
    head_frame,
    head_probabilities,
    heads_of,
    load_member,
    per_head,
)
from pipelines.tasks.multitask.model import IGNORE, MultitaskConfig, MultitaskModel
from pipelines.tasks.multitask.settings import head_weights, label_columns
from pipelines.tasks.multitask.vote import HeadVote

logger = logging.getLogger(__name__)


def load_rows(cfg: StageConfig) -> pd.DataFrame:
    """``row_id``, ``text`` and each label column (its labels as text, ``""`` where a row has none)."""
    columns = label_columns(cfg)
    frame = read_table(cfg.data)
    for setting, column in [("text_column", cfg.text_column), *(("label_columns", c) for c in columns)]:
        if column not in frame.columns:
            raise DataError(f"{cfg.data} has no column {column!r} ({setting}); its columns are "
                            f"{list(frame.columns)}. Check {setting}.")
    rows = pd.DataFrame({"row_id": np.arange(len(frame)), "text": frame[cfg.text_column],
                         **{c: frame[c] for c in columns}})
    dropped = rows["text"].isna() | rows[columns].isna().all(axis=1)
    if dropped.all():
        raise DataError(f"{cfg.data}: no row has a text and a label of {', '.join(columns)}; check text_column and "
                        "label_columns")
    if dropped.any():
        logger.warning("dropping rows with an empty text_column or no label of label_columns file=%s rows=%d",
                       cfg.data, int(dropped.sum()))
    rows = rows[~dropped].reset_index(drop=True)
    return rows.assign(text=rows["text"].astype(str), **{c: as_text(rows[c]) for c in columns})


def as_text(labels: pd.Series) -> pd.Series:
    """Labels as text, ``""`` where none; whole numbers as integers whatever the format (an integer column of
    JSONL or Parquet with a null is read as floats: 1.0 is the label '1')."""
    if pd.api.types.is_float_dtype(labels) and (labels.dropna() % 1 == 0).all():
        labels = labels.astype("Int64")
    return labels.map(lambda v: "" if pd.isna(v) else str(v))


def head_labels(frame: pd.DataFrame, columns: list[str]) -> list[list[str]]:
    return [sorted(set(frame[c]) - {""}) for c in columns]


def label_ids(frame: pd.DataFrame, config: MultitaskConfig) -> np.ndarray:
    """Rows x heads label ids, ``IGNORE`` where a row has no label for a head."""
    ids = [frame[c].map({name: i for i, name in enumerate(labels)}).fillna(IGNORE).astype(int).to_numpy()
           for c, labels in zip(config.label_columns, config.head_labels)]
    return np.stack(ids, axis=1)


def head_metrics(scores: list[np.ndarray], ids: np.ndarray, columns: list[str]) -> dict[str, float]:
    """Per head accuracy and macro F1 over its labelled rows; ``accuracy``, ``f1_macro``: their means."""
    metrics = {}
    for h, (column, head) in enumerate(zip(columns, scores)):
        labelled = ids[:, h] != IGNORE
        truth, predicted = ids[labelled, h], head[labelled].argmax(axis=-1)
        metrics[f"{column}_accuracy"] = float(accuracy_score(truth, predicted))
        metrics[f"{column}_f1_macro"] = float(f1_score(truth, predicted, average="macro"))
    for name in ("accuracy", "f1_macro"):
        metrics[name] = float(np.mean([metrics[f"{column}_{name}"] for column in columns]))
    return metrics


def check_names(path: str, columns: list[str], labels: list[list[str]]) -> None:
    """The predictions' column names are all different (column ``a`` with class ``b_x`` and column ``a_b`` with
    class ``x`` would both make ``prob_a_b_x``)."""
    names = [name for column, classes in zip(columns, labels)
             for name in (column, f"predicted_{column}", *(f"prob_{column}_{c}" for c in classes))]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(f"{path}: label_columns {','.join(columns)} and their classes make the predictions column "
                        f"{twice[0]!r} twice (e.g. column 'a' with class 'b_x' and column 'a_b' with class 'x'): "
                        "rename one of those columns or classes")


def strata(frame: pd.DataFrame, column: str, splits: int) -> pd.Series:
    """The first label column's labels; rows without one are a group of their own when at least ``splits``, else
    counted with the largest class."""
    values = frame[column]
    missing = int((values == "").sum())
    if 0 < missing < splits:
        return values.replace("", values[values != ""].value_counts().idxmax())
    return values


def check_scored(frame: pd.DataFrame, splits: list[np.ndarray], columns: list[str], what: str) -> None:
    """Every validation set holds a labelled row of every head (else that head could not be scored there)."""
    for i, valid in enumerate(splits):
        for column in columns:
            if (frame[column].iloc[valid] == "").all():
                raise DataError(f"the validation rows of {what}{i if len(splits) > 1 else ''} have no label in "
                                f"column {column!r}, so that head cannot be scored: label more rows of it, or use "
                                "fewer folds / a larger validation_fraction")


class Multitask(Task):
    name = "multitask"
    text_columns = ()  # per head: see read_predictions
    input_length_setting = "max_length"
    row_score = "correct"  # of a row: the share of the heads it has a label for that are predicted right
    ensemble = HeadVote()

    def load(self, cfg: StageConfig) -> Dataset:
        columns = label_columns(cfg)
        frame = load_rows(cfg)
        if 0 < cfg.max_samples < len(frame):
            try:
                frame, _ = train_test_split(frame, train_size=cfg.max_samples, random_state=cfg.fold_seed,
                                            stratify=strata(frame, columns[0], 2))
            except ValueError:  # a class too small to stratify: a plain random sample
                frame = frame.sample(n=cfg.max_samples, random_state=cfg.fold_seed)
            frame = frame.sort_values("row_id").reset_index(drop=True)
        for column, labels in zip(columns, head_labels(frame, columns)):
            if len(labels) < 2:
                raise DataError(f"{cfg.data}: column {column!r} (label_columns) holds {len(labels)} class(es) "
                                f"{labels} in the rows used; each head needs at least two. Check label_columns "
                                "(and max_samples).")
        check_names(cfg.data, columns, head_labels(frame, columns))
        return Dataset(frame=frame, labels=[], digest=content_digest(frame, list(frame.columns)))

    def folds(self, data: Dataset, cfg: StageConfig) -> list[np.ndarray]:
        columns, k = label_columns(cfg), cfg.k_folds
        groups = strata(data.frame, columns[0], k)
        counts = groups.value_counts()
        if k > counts.min():
            raise DataError(f"k_folds={k} is larger than the smallest class of {columns[0]!r} (the first of "
                            f"label_columns: {counts.idxmin()!r}, {counts.min()} rows); lower k_folds to at most "
                            f"{counts.min()} or use more data.")
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.fold_seed)
        folds = [valid for _, valid in splitter.split(np.zeros(len(groups)), groups)]
        check_scored(data.frame, folds, columns, "fold ")
        return folds

    def holdout(self, data: Dataset, cfg: StageConfig) -> np.ndarray:
        columns, fraction = label_columns(cfg), cfg.validation_fraction
        groups = strata(data.frame, columns[0], 2)
        counts = groups.value_counts()
        if counts.min() < 2 or int(np.ceil(fraction * len(groups))) < len(counts):
            raise DataError(f"validation_fraction={fraction} leaves too few rows to hold out every class of "
                            f"{columns[0]!r} (smallest class {counts.idxmin()!r} has {counts.min()} rows); raise "
                            "validation_fraction or add data.")
        _, valid = train_test_split(np.arange(len(groups)), test_size=fraction, stratify=groups,
                                    random_state=cfg.fold_seed)
        valid = np.sort(valid)
        check_scored(data.frame, [valid], columns, "the holdout split")
        return valid

    def check_model(self, path: str) -> None:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            raise ModelError(f"model {path} ({config.model_type}) is an encoder-decoder; task=multitask puts its "
                             "heads on an encoder: pass an encoder checkpoint (BERT, RoBERTa, XLM-R, ELECTRA...)")

    def build(self, cfg: StageConfig, path: str, data: Dataset) -> Built:
        columns = label_columns(cfg)
        encoder = AutoModel.from_pretrained(path, dtype=torch.float32)  # as its new heads (a bf16 checkpoint: too)
        if isinstance(encoder, MultitaskModel):  # a multitask model's encoder, with new heads
            encoder = encoder.encoder
        config = MultitaskConfig(encoder=encoder.config.to_dict(), label_columns=columns,
                                 head_labels=head_labels(data.frame, columns), head_weights=head_weights(cfg),
                                 label_smoothing=cfg.label_smoothing)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.model_max_length = cfg.max_length  # saved with the model: predict truncates the same way
        return Built(MultitaskModel(config, encoder=encoder), tokenizer)

    def trainer(self, cfg, built, args, train, valid, callbacks) -> Trainer:
        config = built.network.config

        def encode(frame: pd.DataFrame) -> TextDataset:  # per row a label id per head
            return TextDataset(built.tokenizer, frame["text"].tolist(), label_ids(frame, config).tolist(),
                               cfg.max_length)

        def compute_metrics(prediction) -> dict[str, float]:
            return head_metrics(per_head(prediction.predictions, config), prediction.label_ids, config.label_columns)

        return Trainer(
            model=built.network,
            args=TrainingArguments(**args, per_device_eval_batch_size=cfg.eval_batch_size),
            train_dataset=encode(train),
            eval_dataset=None if valid is None else encode(valid),
            processing_class=built.tokenizer,
            data_collator=DataCollatorWithPadding(built.tokenizer),
            compute_metrics=compute_metrics,
            callbacks=callbacks,
        )

    def evaluate(self, trainer, built, valid, cfg, data) -> tuple[dict[str, float], pd.DataFrame]:
        config = built.network.config
        output, ids = trainer.predict(trainer.eval_dataset), label_ids(valid, config)
        logits = per_head(output.predictions, config)
        probabilities = [softmax(head) for head in logits]
        metrics = head_metrics(probabilities, ids, config.label_columns)
        # the model's loss over all the rows at once, not the Trainer's mean of per-batch losses (each a per-head
        # mean over the batch's labelled rows: the rows of a head would weigh by how they fall into batches of
        # eval_batch_size). Training optimizes those per-micro-batch means: a row weighs more in a batch with
        # fewer labelled rows of its head
        with torch.no_grad():
            loss = built.network.loss([torch.from_numpy(head) for head in logits], torch.from_numpy(ids))
        metrics["loss"] = float(loss)
        columns = {"row_id": valid["row_id"].to_numpy()}
        for column, labels, head in zip(config.label_columns, config.head_labels, probabilities):
            columns[column] = valid[column].to_numpy()
            columns[f"predicted_{column}"] = [labels[i] for i in head.argmax(axis=-1)]
            columns.update({f"prob_{column}_{name}": head[:, i] for i, name in enumerate(labels)})
        return metrics, pd.DataFrame(columns)

    def read_predictions(self, path) -> pd.DataFrame:
        """Each head's label and prediction as text, verbatim (an unlabelled cell is ``""``)."""
        heads = [c.removeprefix("predicted_") for c in pd.read_csv(path, nrows=0).columns if c.startswith("predicted_")]
        return read_artifact_csv(path, (*heads, *(f"predicted_{c}" for c in heads)))

    # ---- inference: `predict` (per head ``predicted_<column>``, ``prob_<column>_<class>``) and `validate`

    def recognizes(self, config) -> bool:
        return isinstance(config, MultitaskConfig)

    def load_model(self, cfg, source: ModelSource) -> LoadedModel:
        cfg = dataclasses.replace(cfg, max_length=cfg.max_length or trained_length(source))
        member = load_member(source.path, 1.0, cfg.max_length)
        columns, labels = heads_of(member)
        check_heads(cfg, columns, source.name)

        def predict(frame: pd.DataFrame) -> pd.DataFrame:
            probabilities = head_probabilities([member], frame["text"].tolist(), cfg.eval_batch_size)
            return head_frame(probabilities, columns, labels)

        return LoadedModel(source, self.name, cfg, predict, lambda predictions: head_counts(predictions, columns))

    def pyfunc_model(self, cfg, source: ModelSource, model) -> LoadedModel:
        """The served ensemble answers ``<column>`` per head: renamed ``predicted_<column>``, as a model's."""
        columns = model.unwrap_python_model().predictor.columns
        check_heads(cfg, columns, source.name)
        named = {column: f"predicted_{column}" for column in columns}
        return LoadedModel(source, self.name, cfg, lambda frame: model.predict(frame).rename(columns=named),
                           lambda predictions: head_counts(predictions, columns))

    def targets(self, cfg) -> list[Target]:
        return [Target(column, f"predicted_{column}", "label_columns", column) for column in label_columns(cfg)]

    def artifact_columns(self, stage: str, cfg) -> dict[str, str] | None:
        predicted = {f"predicted_{column}": f"predicted_{column}" for column in label_columns(cfg)}
        if stage in ("kfold", "train"):
            return {**predicted, **{column: column for column in label_columns(cfg)}}
        return predicted if stage == "predict" else None

    def check_references(self, cfg, items: pd.DataFrame) -> None:
        for column in label_columns(cfg):
            if (items[column].astype(str).str.strip() == "").all():
                raise DataError(f"no row to score has a label in column {column!r} (label_columns), so that head "
                                "cannot be scored: pass data with its labels, or leave it out of label_columns")

    def score(self, cfg, rows: pd.DataFrame) -> pd.DataFrame:
        truth, predicted = _heads(cfg, rows)
        labelled = truth != ""
        return rows.assign(correct=((truth == predicted) & labelled).sum(axis=1) / labelled.sum(axis=1))

    def summarize_scores(self, cfg, scores: pd.DataFrame) -> dict[str, float]:
        """Per head ``<column>_accuracy``, ``<column>_f1_macro`` over its labelled rows; ``accuracy``, ``f1_macro``:
        their means (over the heads with a labelled row: a shard's running metrics may lack one)."""
        truth, predicted = _heads(cfg, scores)
        metrics, heads = {}, []
        for column in truth.columns:
            labelled = truth[column] != ""
            if labelled.any():
                heads.append(column)
                metrics.update({f"{column}_{name}": value for name, value in
                                class_metrics(truth.loc[labelled, column], predicted.loc[labelled, column]).items()})
        return {**metrics, **{name: float(np.mean([metrics[f"{c}_{name}"] for c in heads]))
                              for name in ("accuracy", "f1_macro")}}

    def reports(self, cfg, scores: pd.DataFrame, folder: Path) -> tuple[dict[str, pd.DataFrame], list[Path]]:
        """Per head ``per_class_<column>.csv`` and ``confusion_matrix_<column>.png``, of its labelled rows."""
        truth, predicted = _heads(cfg, scores)
        tables, plots = {}, []
        for column in truth.columns:
            labelled = truth[column] != ""
            plots.append(folder / f"confusion_matrix_{column}.png")
            confusion_plot(truth.loc[labelled, column], predicted.loc[labelled, column], plots[-1])
            tables[f"per_class_{column}.csv"] = per_class(truth.loc[labelled, column], predicted.loc[labelled, column])
        return tables, plots


def _heads(cfg, rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per head (one column each, named by it): the true labels and the predicted ones, stripped (``""``: none)."""
    columns = label_columns(cfg)
    truth, predicted = rows[columns], rows[[f"predicted_{c}" for c in columns]].set_axis(columns, axis=1)
    return [frame.astype(str).apply(lambda column: column.str.strip()) for frame in (truth, predicted)]


TASK = Multitask()
