"""The resume contract for a stage's parent run (docs/architecture.md §3): start, re-attach, refuse, share.

A stage invocation ends up attached to one parent run:
- ``resume=false``: always a new parent run;
- ``resume=true``: the newest parent of the stage with the same fingerprint (refused, with the differing
  settings listed, when the newest has other settings; a new one, said so, when there is none);
- ``resume_from=<run id>``: that run, refused when its settings differ.
Choosing or creating the parent happens under a lease, so workers started at the same instant with
``resume=true`` join one parent. Each worker then holds a *worker lease* in the parent's scope for as long
as it works on it: a RUNNING run without a live lease belongs to a dead process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

from pipelines.config import TUNABLE
from pipelines.data import Dataset
from pipelines.errors import ConfigError, NotFound, UserError
from pipelines.leases import Lease, LeaseStore, owner_alive
from pipelines.models import ModelSource, record_sources
from pipelines.settings import Coordinated, Settings, convert_value, describe_differences, fingerprint, redact
from pipelines.tasks import get_task, task_settings
from pipelines.tasks.base import Task
from pipelines.tasks.recorded import check_same_task
from pipelines.tracking import UNFINISHED, WORKER_TAG, Tracker, model_source_run, state_storage

logger = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config.json"
BEST_PARAMS_ARTIFACT = "best_params.json"
STATUS_REASON_TAG = "status_reason"
VERSIONED = ("torch", "transformers", "mlflow", "optuna")
PARENT_TAG = "mlflow.parentRunId"
MODEL_SOURCE_TAG = "model_source_run_id"  # the run (e.g. tapt) whose logged or registered model a stage starts from
PROJECT_ENTRY_TAG = "mlflow.project.entryPoint"  # set by `mlflow run` on its launcher run
OPEN_TIMEOUT = 600  # seconds a worker waits for another one choosing the same parent


class ResumeError(UserError):
    """A resume request cannot be honoured; the message says why and what to run instead."""


@dataclass
class StageContext:
    """Everything a stage's units need: settings, data, model, the open parent run and the lease store."""

    stage: str
    cfg: Settings
    tracker: Tracker
    inputs: dict  # fingerprint inputs
    fingerprint: str
    data: Dataset | None = None  # None for stages over other runs (ensemble)
    model: ModelSource | None = None
    leases: LeaseStore | None = None
    parent_id: str = ""
    resumed_status: str = ""  # status of the parent run before this invocation re-attached to it
    worker: Lease | None = field(default=None, repr=False)

    @property
    def task(self) -> Task:
        return get_task(self.cfg.task)

    @property
    def resumed(self) -> bool:
        return bool(self.resumed_status)

    def others_working(self) -> bool:
        """Whether another worker holds a live lease on this parent (then this one must not end it)."""
        own = self.worker.owner if self.worker else None
        return any(info.owner != own for info in self.leases.live(self.parent_id))


def open_stage(stage: str, cfg: Coordinated, data: Dataset, model: ModelSource, tracker: Tracker,
               extra_inputs: dict | None = None, checked_tags: dict | None = None) -> StageContext:
    """Start a new parent run of a training stage or re-attach to one, following the resume contract.

    ``extra_inputs`` are further result-affecting values for the fingerprint (e.g. a parsed search space);
    ``checked_tags`` are recorded on a new parent and must be equal on a resumed one (e.g. the Optuna storage).
    """
    if getattr(cfg, "params_from", ""):
        cfg = _with_best_params(cfg, tracker)
    init = getattr(model, "init", None)
    inputs = {"stage": stage, **cfg.result_settings(), "data_digest": data.digest, "model_digest": model.digest,
              **({"init_digest": init.digest} if init else {}), **(extra_inputs or {})}
    ctx = StageContext(stage, cfg, tracker, inputs, fingerprint(inputs), data=data, model=model)
    ctx = _open(ctx, lineage_tags(cfg, data, model), {"data_digest": data.digest, "model_digest": model.digest},
                checked_tags)
    record_sources(tracker, ctx.parent_id, model)  # the hub commit, the init_from snapshot: what resumes load
    return ctx


def lineage_tags(cfg: Coordinated, data: Dataset, model: ModelSource) -> dict[str, str]:
    """Where a stage's inputs come from, visible in the UI: the run whose model it starts from
    (``MODEL_SOURCE_TAG``), the init_from source, the params_from run, the config variant."""
    tags = {"data_digest": data.digest}
    source_run = model_source_run(model.name)
    if source_run:
        tags[MODEL_SOURCE_TAG] = source_run
    if getattr(model, "init", None):
        tags["init_from"] = model.init.source
    for name, tag in (("params_from", "params_source"), ("variant", "variant")):
        if getattr(cfg, name, ""):
            tags[tag] = getattr(cfg, name)
    return tags


def open_run(stage: str, cfg: Coordinated, tracker: Tracker, inputs: dict, tags: dict) -> StageContext:
    """The same contract for a stage without data or model of its own (e.g. ensemble over other runs)."""
    return _open(StageContext(stage, cfg, tracker, inputs, fingerprint(inputs)), tags, {})


def _open(ctx: StageContext, tags: dict, params: dict, checked_tags: dict | None = None) -> StageContext:
    tracker, stage = ctx.tracker, ctx.stage
    storage = state_storage(ctx.cfg.optuna_storage)
    ctx.leases = LeaseStore(storage, ctx.cfg.heartbeat_interval, ctx.cfg.grace_period)
    checked = {"optuna_storage": redact(storage), **(checked_tags or {})}
    with ctx.leases.wait_for(f"{tracker.experiment_id}/{stage}/{ctx.fingerprint}", "open", timeout=OPEN_TIMEOUT):
        parent = _choose_parent(ctx)
        if parent is None:
            _start_parent(ctx, {**tags, **checked}, params)
        else:
            _attach(ctx, parent, checked, params)
    tracker.adopt_launcher(ctx.parent_id, stage, ctx.resumed)
    _sweep_dead_runs(ctx)
    tracker.on_close(lambda: _sweep_when_finished(ctx))
    return ctx


def _choose_parent(ctx: StageContext):
    """The parent run to re-attach to, or None for a new one (raises ResumeError when the contract refuses)."""
    cfg, tracker, stage = ctx.cfg, ctx.tracker, ctx.stage
    if cfg.resume_from:
        parent = tracker.get_run(cfg.resume_from)
        if parent.data.tags.get("stage") != stage:
            raise ResumeError(f"resume_from={cfg.resume_from} is not a parent run of stage {stage} "
                              f"(its stage tag is {parent.data.tags.get('stage')!r}); pass the id of a {stage} run")
        _refuse_if_different(ctx, parent)
        return parent
    previous = tracker.parent_runs(stage)
    same = [run for run in previous if run.data.tags.get("fingerprint") == ctx.fingerprint]
    if cfg.resume and same:
        return same[0]
    if cfg.resume and previous:
        _refuse_if_different(ctx, previous[0])
    if cfg.resume:
        logger.warning("resume=true but experiment %s has no %s run to resume: starting a new run",
                       tracker.experiment_name, stage)
    unfinished = [run for run in same if run.info.status in UNFINISHED]
    if unfinished and not cfg.resume:
        run = unfinished[0]
        logger.warning("an unfinished %s run %s with the same settings exists (status %s); pass resume=true "
                       "to continue it. Starting a new run.", stage, run.info.run_id, run.info.status)
    return None


def _start_parent(ctx: StageContext, tags: dict, params: dict) -> None:
    ctx.parent_id = ctx.tracker.start_parent(ctx.stage, ctx.fingerprint, {**tags, **environment()})
    _hold(ctx)
    _record(ctx, params)
    logger.info("started %s run %s fingerprint=%s", ctx.stage, ctx.parent_id, ctx.fingerprint)


def _hold(ctx: StageContext) -> None:
    """Take this worker's lease on the parent (before anything could sweep it as dead) and let the tracker know
    that it is shared: a failing worker leaves it to the others."""
    ctx.worker = ctx.leases.acquire(ctx.parent_id, f"worker-{uuid.uuid4().hex}")
    ctx.tracker.on_close(ctx.worker.release)
    ctx.tracker.share(ctx.parent_id, ctx.others_working)


def _record(ctx: StageContext, params: dict) -> None:
    """The resolved settings as params and ``config.json`` (the record later stages read)."""
    ctx.tracker.log_params(ctx.parent_id, {**ctx.cfg.to_record(), **params, "fingerprint": ctx.fingerprint})
    record = {"settings": ctx.cfg.to_record(), "settings_source": ctx.cfg.settings_source,
              "fingerprint_inputs": ctx.inputs, "fingerprint": ctx.fingerprint}
    upload_json(ctx.tracker, ctx.parent_id, CONFIG_ARTIFACT, record)


def _attach(ctx: StageContext, parent, checked: dict, params: dict) -> None:
    tags = parent.data.tags
    for key, value in checked.items():
        if tags.get(key, value) != value:
            raise ResumeError(f"cannot resume {ctx.stage} run {parent.info.run_id}: it used {key}={tags[key]}, this "
                              f"invocation {key}={value}; pass {key}={tags[key]} (the state of its units is there)")
    old = {k: tags[k] for k in environment() if k in tags}
    changed = describe_differences(old, {k: v for k, v in environment().items() if k in old})
    if changed:
        logger.warning("run %s was started with other software or hardware (%s): results may differ in the last "
                       "bits from an uninterrupted run", parent.info.run_id, "; ".join(changed))
    ctx.parent_id, ctx.resumed_status = parent.info.run_id, parent.info.status
    if parent.info.status == "RUNNING" and not ctx.leases.live(ctx.parent_id):
        logger.warning("run %s is marked RUNNING but no worker holds it: its process died", ctx.parent_id)
    _hold(ctx)
    ctx.tracker.reopen(ctx.parent_id)
    if CONFIG_ARTIFACT not in ctx.tracker.list_artifacts(ctx.parent_id, ""):  # killed while it was started
        logger.warning("run %s has no %s: recording its settings now", ctx.parent_id, CONFIG_ARTIFACT)
        _record(ctx, params)


def environment() -> dict[str, str]:
    """Library versions and the device, recorded on every parent run."""
    import torch

    versions = {f"{name}_version": metadata.version(name) for name in VERSIONED}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {**versions, "device": device}


def _sweep_dead_runs(ctx: StageContext) -> None:
    """Mark RUNNING parents of this stage whose workers are all gone (no live lease) FAILED, and RUNNING
    ``mlflow run`` launcher runs whose process is gone KILLED, each tagged with why: the UI must not show
    runs that run forever. Runs whose leases live in another database, or younger than ``grace_period``
    (a worker may be between creating a run and taking its lease), are left alone."""
    tracker, storage = ctx.tracker, redact(state_storage(ctx.cfg.optuna_storage))
    running, dead = tracker.running_runs(), set()
    for run in running:
        tags, run_id = run.data.tags, run.info.run_id
        young = time.time() - run.info.start_time / 1000 < ctx.cfg.grace_period
        try:
            if tags.get("stage") == ctx.stage and run_id != ctx.parent_id and not young \
                    and tags.get("optuna_storage") == storage and not ctx.leases.live(run_id):
                tracker.mark_dead(run_id, "FAILED", "its process died: no worker holds a live lease on it")
                dead.add(run_id)
            elif tags.get(PROJECT_ENTRY_TAG) == ctx.stage and run_id != tracker.launcher_id() \
                    and _launcher_dead(ctx, run):
                tracker.mark_dead(run_id, "KILLED", "the process this mlflow run launched died")
        except Exception as exc:  # noqa: BLE001 - tidying up must never stop the stage
            logger.warning("could not check run %s for a dead process: %s", run_id, exc)
    for run in running:  # the units (folds, trials) its dead workers left RUNNING
        if run.data.tags.get(PARENT_TAG) in dead:
            tracker.mark_dead(run.info.run_id, "FAILED", "the process of its parent run died")


def _sweep_when_finished(ctx: StageContext) -> None:
    """Sweep again once the stage's parent run has finished: a launcher killed before its entry point tagged it
    was too young to judge when this invocation started, and must not stay RUNNING after the stage is done."""
    try:
        if ctx.tracker.get_run(ctx.parent_id).info.status == "FINISHED":
            _sweep_dead_runs(ctx)
    except Exception as exc:  # noqa: BLE001 - tidying up must never fail a finished stage
        logger.warning("could not sweep dead runs after %s run %s finished: %s", ctx.stage, ctx.parent_id, exc)


def _launcher_dead(ctx: StageContext, run) -> bool:
    """Whether the entry-point process of an ``mlflow run`` launcher run is gone.

    The entry point tags its launcher (``worker``) as its first act, seconds after ``mlflow run`` created the
    run with ``--env-manager local``: one still untagged after ``grace_period`` was killed before (with conda
    or virtualenv, building the environment comes in between: then only after an hour).
    """
    tags = run.data.tags
    worker = tags.get(WORKER_TAG, "")
    if not worker:
        return time.time() - run.info.start_time / 1000 > _launcher_window(ctx, run)
    alive = owner_alive(worker)
    if alive is not None:
        return not alive
    if "stage_run_id" not in tags:  # another host's invocation still starting: cannot tell, leave it
        return False
    process = worker.rsplit(":", 1)[0]  # host:pid of another host: alive while it holds a lease on its stage run
    return not any(info.owner.startswith(process + ":") for info in ctx.leases.live(tags["stage_run_id"]))


def _launcher_window(ctx: StageContext, run) -> float:
    """Seconds an untagged launcher may be starting: its own ``-P grace_period`` (``mlflow run`` logs the literal
    ``-P`` values; empty: not given, then this stage's), or an hour where it builds a conda/virtualenv first."""
    if run.data.tags.get("mlflow.project.env", "local") != "local":
        return 3600.0
    own = run.data.params.get("grace_period", "")
    try:
        return float(own) if own else float(ctx.cfg.grace_period)
    except ValueError:  # not a number: its entry point refused it and exited; this stage's window judges it
        return float(ctx.cfg.grace_period)


def _refuse_if_different(ctx: StageContext, run) -> None:
    if run.data.tags.get("fingerprint") == ctx.fingerprint:
        return
    try:
        differences = describe_differences(recorded(ctx.tracker, run.info.run_id)["fingerprint_inputs"], ctx.inputs)
    except NotFound:
        differences = ["(the earlier run recorded no config)"]
    raise ResumeError(
        f"cannot resume {ctx.stage} run {run.info.run_id}: these result-affecting settings differ: "
        f"{'; '.join(differences)}. Pass the original values to continue it, or resume=false to start a new run."
    )


def recorded(tracker: Tracker, run_id: str) -> dict:
    """A stage run's ``config.json``: ``settings`` (the resolved values it used), ``fingerprint_inputs``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(tracker.download(run_id, CONFIG_ARTIFACT, tmp).read_text())
        except Exception as exc:  # noqa: BLE001 - missing, unreadable or not ours
            raise NotFound(f"run {run_id} has no readable {CONFIG_ARTIFACT} ({exc}); it was not made by a pipelines "
                           "stage, or died before recording its settings: pass a finished stage run") from None


def recorded_settings(tracker: Tracker, run_id: str) -> dict:
    """The resolved settings a stage run used. Never read a run's params for this: under ``mlflow run`` the
    launcher's params hold the literal ``-P`` values."""
    return recorded(tracker, run_id)["settings"]


def _with_best_params(cfg, tracker: Tracker):
    """``cfg`` with the parameters of the optuna or kfold run ``cfg.params_from`` (``latest``: newest search) over
    its defaults, ``config_file`` and variant values; settings given explicitly (flags, ``config``) win.

    From an optuna run: the parameters its search space searched (its best ones), never its fixed settings. From a
    kfold run: its recorded tunable settings. For ``epochs=0`` (retrain) without searched epochs: a kfold's mean
    best epoch over its folds, rounded to the nearest whole epoch, else the source's own ``epochs``.
    """
    source, stage, used = _params_source(cfg, tracker)
    if stage == "optuna":
        with tempfile.TemporaryDirectory() as tmp:
            settings = json.loads(tracker.download(source, BEST_PARAMS_ARTIFACT, tmp).read_text())
    else:
        fields = {f.name: f for f in dataclasses.fields(cfg)}
        settings = {name: convert_value(name, used[name], fields[name].default) for name in TUNABLE
                    if name != "epochs" and cfg.applies(fields[name]) and name in used}
    if not cfg.epochs and "epochs" not in settings:  # retrain's epochs=0: take them from the source
        if used.get("objective") == "generate":
            raise ConfigError(f"params_from={cfg.params_from} is a generation-only search (no training settings): "
                              "pass epochs=N")
        folds = [r for r in tracker.child_runs(source, "fold").values() if "final_best_epoch" in r.data.metrics]
        best = [r.data.metrics["final_best_epoch"] for r in folds]
        settings["epochs"] = max(1, round(float(np.mean(best)))) if best else int(used["epochs"])
    kept = [name for name in settings if cfg.settings_source.get(name) == "explicit"
            and (name != "epochs" or cfg.epochs)]  # epochs=0 asks for the source's epochs
    taken = {name: value for name, value in settings.items() if name not in kept}
    logger.info("params_from=%s: using parameters of %s run %s: %s%s", cfg.params_from, stage, source, taken,
                f"; given explicitly, kept: {', '.join(f'{n}={getattr(cfg, n)}' for n in kept)}" if kept else "")
    return dataclasses.replace(cfg, params_from=source, **taken,
                               settings_source={**cfg.settings_source, **dict.fromkeys(taken, "params_from")})


def _params_source(cfg, tracker: Tracker) -> tuple[str, str, dict]:
    """The run ``params_from`` names (``latest``: the newest finished search), its stage and recorded settings."""
    source = cfg.params_from
    if source == "latest":
        runs = [r for r in tracker.parent_runs("optuna") if r.info.status == "FINISHED"]
        if not runs:
            raise NotFound("params_from=latest: no finished optuna run in this experiment; run -e optuna first")
        source = runs[0].info.run_id
    stage = tracker.get_run(source).data.tags.get("stage")
    if stage not in ("optuna", "kfold"):
        raise NotFound(f"params_from={cfg.params_from}: run {source} is a {stage or 'non-stage'} run; pass an "
                       "optuna or kfold run id (or latest)")
    used = recorded_settings(tracker, source)
    recorded = used.get("task", "classification")  # runs of versions without tasks trained classifiers
    check_same_task(recorded, cfg.task, f"params_from={cfg.params_from}: run {source} trained task={recorded}, "
                                        f"this stage task={cfg.task}; pass a {cfg.task} run, or task={recorded}")
    for name in getattr(task_settings(cfg.task), "SAME_AS_PARAMS_SOURCE", ()):  # what its parameters are relative to
        if name in used and str(used[name]) != str(getattr(cfg, name)):
            raise ConfigError(f"params_from={cfg.params_from}: run {source} was trained with {name}={used[name]!r}, "
                              f"this stage has {name}={getattr(cfg, name)!r}, and the parameters it brings depend on "
                              f"it; pass {name}={used[name]}, or a params_from run trained with yours")
    return source, stage, used


def upload_json(tracker: Tracker, run_id: str, name: str, payload: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/{name}"
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
        tracker.upload(run_id, path)
