"""``task=multitask``'s ensemble (``HeadVote``): each head's class probabilities soft-voted across the sources, with
one weight per source for every head; served as ``<column>`` (the voted label) and ``prob_<column>_<class>`` per head.

Weights (``weights``): `equal`, `score` (each source's ``cv_<metric>_mean`` / ``final_<metric>``, normalised) or
`optimized`: the point of the simplex (equal, each corner, Dirichlet samples) maximising ``metric`` averaged over the
heads, each head scored on the shared out-of-fold rows labelled for it; reported against `score` and `equal` on a
held-out half. A head's classes are read from where `evaluate` writes them (its ``prob_`` columns between its
``predicted_<column>`` and the next head's label column), never by prefix: ``prob_a_`` also starts ``prob_a_b_x``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from pipelines.config import EnsembleConfig
from pipelines.tasks.ensemble import Ensemble, EnsembleError, Source, shared_rows
from pipelines.tasks.multitask.heads import Member, head_frame, head_probabilities, heads_of, load_member
from pipelines.tasks.multitask.settings import label_columns
from pipelines.tasks.voting import mix

logger = logging.getLogger(__name__)
SAMPLES = 2000  # Dirichlet samples of the optimized weights, as pipelines/tasks/voting.py
METRICS = ("accuracy", "f1_macro")


def measure(name: str, y: np.ndarray, predicted: np.ndarray) -> float:
    """Accuracy, or macro F1 over the classes true or predicted (sklearn's ``f1_score(average="macro")``, as
    2TP / (true + predicted) per class), of label ids: fast enough for thousands of candidate weights."""
    if name == "accuracy":
        return float(np.mean(y == predicted))
    classes, size = np.union1d(y, predicted), max(y.max(), predicted.max()) + 1
    hits = np.bincount(y[y == predicted], minlength=size)[classes]
    return float(np.mean(2 * hits / (np.bincount(y, minlength=size)[classes]
                                     + np.bincount(predicted, minlength=size)[classes])))


def head_classes(frame: pd.DataFrame, columns: list[str], run_id: str) -> list[list[str]]:
    """Per head, its classes in the order of its ``prob_<column>_<class>`` columns of predictions ``frame``."""
    names, classes = list(frame.columns), []
    for column, after in zip(columns, [*columns[1:], None]):
        start = names.index(f"predicted_{column}") + 1 if f"predicted_{column}" in names else len(names)
        probs = names[start:names.index(after) if after in names else len(names)]
        if not probs or not all(name.startswith(f"prob_{column}_") for name in probs):
            raise EnsembleError(f"the predictions of source run {run_id} have no prob_{column}_<class> columns "
                                f"after predicted_{column} (label_columns {','.join(columns)}): pass task=multitask "
                                "kfold or train runs of this version")
        classes.append([name.removeprefix(f"prob_{column}_") for name in probs])
    return classes


@dataclass
class Heads:
    """The sources' shared out-of-fold rows: per head its label ids (-1: no label) and each source's probabilities."""

    rows: list[int]
    columns: list[str]
    labels: list[list[str]]
    y: list[np.ndarray]
    probs: list[list[np.ndarray]]  # [head][source]: rows x classes


def columns_of(source: Source) -> list[str]:
    return label_columns(SimpleNamespace(**source.settings))


def align(sources: list[Source]) -> Heads:
    rows, columns = shared_rows(sources), columns_of(sources[0])
    labels = head_classes(sources[0].oof, columns, sources[0].run_id)
    frames = [s.oof.set_index("row_id").loc[rows] for s in sources]
    y = [frames[0][c].map({name: i for i, name in enumerate(names)}).fillna(-1).astype(int).to_numpy()
         for c, names in zip(columns, labels)]
    probs = [[f[[f"prob_{c}_{name}" for name in names]].to_numpy(dtype=float) for f in frames]
             for c, names in zip(columns, labels)]
    return Heads(rows, columns, labels, y, probs)


def head_scores(heads: Heads, weights, metrics, rows: np.ndarray | None = None) -> dict[str, float]:
    """Per head ``<column>_<metric>`` of the weighted vote on ``rows`` (positions; None: all) labelled for that head,
    and ``<metric>``: the mean over the heads."""
    out, scored = {}, []
    for column, y, probs in zip(heads.columns, heads.y, heads.probs):
        keep = np.flatnonzero(y >= 0) if rows is None else rows[y[rows] >= 0]
        if len(keep):  # a half of the rows may hold no label of a head: it is left out of that half's mean
            voted = mix(weights, [p[keep] for p in probs]).argmax(axis=1)
            out.update({f"{column}_{name}": measure(name, y[keep], voted) for name in metrics})
            scored.append(column)
    return {**out, **{name: float(np.mean([out[f"{c}_{name}"] for c in scored])) for name in metrics}}


def fit_weights(heads: Heads, metric: str, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Simplex weights maximising ``metric`` (the mean over heads) on ``rows``; ties keep the earlier candidate."""
    n = len(heads.probs[0])
    if n == 1:
        return np.ones(1)
    rng = np.random.default_rng(seed)
    candidates = np.vstack([np.full(n, 1.0 / n), np.eye(n), rng.dirichlet(np.ones(n), size=SAMPLES)])
    values = [head_scores(heads, weights, [metric], rows)[metric] for weights in candidates]
    return candidates[int(np.argmax(values))]


def heldout_split(heads: Heads, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Halves of the shared rows, stratified on the first head's labels where every class allows it."""
    positions, first = np.arange(len(heads.rows)), heads.y[0]
    try:
        return train_test_split(positions, test_size=0.5, stratify=first, random_state=seed)
    except ValueError:  # a class (or the unlabelled rows) too small to be split
        return train_test_split(positions, test_size=0.5, random_state=seed)


def choose_weights(cfg: EnsembleConfig, sources: list[Source], heads: Heads) -> tuple[list[float], dict[str, float]]:
    """The weights ``cfg.weights`` names, and for `optimized` the metrics comparing them (fit and held out)."""
    n, metric = len(sources), cfg.metric
    equal = np.full(n, 1.0 / n)
    by_score = np.array([s.score for s in sources])
    by_score = by_score / by_score.sum() if by_score.sum() > 0 else equal
    report = {}
    if cfg.weights == "optimized":
        fit, held = heldout_split(heads, cfg.seed)
        others = {"optimized": fit_weights(heads, metric, cfg.seed, fit), "score": by_score, "equal": equal}
        report = {f"heldout_{name}_{metric}": head_scores(heads, w, [metric], held)[metric]
                  for name, w in others.items()}
        chosen = fit_weights(heads, metric, cfg.seed)
        report[f"fit_optimized_{metric}"] = head_scores(heads, chosen, [metric])[metric]
        report[f"fit_equal_{metric}"] = head_scores(heads, equal, [metric])[metric]
    else:
        chosen = by_score if cfg.weights == "score" else equal
    logger.info("weights=%s: %s", cfg.weights, {s.run_id: round(float(w), 4) for s, w in zip(sources, chosen)})
    return [float(w) for w in chosen], report


@dataclass
class Voter:
    """The served multitask ensemble: per head the label and class probabilities, the members' weighted average."""

    members: list[Member]
    columns: list[str]
    labels: list[list[str]]
    batch_size: int

    def predict(self, texts: list[str]) -> pd.DataFrame:
        return head_frame(head_probabilities(self.members, texts, self.batch_size), self.columns, self.labels, "{}")


class HeadVote(Ensemble):
    """Per head, the sources' class probabilities averaged with one weight per source."""

    def check(self, sources: list[Source]) -> None:
        """Same label columns, same classes per head, same true labels of every head on the shared rows."""
        first, heads = sources[0], align(sources[:1])
        for source in sources[1:]:
            other = (columns_of(source), head_classes(source.oof, columns_of(source), source.run_id))
            if other != (heads.columns, heads.labels):
                raise EnsembleError(f"source {source.run_id} predicts label_columns {other[0]} with classes {other[1]}, "
                                    f"source {first.run_id} {heads.columns} with {heads.labels}: pass runs trained "
                                    "with the same label_columns on the same data")
        rows = shared_rows(sources)
        truth = first.oof.set_index("row_id").loc[rows, heads.columns]
        for source in sources[1:]:
            if not source.oof.set_index("row_id").loc[rows, heads.columns].equals(truth):
                raise EnsembleError(f"sources {first.run_id} and {source.run_id} disagree on the true labels of their "
                                    "shared rows: they were not trained on the same data")

    def weigh(self, cfg: EnsembleConfig, sources: list[Source]) -> tuple[list[float], dict[str, float]]:
        return choose_weights(cfg, sources, align(sources))

    def evaluate(self, cfg, sources, weights) -> tuple[dict[str, float], dict[str, object]]:
        heads = align(sources)
        metrics = {f"ensemble_{k}": v for k, v in head_scores(heads, weights, METRICS).items()}
        for i in range(len(sources)):
            alone = np.eye(len(sources))[i]
            metrics.update({f"source{i}_{k}": v for k, v in head_scores(heads, alone, METRICS).items()})
        return metrics, {"oof_rows": len(heads.rows), "vote": "per-head soft vote, one weight per source",
                         **{f"weight_{s.run_id}": round(w, 6) for s, w in zip(sources, weights)}}

    def spec(self, cfg, sources, members) -> dict:
        heads = align(sources[:1])
        return {"label_columns": heads.columns, "head_labels": heads.labels, "batch_size": cfg.eval_batch_size,
                "members": [{k: m[k] for k in ("name", "run_id", "source", "weight", "max_length")} for m in members]}

    def example(self, spec: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
        uniform = [np.full((2, len(labels)), 1.0 / len(labels)) for labels in spec["head_labels"]]
        return (pd.DataFrame({"text": ["an example sentence", "another one"]}),
                head_frame(uniform, spec["label_columns"], spec["head_labels"], "{}"))

    def load(self, spec: dict, artifacts: dict[str, str]) -> Voter:
        columns, labels = spec["label_columns"], spec["head_labels"]
        members = [load_member(artifacts[m["name"]], m["weight"], m["max_length"]) for m in spec["members"]]
        for member, m in zip(members, spec["members"]):
            if heads_of(member) != (columns, labels):
                raise EnsembleError(f"member {m['name']} (run {m['run_id']}) predicts {heads_of(member)}, the "
                                    f"ensemble expects {columns} with classes {labels}")
        return Voter(members, columns, labels, spec.get("batch_size", 64))
