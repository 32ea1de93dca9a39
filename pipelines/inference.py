"""Batched, weighted soft voting over fine-tuned sequence classifiers (torch only, no tracking): the members of a
classification ensemble, and the one model `predict` loads from a folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Member:
    weight: float
    tokenizer: object
    model: torch.nn.Module
    max_length: int


def load_member(path: str | Path, weight: float, labels: list[str], max_length: int) -> Member:
    """Load a classifier saved by `train`/`kfold`; its label order must equal ``labels``."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    own = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if own != labels:
        raise ValueError(f"model {path} predicts labels {own}, the ensemble expects {labels}")
    return Member(weight=weight, tokenizer=AutoTokenizer.from_pretrained(path), model=model, max_length=max_length)


@torch.no_grad()
def batched_logits(network: torch.nn.Module, tokenizer, texts: list[str], batch_size: int,
                   max_length: int) -> np.ndarray:
    """``network``'s logits for ``texts`` as float64, in batches of ``batch_size`` truncated to ``max_length``."""
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        parts.append(network(**batch).logits.double().numpy())
    return np.concatenate(parts)


def predict_proba(members: list[Member], texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Weighted average of the members' class probabilities, shape (len(texts), n_classes), float64."""
    total = None
    for member in members:
        logits = batched_logits(member.model, member.tokenizer, texts, batch_size, member.max_length)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy() * member.weight
        total = probs if total is None else total + probs
    return total / sum(m.weight for m in members)


def prediction_frame(probs: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """``label`` (the most probable class) and ``prob_<class>`` per row of ``probs``."""
    frame = pd.DataFrame({"label": [labels[i] for i in probs.argmax(axis=1)]})
    for i, name in enumerate(labels):
        frame[f"prob_{name}"] = probs[:, i]
    return frame
