"""Weighted soft voting of classifiers (``task=classification``'s ensemble, ``SoftVote``).

Vote weights are per source: `equal`, `score` (each source's validation metric, normalised) or `optimized` (a point
of the probability simplex fitted on the sources' out-of-fold predictions to maximise `metric`; reported against
`score` and `equal` on rows the fit did not see). The functions take the predictions' label column and probability
prefix, so a task with several label columns can vote each one (``column="topic", prefix="prob_topic_"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from pipelines.config import EnsembleConfig
from pipelines.inference import Member, load_member, predict_proba, prediction_frame
from pipelines.tasks.ensemble import Ensemble, EnsembleError, Source, shared_rows

logger = logging.getLogger(__name__)
METRICS = {"accuracy": accuracy_score, "f1_macro": lambda y, p: f1_score(y, p, average="macro")}


def labels_of(oof: pd.DataFrame, prefix: str = "prob_") -> list[str]:
    """The classes of a predictions frame, in the order of its ``<prefix><class>`` columns."""
    return [c.removeprefix(prefix) for c in oof.columns if c.startswith(prefix)]


def check_labels(sources: list[Source], column: str = "label", prefix: str = "prob_") -> None:
    """The sources predict the same classes and agree on the true ``column`` of their shared rows."""
    labels = labels_of(sources[0].oof, prefix)
    for source in sources[1:]:
        if labels_of(source.oof, prefix) != labels:
            raise EnsembleError(f"source {source.run_id} predicts {labels_of(source.oof, prefix)}, "
                                f"{sources[0].run_id} {labels}")
    rows = shared_rows(sources)
    first = sources[0].oof.set_index("row_id").loc[rows, column]
    for source in sources[1:]:
        if not source.oof.set_index("row_id").loc[rows, column].equals(first):
            raise EnsembleError(f"sources {sources[0].run_id} and {source.run_id} disagree on the true labels of "
                                "their shared rows: they were not trained on the same data")


def align(sources: list[Source], column: str = "label", prefix: str = "prob_"):
    """Rows predicted out-of-fold by every source: row ids, true label ids, one probability matrix per source."""
    rows, labels = shared_rows(sources), labels_of(sources[0].oof, prefix)
    frames = [s.oof.set_index("row_id").loc[rows] for s in sources]
    y = frames[0][column].map({name: i for i, name in enumerate(labels)}).to_numpy()
    return rows, y, [f[[f"{prefix}{name}" for name in labels]].to_numpy() for f in frames]


def mix(weights, probs: list[np.ndarray]) -> np.ndarray:
    """The weighted soft vote of per-source probability matrices."""
    return sum(w * p for w, p in zip(weights, probs))


def score(metric: str, probs: np.ndarray, y: np.ndarray) -> float:
    return float(METRICS[metric](y, probs.argmax(axis=1)))


def scores(prefix: str, probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_{name}": score(name, probs, y) for name in METRICS}


def fit_weights(probs: list[np.ndarray], y: np.ndarray, metric: str, seed: int, samples: int = 2000) -> np.ndarray:
    """Simplex weights maximising ``metric``: equal, each corner and Dirichlet samples; ties keep the earlier."""
    n = len(probs)
    rng = np.random.default_rng(seed)
    candidates = np.vstack([np.full(n, 1.0 / n), np.eye(n), rng.dirichlet(np.ones(n), size=samples)])
    values = [score(metric, mix(weights, probs), y) for weights in candidates]
    return candidates[int(np.argmax(values))]


def heldout_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of a stratified half to fit weights on, and of the other half to compare them on."""
    return train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=seed)


def heldout_report(probs: list[np.ndarray], y: np.ndarray, metric: str, seed: int,
                   others: dict[str, np.ndarray]) -> dict[str, float]:
    """``heldout_<name>_<metric>``: weights optimized on one half, and ``others``, all scored on the other half."""
    fit_rows, held_rows = heldout_split(y, seed)
    fitted = fit_weights([p[fit_rows] for p in probs], y[fit_rows], metric, seed)
    held = [p[held_rows] for p in probs]
    return {f"heldout_{name}_{metric}": score(metric, mix(w, held), y[held_rows])
            for name, w in {"optimized": fitted, **others}.items()}


def choose_weights(cfg: EnsembleConfig, sources: list[Source], probs: list[np.ndarray],
                   y: np.ndarray) -> tuple[list[float], dict[str, float]]:
    """The weights ``cfg.weights`` names, and for `optimized` the metrics comparing them (fit and held out)."""
    n = len(sources)
    equal = np.full(n, 1.0 / n)
    by_score = np.array([s.score for s in sources])
    by_score = by_score / by_score.sum() if by_score.sum() > 0 else equal
    report = {}
    if cfg.weights == "optimized":
        report = heldout_report(probs, y, cfg.metric, cfg.seed, {"score": by_score, "equal": equal})
        chosen = fit_weights(probs, y, cfg.metric, cfg.seed)
        report[f"fit_optimized_{cfg.metric}"] = score(cfg.metric, mix(chosen, probs), y)
        report[f"fit_equal_{cfg.metric}"] = score(cfg.metric, mix(equal, probs), y)
    else:
        chosen = by_score if cfg.weights == "score" else equal
    logger.info("weights=%s: %s", cfg.weights, {s.run_id: round(float(w), 4) for s, w in zip(sources, chosen)})
    return [float(w) for w in chosen], report


@dataclass
class Voter:
    """The served classification ensemble: label and class probabilities, the members' weighted average."""

    members: list[Member]
    labels: list[str]
    batch_size: int

    def predict(self, texts: list[str]) -> pd.DataFrame:
        return prediction_frame(predict_proba(self.members, texts, self.batch_size), self.labels)


class SoftVote(Ensemble):
    """Sources' class probabilities averaged with per-source weights; predictions ``label``, ``prob_<class>``."""

    def check(self, sources: list[Source]) -> None:
        check_labels(sources)

    def weigh(self, cfg: EnsembleConfig, sources: list[Source]) -> tuple[list[float], dict[str, float]]:
        _, y, probs = align(sources)
        return choose_weights(cfg, sources, probs, y)

    def evaluate(self, cfg, sources, weights) -> tuple[dict[str, float], dict[str, object]]:
        rows, y, probs = align(sources)
        metrics = scores("ensemble", mix(weights, probs), y)
        for i, p in enumerate(probs):
            metrics.update(scores(f"source{i}", p, y))
        return metrics, {"oof_rows": len(rows), **{f"weight_{s.run_id}": round(w, 6) for s, w in zip(sources, weights)}}

    def spec(self, cfg, sources, members) -> dict:
        return {"labels": labels_of(sources[0].oof), "batch_size": cfg.eval_batch_size,
                "members": [{k: m[k] for k in ("name", "run_id", "source", "weight", "max_length")} for m in members]}

    def example(self, spec: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
        labels = spec["labels"]
        return (pd.DataFrame({"text": ["an example sentence", "another one"]}),
                prediction_frame(np.full((2, len(labels)), 1.0 / len(labels)), labels))

    def load(self, spec: dict, artifacts: dict[str, str]) -> Voter:
        labels = spec["labels"]
        return Voter([load_member(artifacts[m["name"]], m["weight"], labels, m["max_length"]) for m in spec["members"]],
                     labels, spec.get("batch_size", 64))
