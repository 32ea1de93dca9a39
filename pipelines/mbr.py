"""Choosing among candidate summaries without a reference: minimum Bayes risk (MBR) and agreement scores.

Used by `correct` (``correction_strategy=vote`` and ``quality_based``) and by summary ensembles (`ensemble`, and
the served model). Scores are ROUGE F1 means (pipelines/rouge.py) with the run's ``rouge_tokenizer``.

ROUGE F1 is symmetric, so between two candidates the mean ROUGE to the others is always a tie: the vote is then
decided by the tie-breaks, in order, agreement with the source text (ROUGE to it), then the candidates' model
scores where the caller has them. Candidates that still tie and differ as ROUGE sees them (other tokens) make the
vote refuse (:class:`VoteUndecided`) instead of picking the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pipelines.errors import UserError
from pipelines.rouge import score_rows, tokenize

TIE = 1e-9  # ROUGE means this close are equal (sums over different pairs differ in the last bits)


class VoteUndecided(UserError):
    """Distinct candidates tie on every criterion of the vote; the message names the setting and what to do."""


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


def mbr_choice(candidates: list[str], tokenizer: str, source: str | None = None,
               scores: Sequence[float] | Callable[[], Sequence[float]] | None = None, setting: str = "the vote") -> int:
    """The candidate with the highest mean ROUGE to the others; ties go to the one with the higher ROUGE to
    ``source``, then the higher ``scores`` (the models' own scores, where known; a callable is called only when the
    earlier criteria tie). Candidates with equal tokens are the same summary to ROUGE: the first of them is
    returned. ``setting`` names the vote in the refusal."""
    n = len(candidates)
    if n < 2:
        return 0
    criteria = [("mean ROUGE to the other candidates", pairwise(candidates, tokenizer).sum(axis=1) / (n - 1))]
    if source is not None:
        criteria.append(("ROUGE to the source text",
                         score_rows([source] * n, candidates, tokenizer)["rouge_mean"].to_numpy()))
    if scores is not None:
        criteria.append(("model score", scores))
    tied = list(range(n))
    for _, values in criteria:
        values = np.asarray(values() if callable(values) else values, dtype=float)
        top = max(values[i] for i in tied)
        tied = [i for i in tied if values[i] >= top - TIE]
        if len(tied) == 1:
            return tied[0]
    if len({tuple(tokenize(candidates[i], tokenizer)) for i in tied}) == 1:
        return tied[0]
    used = ", ".join(name for name, _ in criteria)
    missing = [name for name, given in (("source text", source), ("model scores", scores)) if given is None]
    raise VoteUndecided(
        f"{setting} cannot decide: candidates {tied} of {n} differ but tie on {used}"
        + (f" (no {' or '.join(missing)} to break the tie)" if missing else "")
        + ". Add a candidate (another ensemble member or correction model) or use another strategy.")


def agreement(candidates: list[str], source: str, tokenizer: str) -> list[float]:
    """A reference-free quality score per candidate: its mean ROUGE to the other candidates and to the source."""
    matrix = pairwise([*candidates, source], tokenizer)
    return [float(matrix[i].sum() / len(candidates)) for i in range(len(candidates))]
