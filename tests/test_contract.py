"""The sweep of dead runs, in-process on a real SQLite store and lease database."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from pipelines.config import KFoldConfig
from pipelines.leases import LeaseStore
from pipelines.settings import redact
from pipelines.stages import contract
from pipelines.tracking import Tracker, state_storage


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    with Tracker("sweep") as tracker:
        yield tracker


def dead_owner() -> str:
    """The owner id of a process of this host that has exited."""
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    return f"{socket.gethostname()}:{pid}:deadbeef"


def test_runs_of_dead_processes_are_marked_and_live_ones_are_not(tracker):
    cfg = KFoldConfig(heartbeat_interval=1, grace_period=2)
    storage = state_storage("")
    leases = LeaseStore(storage, 1, 2)
    tags = {"optuna_storage": redact(storage)}
    dead_parent = tracker.start_parent("kfold", "fp-dead", tags)
    dead_fold = tracker.start_child(dead_parent, "fold-0", {"fold": "0"})
    live_parent = tracker.start_parent("kfold", "fp-live", tags)
    other_db = tracker.start_parent("kfold", "fp-other", {"optuna_storage": "postgresql://elsewhere/db"})
    dead_launcher = tracker.client.create_run(tracker.experiment_id, tags={
        "mlflow.project.entryPoint": "kfold", "worker": dead_owner()}).info.run_id
    untagged_launcher = tracker.client.create_run(tracker.experiment_id, tags={
        "mlflow.project.entryPoint": "kfold"}).info.run_id
    with leases.acquire(live_parent, "worker-x"):
        young = tracker.start_parent("kfold", "fp-young", tags)  # created just now, its lease not yet taken
        ctx = contract.StageContext("kfold", cfg, tracker, {}, "fp-mine", leases=leases, parent_id="mine")
        contract._sweep_dead_runs(ctx)
        assert tracker.get_run(untagged_launcher).info.status == "RUNNING"  # may still be starting up
        assert tracker.get_run(young).info.status == "RUNNING"
        time.sleep(2.2)  # past grace_period
        contract._sweep_dead_runs(ctx)
        status = {name: tracker.get_run(run_id) for name, run_id in [
            ("dead_parent", dead_parent), ("dead_fold", dead_fold), ("live_parent", live_parent),
            ("other_db", other_db), ("dead_launcher", dead_launcher), ("untagged", untagged_launcher)]}
    assert {k: r.info.status for k, r in status.items()} == {
        "dead_parent": "FAILED", "dead_fold": "FAILED", "live_parent": "RUNNING", "other_db": "RUNNING",
        "dead_launcher": "KILLED", "untagged": "KILLED"}
    assert "no worker holds a live lease" in status["dead_parent"].data.tags["status_reason"]
    assert "process this mlflow run launched died" in status["dead_launcher"].data.tags["status_reason"]


def test_resuming_with_another_state_database_is_refused(tracker, tmp_path):
    from pipelines.config import EnsembleConfig

    inputs = {"stage": "ensemble", "anything": 1}
    first = EnsembleConfig(source_runs="r1", optuna_storage=f"sqlite:///{tmp_path}/a.db")
    parent = contract.open_run("ensemble", first, tracker, inputs, {}).parent_id
    tracker.finish(parent)
    again = EnsembleConfig(source_runs="r1", optuna_storage=f"sqlite:///{tmp_path}/b.db", resume=True)
    with pytest.raises(contract.ResumeError) as refused:
        contract.open_run("ensemble", again, tracker, inputs, {})
    assert f"it used optuna_storage=sqlite:///{tmp_path}/a.db" in str(refused.value)
    assert f"pass optuna_storage=sqlite:///{tmp_path}/a.db" in str(refused.value)


def test_stores_do_not_depend_on_the_working_folder(tmp_path, monkeypatch):
    from conftest import ROOT

    from pipelines.errors import ConfigError
    from pipelines.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{ROOT}/mlruns/mlflow.db"  # the project's, from any folder
    assert state_storage("") == f"sqlite:///{ROOT}/mlruns/optuna.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/mlflow.db")
    assert tracking_uri() == f"sqlite:///{tmp_path}/rel/mlflow.db"  # made absolute once, then recorded so
    assert state_storage("sqlite:///o.db") == f"sqlite:///{tmp_path}/o.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")
    with pytest.raises(ConfigError, match="pass optuna_storage="):
        state_storage("")
