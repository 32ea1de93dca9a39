"""The tracking layer: the only module that imports mlflow.

A stage invocation owns one *parent run* (tags ``stage`` and ``fingerprint``); its resumable units
(folds, trials) are child runs tagged with the unit's key.  Every run this process opens is closed
with the right status: FINISHED on success, FAILED on an exception, KILLED on SIGTERM/SIGINT.

Under ``mlflow run`` the launcher's run (``MLFLOW_RUN_ID``) becomes the parent of a new stage
invocation; when the invocation resumes an older parent instead, the launcher run stays a thin
record of the invocation, tagged ``resumed_run_id``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.config import NotFound

logger = logging.getLogger(__name__)

EMBEDDED_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
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


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the embedded default ``sqlite:///mlruns/mlflow.db`` (artifacts in mlruns/)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        Path("mlruns").mkdir(exist_ok=True)
        uri = os.environ["MLFLOW_TRACKING_URI"] = EMBEDDED_TRACKING_URI
    return uri


class Tracker:
    """Runs, params, metrics and artifacts of one stage invocation; a context manager that closes them."""

    def __init__(self, experiment_name: str = ""):
        mlflow.set_tracking_uri(tracking_uri())
        self.client = MlflowClient()
        self.experiment_id = self._experiment(experiment_name)
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        self._open: list[str] = []

    def _experiment(self, name: str) -> str:
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
        if not name and os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = name or "Default"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise RuntimeError(f"experiment {name!r} is deleted; restore it in the MLflow UI or pick another name")
            return experiment.experiment_id
        return self.client.create_experiment(name)

    # ------------------------------------------------------------ status

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        status = "KILLED" if issubclass(exc_type, (Interrupted, KeyboardInterrupt)) else "FAILED"
        for run_id in reversed(self._open):
            self.client.set_terminated(run_id, status)
            logger.error("marked run %s status=%s reason=%s", run_id, status, exc)
        self._open.clear()

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")
        self._open.remove(run_id)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")
        self._open.append(run_id)

    # ------------------------------------------------------------ runs

    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise NotFound(f"run {run_id} not found in {tracking_uri()}: {exc.message}") from None

    def parent_runs(self, stage: str) -> list:
        """Parent runs of ``stage`` in this experiment, newest first."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.stage = '{stage}'", order_by=["attributes.start_time DESC"]
        )

    def start_parent(self, stage: str, fingerprint: str, tags: dict[str, str]) -> str:
        """A new parent run; under ``mlflow run`` the launcher's own run is adopted."""
        tags = {"stage": stage, "fingerprint": fingerprint, **tags}
        launcher = self._launcher_run()
        if launcher is not None:
            run_id = launcher
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{stage}").info.run_id
        self._open.append(run_id)
        return run_id

    def note_resume(self, parent_id: str) -> None:
        """Under ``mlflow run``, tag the launcher run with the parent run it resumed."""
        launcher = self._launcher_run()
        if launcher is not None and launcher != parent_id:
            self.client.set_tag(launcher, "resumed_run_id", parent_id)
            self.client.set_tag(launcher, MLFLOW_RUN_NAME, f"resume of {parent_id[:8]}")

    def _launcher_run(self) -> str | None:
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id and self.client.get_run(run_id).info.experiment_id == self.experiment_id:
            return run_id
        return None

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

    def metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        if key in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, key)

    # ------------------------------------------------------------ artifacts

    def upload(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder's contents to ``artifact_path`` of the run."""
        local_path = Path(local_path)
        if local_path.is_dir():
            self.client.log_artifacts(run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local_path), artifact_path)

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))

    def list_artifacts(self, run_id: str, path: str) -> list[str]:
        return [info.path for info in self.client.list_artifacts(run_id, path)]

    def delete_artifacts(self, run_id: str, path: str) -> None:
        repo = get_artifact_repository(self.client.get_run(run_id).info.artifact_uri)
        repo.delete_artifacts(path)


def download_model(uri: str, dst: str | Path) -> Path:
    """Download a ``runs:/`` or ``models:/`` URI to a local folder."""
    tracking_uri()
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except mlflow.exceptions.MlflowException as exc:
        raise FileNotFoundError(f"model {uri} could not be downloaded: {exc.message}") from None


def log_pyfunc_model(run_id: str, python_model, artifacts: dict[str, str], input_example, output_example,
                     registered_name: str, alias: str, code_paths: list[str]) -> str:
    """Log a pyfunc model as the last step of ``run_id`` (which it ends), register it, point ``alias`` at it.

    Returns the registered version.
    """
    from mlflow.models import infer_signature

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model,
            artifacts=artifacts,
            code_paths=code_paths,
            signature=infer_signature(input_example, output_example),
            input_example=input_example,
            registered_model_name=registered_name,
        )
        mlflow.set_tag("model_uri", info.model_uri)
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(registered_name, alias, version)
    return version


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
