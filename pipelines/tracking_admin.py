"""The tracking layer's administrative side, for ``pipelines`` (pipelines/manage.py): read a whole store, delete
checkpoints and runs, copy runs between stores. Like pipelines/tracking.py, and reusing it, it imports mlflow;
callers only see plain :class:`RunRecord` values and artifact paths.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.errors import NotFound
from pipelines.tracking import Tracker, tracking_uri

logger = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PAGE = 1000  # runs per search page (the store's maximum is larger)


@dataclass(frozen=True)
class RunRecord:
    """One run as the management commands see it (times in epoch milliseconds, ``end_ms`` 0 while it runs)."""

    run_id: str
    experiment_id: str
    experiment: str
    name: str
    status: str
    start_ms: int
    end_ms: int
    artifact_uri: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def parent_id(self) -> str:
        return self.tags.get(MLFLOW_PARENT_RUN_ID, "")

    @property
    def stage(self) -> str:
        return self.tags.get("stage", "")


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the run's artifact root
    size: int


class AdminStore:
    """The tracking store named by MLFLOW_TRACKING_URI (or the embedded default, as every stage uses it).

    A missing SQLite store is refused (NotFound) unless ``create`` (a restore into a new store).
    """

    def __init__(self, create: bool = False) -> None:
        self.uri = tracking_uri(create=create)
        self.client = MlflowClient(tracking_uri=self.uri)
        mlflow.set_tracking_uri(self.uri)  # artifact downloads resolve runs through the fluent default

    # ------------------------------------------------------------ reading

    def experiments(self) -> dict[str, str]:
        """Active experiments: id -> name."""
        found, token = {}, None
        while True:
            page = self.client.search_experiments(ViewType.ACTIVE_ONLY, max_results=PAGE, page_token=token)
            found.update({e.experiment_id: e.name for e in page})
            token = page.token
            if not token:
                return found

    def experiment_id(self, name_or_id: str) -> str:
        """The id of the active experiment named (or numbered) ``name_or_id``; NotFound says which exist."""
        experiments = self.experiments()
        for experiment_id, name in experiments.items():
            if name == name_or_id:
                return experiment_id
        if name_or_id in experiments:
            return name_or_id
        known = ", ".join(sorted(experiments.values())) or "none"
        raise NotFound(f"experiment {name_or_id!r} not found in {self.uri} (experiments there: {known}); check "
                       "the name, or MLFLOW_TRACKING_URI if it should be in another store")

    def runs(self, experiment_ids: list[str]) -> list[RunRecord]:
        """Every active run of the experiments, newest first."""
        names = self.experiments()
        found, token = [], None
        while experiment_ids:
            page = self.client.search_runs(experiment_ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=PAGE,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            found += [_record(run, names.get(run.info.experiment_id, "")) for run in page]
            token = page.token
            if not token:
                break
        return found

    def run(self, run_id: str) -> RunRecord:
        if RUN_ID.match(run_id):
            try:
                run = self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                experiment = self.client.get_experiment(run.info.experiment_id).name
                return _record(run, experiment)
        raise NotFound(f"run {run_id!r} not found in {self.uri}; list the runs there with `pipelines runs`, or "
                       "point MLFLOW_TRACKING_URI at the store that holds it")

    def files(self, run_id: str, path: str = "") -> list[ArtifactFile]:
        """Every artifact file under ``path`` of the run, recursively, with its size."""
        found = []
        for info in self.client.list_artifacts(run_id, path or None):
            if info.is_dir:
                found += self.files(run_id, info.path)
            else:
                found.append(ArtifactFile(info.path, int(info.file_size or 0)))
        return found

    def top_level(self, run_id: str) -> list[str]:
        return [info.path for info in self.client.list_artifacts(run_id)]

    def model_sources(self) -> dict[str, str]:
        """Runs that registered model versions come from: run id -> ``name/version`` (one of them)."""
        sources, token = {}, None
        while True:
            page = self.client.search_model_versions(max_results=PAGE, page_token=token)
            for version in page:
                run_id = version.run_id or self._source_run(version.source)
                if run_id:
                    sources.setdefault(run_id, f"{version.name}/{version.version}")
            token = page.token
            if not token:
                return sources

    def _source_run(self, source: str) -> str:
        """The run behind a model version's source: ``runs:/<id>/...`` or a logged model ``models:/m-...``."""
        if source.startswith("runs:/"):
            return source.removeprefix("runs:/").split("/", 1)[0]
        if source.startswith("models:/m-"):
            try:
                return self.client.get_logged_model(source.removeprefix("models:/").split("/")[0]).source_run_id
            except mlflow.exceptions.MlflowException:
                return ""
        return ""

    # ------------------------------------------------------------ deleting

    def delete_folder(self, run_id: str, path: str, tags: tuple[str, ...] = ()) -> None:
        """Delete the artifact folder ``path`` of the run, and the ``tags`` that point at it."""
        get_artifact_repository(self.client.get_run(run_id).info.artifact_uri).delete_artifacts(path)
        run_tags = self.client.get_run(run_id).data.tags
        for tag in tags:
            if tag in run_tags:
                self.client.delete_tag(run_id, tag)

    def can_purge(self) -> bool:
        """Whether runs can be removed for good from here (a database store, as ``mlflow gc`` needs)."""
        return self.uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_ENGINES

    def delete_runs(self, run_ids: list[str]) -> bool:
        """Delete the runs, then remove them with their artifacts for good where the store allows (True then)."""
        for run_id in run_ids:
            self.client.delete_run(run_id)
        if not self.can_purge():
            logger.warning("runs deleted (recoverable) in %s; remove them for good on the server with `mlflow gc "
                           "--backend-store-uri <its database> --run-ids %s`", self.uri, ",".join(run_ids))
            return False
        self._purge(run_ids)
        return True

    def _purge(self, run_ids: list[str]) -> None:
        """What ``mlflow gc --backend-store-uri URI --run-ids ...`` does for each run (delete its artifacts, then
        its rows), without gc's other effect: with no experiment ids gc also purges every deleted experiment and
        logged model of the store, which a user may still mean to restore."""
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(self.uri, _default_artifact_root(self.uri))
        try:
            for run_id in run_ids:
                run = store.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":
                    raise RuntimeError(f"run {run_id} is not deleted: refusing to purge it")
                get_artifact_repository(run.info.artifact_uri).delete_artifacts()
                store._hard_delete_run(run_id)  # the call mlflow gc makes
                logger.info("run %s removed for good", run_id)
        finally:
            store.engine.dispose()

    # ------------------------------------------------------------ copying

    def export_run(self, run: RunRecord) -> dict:
        """A run's record with its full metric histories: ``[[step, timestamp, value], ...]`` per key."""
        histories = {key: [[m.step, m.timestamp, m.value] for m in self.client.get_metric_history(run.run_id, key)]
                     for key in run.metrics}
        return {"run_id": run.run_id, "name": run.name, "status": run.status, "start_ms": run.start_ms,
                "end_ms": run.end_ms, "params": run.params, "tags": run.tags, "metrics": histories}

    def download(self, run_id: str, path: str, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        self.client.download_artifacts(run_id, path, str(dst))

    def target_experiment(self, name: str) -> str:
        """The id of experiment ``name`` in this store, created (with artifacts beside an SQLite store) if
        missing, as a stage would create it."""
        return Tracker(name).experiment_id

    def find_tagged(self, experiment_id: str, tag: str, value: str) -> list[str]:
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'")
        return [run.info.run_id for run in runs]

    def import_run(self, exported: dict, experiment_id: str, tags: dict[str, str], artifacts: Path | None) -> str:
        """Create a run from an :meth:`export_run` record (with ``tags`` instead of its own) and its artifacts."""
        name = exported["name"]
        run_id = self.client.create_run(experiment_id, start_time=exported["start_ms"], run_name=name,
                                        tags={k: v for k, v in tags.items() if k != MLFLOW_RUN_NAME}).info.run_id
        params = [Param(k, v) for k, v in exported["params"].items()]
        metrics = [Metric(key, value, timestamp, step) for key, history in exported["metrics"].items()
                   for step, timestamp, value in history]
        for batch in _chunks(params, 100):
            self.client.log_batch(run_id, params=batch)
        for batch in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=batch)
        if artifacts is not None and artifacts.is_dir():
            self.client.log_artifacts(run_id, str(artifacts))
        self.client.set_terminated(run_id, exported["status"], end_time=exported["end_ms"] or None)
        return run_id

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _record(run, experiment: str) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(run_id=info.run_id, experiment_id=info.experiment_id, experiment=experiment,
                     name=info.run_name or "", status=info.status, start_ms=info.start_time or 0,
                     end_ms=info.end_time or 0, artifact_uri=info.artifact_uri, params=dict(data.params),
                     metrics=dict(data.metrics), tags=dict(data.tags))


def _default_artifact_root(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return os.path.abspath("mlruns")


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
