"""`ensemble`: one pyfunc model from kfold/train runs of one task, logged and registered.

A *source* is a kfold parent run (all its fold models, averaged equally) or a train run (its one model). How the
sources vote is their task's (``Task.ensemble``, pipelines/tasks/ensemble.py): classifiers by weighted soft voting
(pipelines/tasks/voting.py), summarizers by minimum Bayes risk (pipelines/tasks/summarization/mbr_vote.py). The
served model is pipelines/serving.py's ``EnsembleModel``, its spec ``ensemble.json`` naming the task.

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
from pathlib import Path

import pipelines
from pipelines import faults
from pipelines.config import EnsembleConfig
from pipelines.errors import NotFound
from pipelines.serving import SPEC, TASK_METADATA, EnsembleModel
from pipelines.stages.common import PREDICTIONS_ARTIFACT, log_once
from pipelines.stages.contract import open_run, recorded_settings, upload_json
from pipelines.stages.kfold import OOF_ARTIFACT
from pipelines.tasks import TASKS, get_task
from pipelines.tasks.ensemble import Ensemble, EnsembleError, Source
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
    sources = [_source(tracker, run_id, cfg, tmp) for run_id in cfg.source_ids()]
    if len({s.task for s in sources}) > 1:
        raise EnsembleError(f"the sources mix tasks ({', '.join(f'{s.run_id}: {s.task}' for s in sources)}): "
                            "pass runs of one task")
    _strategy(sources[0].task, sources[0].run_id).check(sources)
    return sources


def _strategy(task: str, run_id: str) -> Ensemble:
    """The ensemble strategy of ``task``, or a refusal naming the source run of that task."""
    strategy = get_task(task).ensemble
    if strategy is None:
        able = [name for name in TASKS if get_task(name).ensemble is not None]
        raise EnsembleError(f"source run {run_id} is a task={task} run, and that task has no ensemble: pass kfold or "
                            f"train runs of a task that has one ({', '.join(able)})")
    return strategy


def _source(tracker: Tracker, run_id: str, cfg: EnsembleConfig, tmp: Path) -> Source:
    try:
        run = tracker.get_run(run_id)
    except NotFound as exc:
        raise EnsembleError(f"source run {run_id}: {exc}") from None
    stage, tags = run.data.tags.get("stage"), run.data.tags
    if run.info.status != "FINISHED" or stage not in ("kfold", "train"):
        raise EnsembleError(f"source run {run_id} is a {stage or 'non-stage'} run with status {run.info.status}; "
                            "pass FINISHED kfold or train runs")
    # the value used is the value recorded: params may hold what `mlflow run -P` was given, not what was used
    settings = recorded_settings(tracker, run_id)
    task = get_task(settings.get("task", "classification"))
    metric = _strategy(task.name, run_id).metric(cfg)
    if stage == "kfold":
        folds = sorted(tracker.child_runs(run_id, "fold").items(), key=lambda kv: int(kv[0]))
        members = [r.info.run_id for _, r in folds if r.info.status == "FINISHED"]
        oof_path, score = OOF_ARTIFACT, run.data.metrics[f"cv_{metric}_mean"]
    else:
        members, oof_path, score = [run_id], PREDICTIONS_ARTIFACT, run.data.metrics[f"final_{metric}"]
    try:
        oof = task.read_predictions(tracker.download(run_id, oof_path, tmp / run_id))
    except Exception as exc:  # noqa: BLE001 - missing or unreadable artifact
        raise EnsembleError(f"source run {run_id} has no readable {oof_path} ({exc})") from None
    return Source(run_id, stage, task.name, members, oof, score, settings, int(settings[task.input_length_setting]),
                  tags.get("fingerprint", ""), tags.get("data_digest", ""))


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
    task = sources[0].task
    strategy = _strategy(task, sources[0].run_id)
    weights, report = strategy.weigh(cfg, sources)
    members = _download_members(tracker, sources, weights, cfg.skip_missing, tmp)
    # the weights of the model actually registered (renormalised if skip_missing dropped a source)
    weights = [sum(m["weight"] for m in members if m["source"] == s.run_id) for s in sources]
    metrics, params = strategy.evaluate(cfg, sources, weights)
    tracker.log_params(run_id, params)
    log_once(tracker, run_id, {**report, **metrics})
    spec = {"task": task, **strategy.spec(cfg, sources, members)}
    upload_json(tracker, run_id, SPEC, spec)
    (tmp / SPEC).write_text(json.dumps(spec, indent=2))
    example, output = strategy.example(spec)
    return log_pyfunc(run_id, EnsembleModel(), {"spec": str(tmp / SPEC), **{m["name"]: m["path"] for m in members}},
                      example, output, code_paths=[str(Path(pipelines.__file__).parent)],
                      metadata={TASK_METADATA: task})


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
