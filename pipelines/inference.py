"""Batched, weighted soft voting over fine-tuned sequence classifiers (torch only, no tracking)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
def predict_proba(members: list[Member], texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Weighted average of the members' class probabilities, shape (len(texts), n_classes), float64."""
    total = None
    for member in members:
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = member.tokenizer(texts[start:start + batch_size], truncation=True, max_length=member.max_length,
                                     padding=True, return_tensors="pt")
            logits = member.model(**batch).logits.double()
            parts.append(torch.softmax(logits, dim=-1).numpy())
        probs = np.concatenate(parts) * member.weight
        total = probs if total is None else total + probs
    return total / sum(m.weight for m in members)


@dataclass
class Summarizer:
    network: torch.nn.Module
    tokenizer: object
    config: object  # GenerationConfig: the one the model was trained and validated with
    max_length: int


def load_summarizer_member(path: str | Path, max_length: int) -> Summarizer:
    """A seq2seq model saved by `train`/`kfold`, with its own saved generation settings."""
    from pipelines.generation import load_summarizer

    network, tokenizer = load_summarizer(path)
    return Summarizer(network, tokenizer, network.generation_config, max_length)


def summarize_all(members: list[Summarizer], texts: list[str], batch_size: int, rouge_tokenizer: str) -> tuple:
    """Each member's summary of each text, then per text the minimum-Bayes-risk choice (ties: the summary agreeing
    most with the text, then the member most confident of its own summary): (summaries, chosen)."""
    from pipelines.generation import generate
    from pipelines.mbr import mbr_choice

    outputs = [generate(m.network, m.tokenizer, texts, m.config, batch_size, m.max_length) for m in members]
    chosen = []
    for i, text in enumerate(texts):
        summaries = [out[i] for out in outputs]
        chosen.append(mbr_choice(summaries, rouge_tokenizer, source=text,
                                 scores=lambda text=text, summaries=summaries: own_scores(members, text, summaries),
                                 setting=f"the summary ensemble's vote on input row {i}"))
    return [outputs[c][i] for i, c in enumerate(chosen)], chosen


@torch.no_grad()
def own_scores(members: list[Summarizer], text: str, summaries: list[str]) -> list[float]:
    """Each member's mean log-probability per token of its own summary of ``text`` (labels as in training: without
    a leading decoder start token): its confidence, the last tie-break of the summary vote."""
    scores = []
    for member, summary in zip(members, summaries):
        batch = member.tokenizer([text], truncation=True, max_length=member.max_length, return_tensors="pt")
        ids = member.tokenizer(text_target=[summary])["input_ids"][0]
        start = member.network.config.decoder_start_token_id
        labels = torch.tensor([ids[1:] if len(ids) > 1 and ids[0] == start else ids])
        scores.append(-float(member.network(**batch, labels=labels).loss))
    return scores
