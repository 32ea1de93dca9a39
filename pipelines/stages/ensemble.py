"""`ensemble`: weighted soft voting over kfold/train runs, logged and registered as one pyfunc model.

A *source* is a kfold parent run (all its fold models, averaged equally) or a train run (its one
model). Vote weights are per source: `equal`, `score` (each source's validation metric, normalised)
or `optimized` (a point of the probability simplex fitted on the sources' out-of-fold predictions
to maximise `metric`; reported against `score` and `equal` on rows the fit did not see).

The stage is resumable like every other (docs/architecture.md §3). Its steps, each done at most once per
ensemble run: log params and metrics, log the pyfunc model, register it as a new version of
`registered_model_name`, point `alias` at that version, finish the run. A resumed run that already
registered a version only points the alias at it; one that logged the model but did not register it
registers that model; otherwise it does the whole thing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

import pipelines
from pipelines import faults
from pipelines.config import EnsembleConfig
from pipelines.data import read_artifact_csv
from pipelines.errors import NotFound, UserError
from pipelines.mbr import mbr_choice
from pipelines.rouge import corpus_scores
from pipelines.serving import SPEC, EnsembleModel, SummaryEnsembleModel, prediction_frame
from pipelines.stages.common import PREDICTIONS_ARTIFACT, log_once
from pipelines.stages.contract import open_run, recorded_settings, upload_json
from pipelines.stages.kfold import OOF_ARTIFACT
from pipelines.tracking import (
    Tracker,
    log_pyfunc,
    logged_model_uri,
    model_versions_of_run,
    register_model,
    set_alias,
)

logger = logging.getLogger(__name__)
STAGE = "ensemble"
METRICS = {"accuracy": accuracy_score, "f1_macro": lambda y, p: f1_score(y, p, average="macro")}


class EnsembleError(UserError):
    """A source or member cannot be used, or a resume request cannot be honoured; the message says why."""


@dataclass
class Source:
    run_id: str
    stage: str
    members: list[str]  # run ids holding a `model/` artifact
    oof: pd.DataFrame  # row_id, label, prob_<class>...
    score: float
    fingerprint: str
    data_digest: str
    max_length: int  # as the source run recorded it in its config.json (the value its models were trained with)
    task: str = "classification"
    rouge_tokenizer: str = "whitespace"

    @property
    def labels(self) -> list[str]:
        return [c.removeprefix("prob_") for c in self.oof.columns if c.startswith("prob_")]


def run(cfg: EnsembleConfig) -> dict[str, float]:
    with Tracker(cfg.experiment_name) as tracker, tempfile.TemporaryDirectory(prefix="pipelines-ens-") as tmp:
        sources = _sources(tracker, cfg, Path(tmp))
        ctx = open_run(STAGE, cfg, tracker, fingerprint_inputs(cfg, sources), _lineage(sources))
        parent = ctx.parent_id
        if ctx.resumed_status == "FINISHED":
            logger.info("ensemble run %s already finished: nothing to do", parent)
            tracker.finish(parent)
            return tracker.metrics(parent)
        with ctx.leases.wait_for(parent, "unit"):  # one worker publishes; another one then finds it done
            version = _publish(tracker, parent, cfg, sources, Path(tmp))
            tracker.finish(parent)
        metrics = tracker.metrics(parent)
    logger.info("ensemble run %s: %s registered as %s version %s (alias %s)", parent,
                " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("ensemble_")),
                cfg.registered_model_name, version, cfg.alias)
    return metrics


# ---------------------------------------------------------------- sources


def _sources(tracker: Tracker, cfg: EnsembleConfig, tmp: Path) -> list[Source]:
    sources = [_source(tracker, run_id, cfg.metric, tmp) for run_id in cfg.source_ids()]
    if len({s.task for s in sources}) > 1:
        raise EnsembleError(f"the sources mix tasks ({', '.join(f'{s.run_id}: {s.task}' for s in sources)}): "
                            "pass runs of one task")
    if sources[0].task == "summarization":
        _check_summary_sources(sources)
    labels = sources[0].labels
    for source in sources[1:]:
        if source.labels != labels:
            raise EnsembleError(f"source {source.run_id} predicts {source.labels}, {sources[0].run_id} {labels}")
    return sources


def _source(tracker: Tracker, run_id: str, metric: str, tmp: Path) -> Source:
    try:
        run = tracker.get_run(run_id)
    except NotFound as exc:
        raise EnsembleError(f"source run {run_id}: {exc}") from None
    stage, tags = run.data.tags.get("stage"), run.data.tags
    if run.info.status != "FINISHED" or stage not in ("kfold", "train"):
        raise EnsembleError(f"source run {run_id} is a {stage or 'non-stage'} run with status {run.info.status}; "
                            "pass FINISHED kfold or train runs")
    settings = recorded_settings(tracker, run_id)
    task = settings.get("task", "classification")
    metric = metric if task == "classification" else "rouge_mean"
    if stage == "kfold":
        folds = sorted(tracker.child_runs(run_id, "fold").items(), key=lambda kv: int(kv[0]))
        members = [r.info.run_id for _, r in folds if r.info.status == "FINISHED"]
        oof_path, score = OOF_ARTIFACT, run.data.metrics[f"cv_{metric}_mean"]
    else:
        members, oof_path, score = [run_id], PREDICTIONS_ARTIFACT, run.data.metrics[f"final_{metric}"]
    try:
        oof = read_artifact_csv(tracker.download(run_id, oof_path, tmp / run_id),
                                ("label", "source", "reference", "generated"))
    except Exception as exc:  # noqa: BLE001 - missing or unreadable artifact
        raise EnsembleError(f"source run {run_id} has no readable {oof_path} ({exc})") from None
    # the value used is the value recorded: params may hold what `mlflow run -P` was given, not what was used
    max_length = int(settings["max_length" if task == "classification" else "max_source_length"])
    return Source(run_id, stage, members, oof.drop(columns=["fold", "predicted"], errors="ignore"), score,
                  tags.get("fingerprint", ""), tags.get("data_digest", ""), max_length, task,
                  settings.get("rouge_tokenizer", "whitespace"))


def _check_summary_sources(sources: list[Source]) -> None:
    """Summary sources are voted and scored with one ROUGE on one set of rows: the same recorded ``rouge_tokenizer``,
    and the same source text and reference on every shared out-of-fold row."""
    tokenizers = {s.run_id: s.rouge_tokenizer for s in sources}
    if len(set(tokenizers.values())) > 1:
        raise EnsembleError(f"the sources recorded different rouge_tokenizer settings ("
                            f"{', '.join(f'{run}: {name}' for run, name in tokenizers.items())}): their ROUGE scores "
                            "are not comparable; pass runs trained with one rouge_tokenizer")
    rows = sorted(set.intersection(*(set(s.oof["row_id"]) for s in sources)))
    if not rows:
        raise EnsembleError("the sources share no out-of-fold rows: were they trained on the same data?")
    first = sources[0].oof.set_index("row_id").loc[rows]
    for source in sources[1:]:
        frame = source.oof.set_index("row_id").loc[rows]
        for column in ("source", "reference"):
            differ = [row for row, a, b in zip(rows, first[column], frame[column]) if a != b]
            if differ:
                row = differ[0]
                raise EnsembleError(
                    f"sources {sources[0].run_id} and {source.run_id} have different {column} texts on {len(differ)} "
                    f"of their {len(rows)} shared rows (row ids {differ[:10]}; row {row}: "
                    f"{first.at[row, column][:80]!r} vs {frame.at[row, column][:80]!r}): they were not trained on "
                    "the same data; pass runs of one data file")


def fingerprint_inputs(cfg: EnsembleConfig, sources: list[Source]) -> dict:
    """Every result-affecting setting, and each source run with its own fingerprint."""
    return {"stage": STAGE, **cfg.result_settings(), "source_runs": ",".join(s.run_id for s in sources),
            "source_fingerprints": {s.run_id: s.fingerprint for s in sources}}


# ---------------------------------------------------------------- log, register, alias


def _publish(tracker: Tracker, run_id: str, cfg: EnsembleConfig, sources: list[Source], tmp: Path) -> str:
    """Do what run ``run_id`` has not done yet of: evaluate and log the model, register it, set the alias."""
    name = cfg.registered_model_name
    versions = model_versions_of_run(name, run_id)
    if versions:
        version = versions[-1]
        logger.info("run %s already registered %s version %s: reused version %s (not logged or registered again)",
                    run_id, name, version, version)
    else:
        model_uri = logged_model_uri(run_id)
        if model_uri:
            logger.info("run %s already logged model %s: registering it (not logged again)", run_id, model_uri)
        else:
            model_uri = _evaluate_and_log(tracker, run_id, cfg, sources, tmp)
            faults.failpoint("ensemble_logged")
        version = register_model(model_uri, name)
        faults.failpoint("ensemble_registered")
    set_alias(name, cfg.alias, version)
    return version


def _evaluate_and_log(tracker: Tracker, run_id: str, cfg: EnsembleConfig, sources: list[Source], tmp: Path) -> str:
    """Weights and metrics on the shared out-of-fold rows, then the pyfunc model; returns its URI."""
    if sources[0].task == "summarization":
        return _summary_evaluate_and_log(tracker, run_id, cfg, sources, tmp)
    labels = sources[0].labels
    rows, y, probs = _align(sources, labels)
    weights, report = _weights(cfg, sources, probs, y)
    members = _download_members(tracker, sources, weights, cfg.skip_missing, tmp)
    # the weights of the model actually registered (renormalised if skip_missing dropped a source)
    weights = [sum(m["weight"] for m in members if m["source"] == s.run_id) for s in sources]
    tracker.log_params(run_id, {"oof_rows": len(rows),
                                **{f"weight_{s.run_id}": round(w, 6) for s, w in zip(sources, weights)}})
    metrics = {**report, **_scores("ensemble", mix(weights, probs), y)}
    for i, p in enumerate(probs):
        metrics.update(_scores(f"source{i}", p, y))
    log_once(tracker, run_id, metrics)
    return _log_model(tracker, run_id, cfg, members, labels, tmp)


def _log_model(tracker: Tracker, run_id: str, cfg: EnsembleConfig, members: list[dict], labels: list[str],
               tmp: Path) -> str:
    spec = {"labels": labels, "batch_size": cfg.eval_batch_size,
            "members": [{k: m[k] for k in ("name", "run_id", "source", "weight", "max_length")} for m in members]}
    upload_json(tracker, run_id, SPEC, spec)
    spec_path = tmp / SPEC
    spec_path.write_text(json.dumps(spec, indent=2))
    example = pd.DataFrame({"text": ["an example sentence", "another one"]})
    output = prediction_frame(np.full((2, len(labels)), 1.0 / len(labels)), labels)
    return log_pyfunc(run_id, EnsembleModel(), {"spec": str(spec_path), **{m["name"]: m["path"] for m in members}},
                      example, output, code_paths=[str(Path(pipelines.__file__).parent)])


def _summary_evaluate_and_log(tracker: Tracker, run_id: str, cfg: EnsembleConfig, sources: list[Source],
                              tmp: Path) -> str:
    """Summarization: per input, the members' summary with the highest mean ROUGE to the others (minimum Bayes
    risk; ties go to the one agreeing most with the source text). Scored on the shared out-of-fold rows with the
    sources' own OOF summaries as candidates."""
    tokenizer = sources[0].rouge_tokenizer
    rows = sorted(set.intersection(*(set(s.oof["row_id"]) for s in sources)))
    frames = [s.oof.set_index("row_id").loc[rows] for s in sources]
    candidates = [f["generated"].tolist() for f in frames]
    texts, runs = frames[0]["source"].tolist(), ",".join(s.run_id for s in sources)
    chosen = [mbr_choice([c[i] for c in candidates], tokenizer, source=texts[i],
                         setting=f"the summary vote of source_runs={runs} on out-of-fold row_id {row}")
              for i, row in enumerate(rows)]
    references = frames[0]["reference"].tolist()
    metrics = {f"ensemble_{k}": v for k, v in corpus_scores(
        references, [candidates[c][i] for i, c in enumerate(chosen)], tokenizer).items()}
    for i, summaries in enumerate(candidates):
        metrics.update({f"source{i}_{k}": v for k, v in corpus_scores(references, summaries, tokenizer).items()})
    members = _download_members(tracker, sources, [1.0] * len(sources), cfg.skip_missing, tmp)
    tracker.log_params(run_id, {"oof_rows": len(rows), "selection": "minimum Bayes risk (ROUGE)"})
    log_once(tracker, run_id, metrics)
    spec = {"rouge_tokenizer": tokenizer, "batch_size": cfg.eval_batch_size,
            "members": [{k: m[k] for k in ("name", "run_id", "source", "max_length")} for m in members]}
    upload_json(tracker, run_id, SPEC, spec)
    (tmp / SPEC).write_text(json.dumps(spec, indent=2))
    example = pd.DataFrame({"text": ["an example document", "another one"]})
    output = pd.DataFrame({"summary": ["a summary", "another"], "member": [0, 0]})
    return log_pyfunc(run_id, SummaryEnsembleModel(), {"spec": str(tmp / SPEC), **{m["name"]: m["path"]
                                                                                     for m in members}},
                      example, output, code_paths=[str(Path(pipelines.__file__).parent)])


# ---------------------------------------------------------------- weights


def _align(sources: list[Source], labels: list[str]):
    """Rows predicted out-of-fold by every source: row ids, true label ids, one probability matrix per source."""
    rows = sorted(set.intersection(*(set(s.oof["row_id"]) for s in sources)))
    if not rows:
        raise EnsembleError("the sources share no out-of-fold rows: were they trained on the same data?")
    frames = [s.oof.set_index("row_id").loc[rows] for s in sources]
    for source, frame in zip(sources[1:], frames[1:]):
        if not frame["label"].equals(frames[0]["label"]):
            raise EnsembleError(f"sources {sources[0].run_id} and {source.run_id} disagree on the true labels of "
                                "their shared rows: they were not trained on the same data")
    y = frames[0]["label"].map({name: i for i, name in enumerate(labels)}).to_numpy()
    return rows, y, [f[[f"prob_{name}" for name in labels]].to_numpy() for f in frames]


def mix(weights, probs: list[np.ndarray]) -> np.ndarray:
    """The weighted soft vote of per-source probability matrices."""
    return sum(w * p for w, p in zip(weights, probs))


def _score(metric: str, probs: np.ndarray, y: np.ndarray) -> float:
    return float(METRICS[metric](y, probs.argmax(axis=1)))


def _scores(prefix: str, probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_{name}": _score(name, probs, y) for name in METRICS}


def fit_weights(probs: list[np.ndarray], y: np.ndarray, metric: str, seed: int, samples: int = 2000) -> np.ndarray:
    """Simplex weights maximising ``metric``: equal, each corner and Dirichlet samples; ties keep the earlier."""
    n = len(probs)
    rng = np.random.default_rng(seed)
    candidates = np.vstack([np.full(n, 1.0 / n), np.eye(n), rng.dirichlet(np.ones(n), size=samples)])
    values = [_score(metric, mix(weights, probs), y) for weights in candidates]
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
    return {f"heldout_{name}_{metric}": _score(metric, mix(w, held), y[held_rows])
            for name, w in {"optimized": fitted, **others}.items()}


def _weights(cfg: EnsembleConfig, sources: list[Source], probs: list[np.ndarray], y: np.ndarray):
    n = len(sources)
    equal = np.full(n, 1.0 / n)
    score = np.array([s.score for s in sources])
    score = score / score.sum() if score.sum() > 0 else equal
    report = {}
    if cfg.weights == "optimized":
        report = heldout_report(probs, y, cfg.metric, cfg.seed, {"score": score, "equal": equal})
        chosen = fit_weights(probs, y, cfg.metric, cfg.seed)
        report[f"fit_optimized_{cfg.metric}"] = _score(cfg.metric, mix(chosen, probs), y)
        report[f"fit_equal_{cfg.metric}"] = _score(cfg.metric, mix(equal, probs), y)
    else:
        chosen = score if cfg.weights == "score" else equal
    logger.info("weights=%s: %s", cfg.weights, {s.run_id: round(float(w), 4) for s, w in zip(sources, chosen)})
    return [float(w) for w in chosen], report


# ---------------------------------------------------------------- members and lineage


def _download_members(tracker: Tracker, sources: list[Source], weights: list[float], skip_missing: bool,
                      tmp: Path) -> list[dict]:
    """Member model folders with their vote weight (source weight shared equally among its models)."""
    members = []
    for source, weight in zip(sources, weights):
        if weight == 0:
            logger.info("source %s has weight 0: its models are left out of the served model", source.run_id)
            continue
        found = []
        for run_id in source.members:
            try:
                found.append((run_id, tracker.download(run_id, "model", tmp / "members" / run_id)))
            except Exception as exc:  # noqa: BLE001 - any failure means the member is unusable
                if not skip_missing:
                    raise EnsembleError(f"member run {run_id} (of source {source.run_id}) has no loadable model/ "
                                        f"artifact ({exc}); pass skip_missing=true to leave it out") from None
                logger.warning("member run %s skipped: no model/ artifact (%s)", run_id, exc)
        members += [{"name": f"member-{len(members) + i}", "run_id": run_id, "source": source.run_id,
                     "path": str(path), "weight": weight / len(found), "max_length": source.max_length}
                    for i, (run_id, path) in enumerate(found)]
    if not members:
        raise EnsembleError("no member model could be loaded")
    total = sum(m["weight"] for m in members)
    for m in members:  # renormalise when skip_missing dropped a whole source
        m["weight"] /= total
    return members


def _lineage(sources: list[Source]) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(pipelines.__file__).parent, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"member_runs": ",".join(m for s in sources for m in s.members),
            "source_fingerprints": ",".join(s.fingerprint for s in sources),
            "data_digests": ",".join(sorted({s.data_digest for s in sources})), "code_version": commit}
