"""`task=classification`: one label per text; stratified splits; accuracy, macro F1; class probabilities."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from pipelines.config import StageConfig
from pipelines.data import Dataset, fold_plan, holdout_split, load_dataset
from pipelines.tasks.base import Built, Task


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
    summary_metrics = ("accuracy", "f1_macro", "loss")
    text_columns = ("label", "predicted")

    def load(self, cfg: StageConfig) -> Dataset:
        return load_dataset(cfg.data, cfg.text_column, cfg.label_column, cfg.max_samples, cfg.fold_seed)

    def folds(self, data: Dataset, cfg: StageConfig) -> list[np.ndarray]:
        return fold_plan(data, cfg.k_folds, cfg.fold_seed)

    def holdout(self, data: Dataset, cfg: StageConfig) -> np.ndarray:
        return holdout_split(data, cfg.validation_fraction, cfg.fold_seed)

    def input_length(self, cfg: StageConfig) -> int:
        return cfg.max_length

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


TASK = Classification()
