"""Edges of the search, the stage contract and `pipelines cleanup` (issue 19, items 1, 4 and 21), in-process on real
SQLite stores: a grid search runs every point once, zombie launcher runs are swept when a stage finishes, cleanup
keeps the runs others were initialised from, ranks searches by their own direction, and refuses a missing store."""

from __future__ import annotations

import itertools
import logging
from contextlib import nullcontext

import pytest
from helpers import run_together
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from pipelines.leases import LeaseStore
from pipelines.study import SearchLimits, StudySettings, grid_of, open_study, optimize, storage_for

GRID_SPACE = {"a": CategoricalDistribution([1, 2, 3]), "b": CategoricalDistribution([10, 20, 30])}


def grid_study(tmp_path, seed=3, name="grid", space=GRID_SPACE):
    settings = StudySettings(storage=f"sqlite:///{tmp_path}/optuna.db", study_name=name, direction="maximize",
                             sampler="grid", pruner="none", seed=seed, heartbeat_interval=1, grace_period=20,
                             grid=grid_of(space))
    storage = storage_for(settings)
    return open_study(settings, storage), storage


def score(trial) -> float:
    a, b = trial.suggest_categorical("a", [1, 2, 3]), trial.suggest_categorical("b", [10, 20, 30])
    return -abs(a - 2) - abs(b - 30) / 10  # best: a=2, b=30


def points(study) -> list[tuple]:
    return sorted((t.params["a"], t.params["b"]) for t in study.trials if t.state == TrialState.COMPLETE)


# ---------------------------------------------------------------- item 1: sampler=grid


def test_grid_runs_every_point_exactly_once_with_two_workers(tmp_path):
    errors = []

    def worker():
        try:
            study, storage = grid_study(tmp_path)
            leases = LeaseStore(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=20)
            lock = lambda: leases.wait_for("optuna-study-1", "trials", poll=0.02)  # noqa: E731
            assert optimize(study, storage, score, SearchLimits(9, max_retries=0, poll=0.05), lock)
            leases.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    grid_study(tmp_path)  # the study once before the workers start (a fresh database races)
    LeaseStore(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=20).close()
    run_together(worker, 2)
    assert not errors, errors
    study, _ = grid_study(tmp_path)
    assert points(study) == sorted(itertools.product([1, 2, 3], [10, 20, 30]))
    assert study.best_params == {"a": 2, "b": 30}


def test_grid_smaller_than_n_trials_stops_after_the_whole_grid(tmp_path, caplog):
    from pipelines.study import grid_size, trial_budget

    grid = grid_of(GRID_SPACE)
    with caplog.at_level(logging.INFO, logger="pipelines.study"):
        n_trials = trial_budget(12, grid)
    assert n_trials == 9 and "sampler=grid has 9 points, fewer than n_trials=12" in caplog.text
    study, storage = grid_study(tmp_path)
    assert optimize(study, storage, score, SearchLimits(n_trials, 0, max_trials=grid_size(grid)), nullcontext)
    assert points(study) == sorted(itertools.product([1, 2, 3], [10, 20, 30])) and len(study.trials) == 9

    # a point that fails for good keeps its trial; the search still ends (done) instead of asking for a 5th point
    small = {"a": CategoricalDistribution([1, 2]), "b": CategoricalDistribution([10, 20])}
    study, storage = grid_study(tmp_path, name="failing", space=small)

    def failing(trial):
        a, b = trial.suggest_categorical("a", [1, 2]), trial.suggest_categorical("b", [10, 20])
        if (a, b) == (2, 10):
            raise RuntimeError("this point always fails")
        return a + b

    assert optimize(study, storage, failing, SearchLimits(4, 0, max_trials=4), nullcontext)
    assert len(study.trials) == 4 and points(study) == [(1, 10), (1, 20), (2, 20)]
    assert study.best_params == {"a": 2, "b": 20}


# ---------------------------------------------------------------- item 4: zombie launcher runs


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one takes seconds): each test has its experiments."""
    from pipelines.tracking import tracking_uri

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking_uri()  # creates it
    return uri


def test_launchers_killed_before_they_were_tagged_are_swept_when_the_stage_finishes(tracking_store, monkeypatch):
    import time

    from pipelines.config import EnsembleConfig
    from pipelines.stages import contract
    from pipelines.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_store)
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    cfg = EnsembleConfig(source_runs="r1", heartbeat_interval=1, grace_period=2)
    with Tracker("zombies") as tracker:
        def launcher(**params) -> str:  # `mlflow run -e ensemble` created it; its entry point never tagged it
            run_id = tracker.client.create_run(tracker.experiment_id,
                                               tags={"mlflow.project.entryPoint": "ensemble"}).info.run_id
            for key, value in params.items():
                tracker.client.log_param(run_id, key, value)
            return run_id

        killed, patient = launcher(grace_period=""), launcher(grace_period="600")
        ctx = contract.open_run("ensemble", cfg, tracker, {"stage": "ensemble", "x": 1}, {})
        assert tracker.get_run(killed).info.status == "RUNNING"  # younger than grace_period: may be starting
        time.sleep(2.2)  # the stage works on, past grace_period
        tracker.finish(ctx.parent_id)
    assert tracker.get_run(killed).info.status == "KILLED"
    assert "process this mlflow run launched died" in tracker.get_run(killed).data.tags["status_reason"]
    assert tracker.get_run(patient).info.status == "RUNNING"  # its own -P grace_period=600 has not passed


# ---------------------------------------------------------------- item 21: pipelines cleanup


@pytest.fixture(scope="module")
def lineage_store(tracking_store, tmp_path_factory):
    """Finished stage runs an hour old: tapt runs others started from, searches that minimize or maximize."""
    import time

    from pipelines.tracking import Tracker

    folder, uri = tmp_path_factory.mktemp("lineage"), tracking_store
    hour_ago = int((time.time() - 3600) * 1000)
    ids = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(key, raising=False)
        client = Tracker("lm").client

        def run(experiment: str, name: str, tags: dict, params: dict, metrics: dict) -> str:
            experiment_id = Tracker(experiment).experiment_id
            run_id = client.create_run(experiment_id, start_time=hour_ago, tags=tags, run_name=name).info.run_id
            for key, value in params.items():
                client.log_param(run_id, key, value)
            for key, value in metrics.items():
                client.log_metric(run_id, key, value)
            client.set_terminated(run_id, "FINISHED", end_time=hour_ago + 60_000)
            ids[name] = run_id
            return run_id

        for i, name in enumerate(["tapt-best", "tapt-init", "tapt-source", "tapt-model", "tapt-unused"]):
            run("lm", name, {"stage": "tapt", "fingerprint": name}, {"metric": "loss"}, {"final_loss": 1.0 + i})
        run("cv", "kfold-init", {"stage": "kfold", "fingerprint": "k1", "init_from": f"runs:/{ids['tapt-init']}/model"},
            {}, {"cv_f1_macro_mean": 0.5})
        run("cv", "kfold-source", {"stage": "kfold", "fingerprint": "k2", "model_source_run_id": ids["tapt-source"]},
            {}, {"cv_f1_macro_mean": 0.6})
        run("cv", "kfold-model", {"stage": "kfold", "fingerprint": "k3"}, {"model": f"runs:/{ids['tapt-model']}/model"},
            {"cv_f1_macro_mean": 0.7})
        search = {"task": "classification", "metric": "loss", "direction": "auto"}
        run("search", "search-low", {"stage": "optuna", "fingerprint": "s1"}, search, {"best_value": 0.2})
        run("search", "search-high", {"stage": "optuna", "fingerprint": "s2"}, search, {"best_value": 0.9})
        run("mixed", "mixed-loss", {"stage": "optuna", "fingerprint": "m1"}, search, {"best_value": 0.2})
        run("mixed", "mixed-f1", {"stage": "optuna", "fingerprint": "m2"}, {**search, "metric": "f1_macro"},
            {"best_value": 0.9})
    return {"uri": uri, "ids": ids, "folder": folder}


def cleanup_plan(monkeypatch, capsys, uri: str, *argv: str) -> dict[str, str]:
    """Run id -> its line of a `pipelines cleanup --dry-run` plan."""
    from pipelines.manage import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    main(["cleanup", "--dry-run", *argv])
    out = capsys.readouterr().out
    return {line.split()[2] if line.startswith("delete") else line.split()[1]: line
            for line in out.splitlines() if line.startswith(("delete", "keep"))}


def test_cleanup_keeps_the_runs_other_runs_started_from(lineage_store, monkeypatch, capsys):
    ids = lineage_store["ids"]
    plan = cleanup_plan(monkeypatch, capsys, lineage_store["uri"], "--experiment", "lm", "--keep-best", "1",
                        "--metric", "final_loss")
    assert plan[ids["tapt-unused"]].startswith("delete runs")
    assert ids["tapt-best"] not in plan
    for name, how in (("tapt-init", "tag init_from"), ("tapt-source", "tag model_source_run_id"),
                      ("tapt-model", "param model")):
        user = ids[name.replace("tapt", "kfold")]
        assert plan[ids[name]].startswith("keep"), plan[ids[name]]
        assert f"is where run {user} started from ({how})" in plan[ids[name]]


def test_cleanup_ranks_best_value_by_the_direction_each_search_recorded(lineage_store, monkeypatch, capsys):
    ids = lineage_store["ids"]
    plan = cleanup_plan(monkeypatch, capsys, lineage_store["uri"], "--experiment", "search", "--keep-best", "1",
                        "--metric", "best_value")
    assert ids["search-low"] not in plan, "the search that minimized the loss best is kept"
    assert plan[ids["search-high"]].startswith("delete runs")
    from pipelines.manage import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", lineage_store["uri"])
    with pytest.raises(SystemExit) as refused:
        main(["cleanup", "--dry-run", "--experiment", "mixed", "--keep-best", "1", "--metric", "best_value"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "optimize in different directions" in err and f"{ids['mixed-loss']} minimizes" in err


def test_management_commands_refuse_a_store_that_does_not_exist(lineage_store, monkeypatch, capsys):
    from pipelines.manage import main

    typo = lineage_store["folder"] / "mlflw.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{typo}")
    for command in (["runs"], ["cleanup", "--dry-run"]):
        with pytest.raises(SystemExit) as refused:
            main(command)
        assert refused.value.code == 2
        assert f"tracking store {typo} does not exist; check MLFLOW_TRACKING_URI" in capsys.readouterr().err
    assert not typo.exists()
