"""`task=classification`: one label per text; stratified splits; accuracy, macro F1; class probabilities.

`validate` also logs ``per_class.csv`` (precision, recall, F1 and support per class) and ``confusion_matrix.png``;
`predict` logs the predicted class distribution (``count_<label>``, ``pct_<label>``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, classification_report, f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from pipelines.config import StageConfig
from pipelines.data import Dataset, fold_plan, holdout_split, load_dataset
from pipelines.inference import load_member, predict_proba, prediction_frame
from pipelines.models import ModelSource
from pipelines.tasks.base import Built, LoadedModel, Target, Task, trained_length
from pipelines.tasks.voting import SoftVote
from pipelines.techniques import FocalLoss, balanced_weights

PER_CLASS, CONFUSION = "per_class.csv", "confusion_matrix.png"
_EVALUATED = {"prediction": "predicted", "reference": "label"}  # the columns of ``evaluate``'s predictions frame


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts: list[str], label_ids: list[int], max_length: int):
        self.encodings = tokenizer(texts, truncation=True, max_length=max_length)
        self.label_ids = label_ids

    def __len__(self) -> int:
        return len(self.label_ids)

    def __getitem__(self, i: int) -> dict:
        item = {key: values[i] for key, values in self.encodings.items()}
        item["labels"] = self.label_ids[i]
        return item


def _compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    predicted = np.argmax(logits, axis=-1)
    return {"accuracy": accuracy_score(labels, predicted), "f1_macro": f1_score(labels, predicted, average="macro")}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Classification(Task):
    name = "classification"
    text_columns = ("label", "predicted")
    input_length_setting = "max_length"
    row_score = "correct"
    ensemble = SoftVote()

    def load(self, cfg: StageConfig) -> Dataset:
        return load_dataset(cfg.data, cfg.text_column, cfg.label_column, cfg.max_samples, cfg.fold_seed)

    def folds(self, data: Dataset, cfg: StageConfig) -> list[np.ndarray]:
        return fold_plan(data, cfg.k_folds, cfg.fold_seed)

    def holdout(self, data: Dataset, cfg: StageConfig) -> np.ndarray:
        return holdout_split(data, cfg.validation_fraction, cfg.fold_seed)

    def build(self, cfg: StageConfig, path: str, data: Dataset) -> Built:
        labels = data.labels
        network = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.model_max_length = cfg.max_length  # saved with the model: predict truncates the same way
        return Built(network, tokenizer)

    def trainer(self, cfg, built, args, train, valid, callbacks) -> Trainer:
        def encode(frame: pd.DataFrame) -> TextDataset:
            return TextDataset(built.tokenizer, frame["text"].tolist(), frame["label_id"].tolist(), cfg.max_length)

        return Trainer(
            model=built.network,
            args=TrainingArguments(**args, per_device_eval_batch_size=cfg.eval_batch_size,
                                   label_smoothing_factor=cfg.label_smoothing),
            train_dataset=encode(train),
            eval_dataset=None if valid is None else encode(valid),
            processing_class=built.tokenizer,
            data_collator=DataCollatorWithPadding(built.tokenizer),
            compute_metrics=_compute_metrics,
            callbacks=callbacks,
        )

    def evaluate(self, trainer, built, valid, cfg, data) -> tuple[dict[str, float], pd.DataFrame]:
        output = trainer.predict(trainer.eval_dataset)
        probabilities = softmax(output.predictions)
        predicted = probabilities.argmax(axis=-1)
        predictions = pd.DataFrame({"row_id": valid["row_id"].to_numpy(), "label": valid["label"].to_numpy(),
                                    "predicted": [data.labels[i] for i in predicted]})
        for i, name in enumerate(data.labels):
            predictions[f"prob_{name}"] = probabilities[:, i]
        metrics = {"accuracy": accuracy_score(valid["label_id"], predicted),
                   "f1_macro": f1_score(valid["label_id"], predicted, average="macro"),
                   "loss": output.metrics["test_loss"]}
        return metrics, predictions

    def loss(self, cfg, data, train):
        """Focal loss and/or balanced class weights (pipelines/techniques.py), when the settings ask for them."""
        if cfg.loss != "focal" and cfg.class_weights != "balanced":
            return None
        weights = None
        if cfg.class_weights == "balanced":
            weights = balanced_weights(train["label_id"].to_numpy(), len(data.labels))
        return FocalLoss(cfg.focal_gamma if cfg.loss == "focal" else 0.0, weights)

    def recognizes(self, config) -> bool:
        return any(name.endswith("ForSequenceClassification") for name in config.architectures or ())

    def load_model(self, cfg, source: ModelSource) -> LoadedModel:
        config = json.loads(Path(source.path, "config.json").read_text())
        labels = [label for _, label in sorted(config.get("id2label", {}).items(), key=lambda kv: int(kv[0]))]
        cfg = dataclasses.replace(cfg, max_length=cfg.max_length or trained_length(source))
        member = load_member(source.path, 1.0, labels, cfg.max_length)

        def predict(frame: pd.DataFrame) -> pd.DataFrame:
            return prediction_frame(predict_proba([member], frame["text"].tolist(), cfg.eval_batch_size), labels)

        return LoadedModel(source, self.name, cfg, predict, class_counts)

    def pyfunc_model(self, cfg, source: ModelSource, model) -> LoadedModel:
        return LoadedModel(source, self.name, cfg, model.predict, class_counts)

    def artifact_columns(self, stage: str, cfg) -> dict[str, str] | None:
        return {"kfold": _EVALUATED, "train": _EVALUATED, "predict": {"prediction": "label"},
                "llm": {"prediction": "response"}, "correct": {"prediction": "corrected"}}.get(stage)

    def targets(self, cfg) -> list[Target]:
        return [Target("reference", "prediction", "label_column", cfg.label_column)]

    def score(self, cfg, rows: pd.DataFrame) -> pd.DataFrame:
        return rows.assign(correct=(rows["prediction"].astype(str).str.strip()
                                    == rows["reference"].astype(str).str.strip()).astype(int))

    def summarize_scores(self, cfg, scores: pd.DataFrame) -> dict[str, float]:
        return class_metrics(*_stripped(scores["reference"], scores["prediction"]))

    def reports(self, cfg, scores: pd.DataFrame, folder: Path) -> tuple[dict[str, pd.DataFrame], list[Path]]:
        truth, predicted = _stripped(scores["reference"], scores["prediction"])
        confusion_plot(truth, predicted, folder / CONFUSION)
        return {PER_CLASS: per_class(truth, predicted)}, [folder / CONFUSION]


def _stripped(*columns: pd.Series) -> list[pd.Series]:
    return [column.astype(str).str.strip() for column in columns]


def classes(truth: pd.Series, predicted: pd.Series) -> list[str]:
    """The classes macro-F1 averages over: every true or predicted label; an empty prediction (a failed request)
    is a miss of its row's class, not a class of its own."""
    return sorted((set(truth) | set(predicted)) - {""})


def class_metrics(truth: pd.Series, predicted: pd.Series) -> dict[str, float]:
    """Accuracy and macro F1 of predicted labels (stripped text) against the true ones."""
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "f1_macro": float(f1_score(truth, predicted, labels=classes(truth, predicted), average="macro",
                                       zero_division=0))}


def per_class(truth: pd.Series, predicted: pd.Series) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, then the averages (one row each, ``class`` first)."""
    report = classification_report(truth, predicted, labels=classes(truth, predicted), output_dict=True,
                                   zero_division=0)
    return pd.DataFrame(report).T.rename_axis("class").reset_index()


def confusion_plot(truth: pd.Series, predicted: pd.Series, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = sorted(set(truth) | set(predicted))
    display = ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, xticks_rotation=45,
                                                      colorbar=False)
    display.figure_.set_size_inches(max(4, len(labels)), max(4, len(labels)))
    display.figure_.tight_layout()
    display.figure_.savefig(path, dpi=100)
    plt.close(display.figure_)


def class_counts(predictions: pd.DataFrame, column: str = "label") -> dict[str, float]:
    """How many predictions, and what percentage, name each label (``count_<label>``, ``pct_<label>``)."""
    counts = predictions[column].value_counts()
    return {**{f"count_{k}": int(v) for k, v in counts.items()},
            **{f"pct_{k}": 100.0 * v / len(predictions) for k, v in counts.items()}}


TASK = Classification()
