"""Choosing among candidate summaries without a reference: minimum Bayes risk (MBR) and agreement scores.

Used by `correct` (``correction_strategy=vote`` and ``quality_based``). Scores are ROUGE F1 means
(pipelines/rouge.py) with the run's ``rouge_tokenizer``.
"""

from __future__ import annotations

import numpy as np

from pipelines.rouge import score_rows


def pairwise(candidates: list[str], tokenizer: str) -> np.ndarray:
    """``rouge_mean`` of every ordered pair of candidates (the diagonal is 0)."""
    n = len(candidates)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    matrix = np.zeros((n, n))
    if pairs:
        scores = score_rows([candidates[j] for _, j in pairs], [candidates[i] for i, _ in pairs], tokenizer)
        for (i, j), value in zip(pairs, scores["rouge_mean"]):
            matrix[i, j] = value
    return matrix


def mbr_choice(candidates: list[str], tokenizer: str) -> int:
    """The candidate with the highest mean ROUGE to the others (the first of equals)."""
    if len(candidates) < 2:
        return 0
    matrix = pairwise(candidates, tokenizer)
    return int(np.argmax(matrix.sum(axis=1) / (len(candidates) - 1)))


def agreement(candidates: list[str], source: str, tokenizer: str) -> list[float]:
    """A reference-free quality score per candidate: its mean ROUGE to the other candidates and to the source."""
    matrix = pairwise([*candidates, source], tokenizer)
    return [float(matrix[i].sum() / len(candidates)) for i in range(len(candidates))]
