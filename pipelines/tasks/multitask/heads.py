"""The heads' class probabilities: of one saved multitask model (`predict`, `validate`) or of an ensemble's members,
averaged with their weights; and the predictions frame of them (per head the label and ``prob_<column>_<class>``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import AutoTokenizer

from pipelines.inference import batched_logits
from pipelines.models import ModelError
from pipelines.tasks.classification.task import class_counts, softmax
from pipelines.tasks.multitask.model import MultitaskConfig, MultitaskModel
from pipelines.tasks.multitask.settings import label_columns


@dataclass
class Member:
    weight: float
    tokenizer: object
    network: MultitaskModel
    max_length: int


def per_head(scores: np.ndarray, config: MultitaskConfig) -> list[np.ndarray]:
    """The heads' logits (or probabilities), side by side in ``scores``, split by head."""
    return np.split(scores, np.cumsum(config.head_sizes())[:-1], axis=-1)


def load_member(path: str | Path, weight: float, max_length: int) -> Member:
    """A multitask model folder saved by `train`/`kfold`, with its tokenizer."""
    return Member(weight, AutoTokenizer.from_pretrained(path), MultitaskModel.from_pretrained(path).eval(), max_length)


def heads_of(member: Member) -> tuple[list[str], list[list[str]]]:
    """The member's label columns and, per head, its classes in the order of its outputs."""
    return list(member.network.config.label_columns), [list(labels) for labels in member.network.config.head_labels]


def head_probabilities(members: list[Member], texts: list[str], batch_size: int) -> list[np.ndarray]:
    """Per head, the members' weighted average class probabilities (rows x classes, float64)."""
    total = None
    for member in members:
        logits = batched_logits(member.network, member.tokenizer, texts, batch_size, member.max_length)
        heads = [member.weight * softmax(head) for head in per_head(logits, member.network.config)]
        total = heads if total is None else [t + h for t, h in zip(total, heads)]
    weight = sum(m.weight for m in members)
    return [t / weight for t in total]


def head_frame(probabilities: list[np.ndarray], columns: list[str], labels: list[list[str]],
               named: str = "predicted_{}") -> pd.DataFrame:
    """Per head: its most probable class (column ``named`` of the head's column) and ``prob_<column>_<class>``."""
    out = {}
    for column, classes, probs in zip(columns, labels, probabilities):
        out[named.format(column)] = [classes[i] for i in probs.argmax(axis=1)]
        out.update({f"prob_{column}_{name}": probs[:, i] for i, name in enumerate(classes)})
    return pd.DataFrame(out)


def check_heads(cfg, columns: list[str], name: str) -> None:
    """Refuse a model without a head for each of ``label_columns`` (of a stage that has that setting)."""
    missing = [column for column in label_columns(cfg) if column not in columns]
    if missing:
        raise ModelError(f"model {name} has heads {columns}, and label_columns={cfg.label_columns!r} names "
                         f"{missing}: pass label_columns=<some of its heads>")


def head_counts(predictions: pd.DataFrame, columns: list[str]) -> dict[str, float]:
    """Per head, how many predictions, and what percentage, name each class (``count_<column>_<class>``,
    ``pct_<column>_<class>``)."""
    return {name.replace("_", f"_{column}_", 1): value for column in columns
            for name, value in class_counts(predictions, f"predicted_{column}").items()}
