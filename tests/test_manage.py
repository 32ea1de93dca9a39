"""`pipelines` (pipelines/manage.py): runs, compare, cleanup, archive and restore on real SQLite stores.

One store per module: a real tiny `kfold` run that finished, one SIGKILLed after its first checkpoint (a RUNNING
parent whose worker is dead, a fold with a leftover checkpoint), and runs recorded with the tags, params,
metrics and artifacts the other stages write (an optuna search, a sharded predict, five kfold-like runs in
experiment `grid`, one with a registered model). Tests that change a store work on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_tiny_data, run_entrypoint, store_env
from helpers import children, client, parents
from mlflow.entities import ViewType

from pipelines.manage import main

# grace_period=2: a RUNNING run whose worker died is judged abandoned 2 s after it started
KFOLD = {"text_column": "text", "label_column": "label", "k_folds": 2, "batch_size": 8, "max_length": 32,
         "learning_rate": 1e-3, "seed": 42, "experiment_name": "cv", "logging_steps": 2, "heartbeat_interval": 1,
         "grace_period": 2}
HOUR_AGO = int((time.time() - 3600) * 1000)
GRID = {"best": 0.9, "registered": 0.7, "leased": 0.5, "worse": 0.3, "worst": 0.1}


# ---------------------------------------------------------------- building the store


def _checkpoint(folder: Path, step: int = 4, size: int = 3000) -> Path:
    """A Trainer-checkpoint-like folder as pipelines/checkpoints.py uploads it (files, then manifest.json)."""
    local = folder / f"checkpoint-{step}"
    local.mkdir(parents=True)
    (local / "model.safetensors").write_bytes(bytes(range(256)) * (size // 256))
    (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (local / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    return local


def _run(c, experiment_id: str, name: str, status: str, tags: dict, params: dict | None = None,
         metrics: dict | None = None, parent: str = "", files: dict[str, Path] | None = None) -> str:
    """A run as a stage writes it: tags, params, metrics, artifact folders (path -> local folder), status."""
    tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
    run_id = c.create_run(experiment_id, start_time=HOUR_AGO, tags=tags, run_name=name).info.run_id
    for key, value in (params or {}).items():
        c.log_param(run_id, key, value)
    for key, value in (metrics or {}).items():
        c.log_metric(run_id, key, value, step=0)
    for path, local in (files or {}).items():
        c.log_artifacts(run_id, str(local), path)
    if status != "RUNNING":
        c.set_terminated(run_id, status, end_time=HOUR_AGO + 60_000)
    return run_id


def _recorded_runs(env: dict, work: Path) -> dict[str, str]:
    """The runs other stages leave behind, written with the same tags, params and artifacts they use."""
    from pipelines.tracking import Tracker, register_run_folder, state_storage

    c = client(env)
    storage = state_storage("")
    ids = {}
    search = Tracker("search").experiment_id
    ids["optuna"] = _run(c, search, "optuna", "FAILED", {"stage": "optuna", "fingerprint": "f0", "optuna_storage":
                         storage}, {"n_trials": "4", "metric": "f1_macro", "learning_rate": "0.001"},
                         {"best_value": 0.8, "best_trial": 2})
    for trial, status in enumerate(["FINISHED", "FINISHED", "FINISHED", "FAILED"]):
        _run(c, search, f"trial-{trial}", status, {"trial": str(trial)}, {"learning_rate": f"0.00{trial + 1}"},
             {"objective": 0.5 + trial / 10}, parent=ids["optuna"])
    shards = work / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"shard-{i:05d}.csv").write_text("row_id,label\n1,a\n")
        (shards / f"shard-{i:05d}.json").write_text(json.dumps({"rows": [1], "sha256": "x"}))
    ids["predict"] = _run(c, Tracker("batch").experiment_id, "predict", "KILLED",
                          {"stage": "predict", "fingerprint": "f1", "optuna_storage": storage},
                          {"shard_size": "100"}, {"items_total": 250, "items_done": 200}, files={"shards": shards})
    grid = Tracker("grid").experiment_id
    for name, score in GRID.items():
        status = "RUNNING" if name == "leased" else "FINISHED"
        ids[name] = _run(c, grid, "kfold", status, {"stage": "kfold", "fingerprint": name, "optuna_storage": storage},
                         {"k_folds": "2", "metric": "f1_macro", "grace_period": "30"},
                         {"cv_f1_macro_mean": score})
        for fold in range(2):
            files = {"model": _write(work / name / f"model{fold}" / "weights.bin", 2000 + fold)}
            if name in ("leased", "best") and fold == 1:  # a running fold's and a finished fold's leftovers
                files["checkpoints"] = _checkpoint(work / name / "ckpt").parent
            ids[f"{name}/fold{fold}"] = _run(c, grid, f"fold-{fold}", "RUNNING" if name == "leased" else "FINISHED",
                                             {"fold": str(fold), **({"checkpoint": "checkpoints/checkpoint-4"}
                                                                    if "checkpoints" in files else {})},
                                             parent=ids[name], files=files)
    register_run_folder(ids["registered/fold0"], "model", "grid-model")
    return ids


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"w" * size)
    return path.parent


@pytest.fixture(scope="module")
def source(tiny_model, tmp_path_factory):
    """The module's store: real kfold runs (one finished, one killed) and the recorded runs of other stages."""
    folder = tmp_path_factory.mktemp("source")
    env = store_env(folder)
    data = make_tiny_data(folder / "tiny.csv", per_class=20)
    args = dict(KFOLD, data=data, model=tiny_model)
    done = run_entrypoint("kfold", {**args, "epochs": 1}, env, folder)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run_entrypoint("kfold", {**args, "epochs": 2}, {**env, "PIPELINES_FAILPOINT": "checkpoint_committed:1"},
                            folder)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        ids = _recorded_runs(env, tmp_path_factory.mktemp("recorded"))
    finished, running = sorted(parents(env, "cv", "kfold"), key=lambda r: r.info.status)
    ids.update(finished=finished.info.run_id, killed=running.info.run_id)
    (fold,) = children(env, "cv", ids["killed"])
    ids["killed/fold0"] = fold.info.run_id
    time.sleep(max(0.0, fold.info.start_time / 1000 + 2.5 - time.time()))  # older than grace_period: judged dead
    return {"folder": folder, "env": env, "uri": env["MLFLOW_TRACKING_URI"], "ids": ids}


def clone(source: dict, folder: Path) -> dict:
    """A copy of the store in ``folder``: its files, with the absolute paths recorded in mlflow.db rewritten."""
    shutil.copytree(source["folder"], folder)
    old, new = str(source["folder"]), str(folder)
    with sqlite3.connect(folder / "mlflow.db") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in db.execute(f"PRAGMA table_info('{table}')").fetchall():
                if any(t in column[2].upper() for t in ("CHAR", "TEXT")):
                    db.execute(f'UPDATE "{table}" SET "{column[1]}" = REPLACE("{column[1]}", ?, ?) '
                               f'WHERE "{column[1]}" LIKE ?', (old, new, f"%{old}%"))
    env = store_env(folder)
    return {**source, "folder": folder, "env": env, "uri": env["MLFLOW_TRACKING_URI"]}


# ---------------------------------------------------------------- helpers


def pipelines(monkeypatch, capsys, uri: str, *argv: str) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    main([str(a) for a in argv])
    return capsys.readouterr().out


def refused(monkeypatch, capsys, uri: str, *argv: str) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def table(text: str, key: str) -> dict[str, dict[str, str]]:
    """The rows of a printed table (columns separated by 2+ spaces), by column ``key``."""
    lines = [line for line in text.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith(key))
    header = re.split(r"\s{2,}", lines[start])
    body = [line for line in lines[start + 1:] if re.match(r"^\S+\s{2}", line)]
    rows = [dict(zip(header, re.split(r"\s{2,}", line), strict=False)) for line in body]
    return {row[key]: row for row in rows if key in row}


def all_runs(env: dict) -> dict:
    c = client(env)
    experiments = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id: r for r in c.search_runs(experiments, run_view_type=ViewType.ALL, max_results=5000)}


def files(folder: Path) -> dict[str, str]:
    """Every file of a store folder with its digest."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def artifact_dir(env: dict, run_id: str) -> Path:
    return Path(client(env).get_run(run_id).info.artifact_uri.removeprefix("file://"))


# ---------------------------------------------------------------- runs


def test_runs_lists_stage_runs_with_their_progress(source, monkeypatch, capsys):
    ids = source["ids"]
    rows = table(pipelines(monkeypatch, capsys, source["uri"], "runs"), "RUN ID")
    assert ids["killed/fold0"] not in rows and ids["best/fold0"] not in rows, "child runs are not stage runs"
    finished = client(source["env"]).get_run(ids["finished"])
    folds = children(source["env"], "cv", ids["finished"])
    assert [f.info.status for f in folds] == ["FINISHED", "FINISHED"]  # what the progress column must say
    assert rows[ids["finished"]]["PROGRESS"] == "fold 2/2"
    assert rows[ids["finished"]]["STATUS"] == "FINISHED"
    assert rows[ids["finished"]]["METRIC"] == f"cv_f1_macro_mean={finished.data.metrics['cv_f1_macro_mean']:.4g}"
    assert rows[ids["killed"]]["PROGRESS"] == "fold 0/2 (1 unfinished)"
    assert rows[ids["killed"]]["STATUS"] == "RUNNING (abandoned)"  # its worker was SIGKILLed
    assert rows[ids["optuna"]]["PROGRESS"] == "trial 3/4 (1 unfinished)"
    assert rows[ids["optuna"]]["METRIC"] == "best_value=0.8"
    assert rows[ids["predict"]]["PROGRESS"] == "shard 2/3"
    assert rows[ids["finished"]]["EXPERIMENT"] == "cv" and rows[ids["optuna"]]["STAGE"] == "optuna"


def test_a_reader_that_stops_early_is_no_error(source):
    """`pipelines runs | head -1`: the reader closes the pipe before the table is written."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.manage", "runs"], env=source["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_runs_filters_by_experiment_stage_and_status(source, monkeypatch, capsys):
    ids, uri = source["ids"], source["uri"]
    assert set(table(pipelines(monkeypatch, capsys, uri, "runs", "--experiment", "cv"), "RUN ID")) == {
        ids["finished"], ids["killed"]}
    assert set(table(pipelines(monkeypatch, capsys, uri, "runs", "--stage", "optuna"), "RUN ID")) == {ids["optuna"]}
    finished = table(pipelines(monkeypatch, capsys, uri, "runs", "--status", "finished", "--experiment", "grid"),
                     "RUN ID")
    assert set(finished) == {ids[name] for name in GRID if name != "leased"}
    assert "no stage runs match" in pipelines(monkeypatch, capsys, uri, "runs", "--stage", "tapt")


# ---------------------------------------------------------------- compare


def test_compare_shows_only_the_params_that_differ(source, monkeypatch, capsys, tmp_path):
    ids, uri = source["ids"], source["uri"]
    out = pipelines(monkeypatch, capsys, uri, "compare", ids["finished"], ids["killed"], "--csv", tmp_path / "c.csv",
                    "--html", tmp_path / "c.html")
    frame = pd.read_csv(tmp_path / "c.csv", index_col="run_id")
    assert [c for c in frame.columns if c.startswith("params.")] == ["params.epochs"]  # all else was the same
    assert frame.loc[ids["finished"], "params.epochs"] == 1 and frame.loc[ids["killed"], "params.epochs"] == 2
    assert "metrics.cv_f1_macro_mean" in frame.columns
    assert re.search(r"^params\.epochs\s+1\s+2$|^params\.epochs\s+2\s+1$", out, re.MULTILINE)
    assert "params.k_folds" not in out and "params.learning_rate" not in out
    html = (tmp_path / "c.html").read_text()
    assert "<table" in html and "params.epochs" in html and ids["killed"] in html


def test_compare_whole_experiments_side_by_side(source, monkeypatch, capsys, tmp_path):
    ids = source["ids"]
    pipelines(monkeypatch, capsys, source["uri"], "compare", "cv", "search", "--csv", tmp_path / "c.csv")
    frame = pd.read_csv(tmp_path / "c.csv", index_col="run_id")
    assert set(frame.index) == {ids["finished"], ids["killed"], ids["optuna"]}
    assert frame.loc[ids["optuna"], "metrics.best_value"] == 0.8
    assert frame.loc[ids["optuna"], "params.n_trials"] == 4 and pd.isna(frame.loc[ids["finished"], "params.n_trials"])
    assert set(frame["experiment"]) == {"cv", "search"}


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, expected", [
    (["runs", "--experiment", "nope"], "experiment 'nope' not found"),
    (["compare", "0123456789abcdef0123456789abcdef"], "'0123456789abcdef0123456789abcdef' is neither a run id"),
    (["compare", "cv", "--csv", "/no/such/folder/x.csv"], "folder /no/such/folder does not exist"),
    (["cleanup", "--experiment", "nope", "--dry-run"], "experiment 'nope' not found"),
    (["cleanup", "--keep-best", "2"], "--keep-best K and --metric M go together"),
    (["cleanup", "--older-than", "soon"], "--older-than 'soon' is not a duration"),
    (["archive", "0123456789abcdef0123456789abcdef", "--to", "x.tar.gz"],
     "run '0123456789abcdef0123456789abcdef' not found"),
    (["restore", "missing.tar.gz"], "archive missing.tar.gz not found"),
])
def test_unknown_runs_experiments_and_files_exit_2_with_what_to_do(source, monkeypatch, capsys, argv, expected):
    err = refused(monkeypatch, capsys, source["uri"], *argv)
    assert expected in err
    assert err.startswith(f"pipelines {argv[0]}: error: ") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- cleanup


def test_cleanup_dry_run_prints_the_plan_and_changes_nothing(source, monkeypatch, capsys):
    ids, folder = source["ids"], source["folder"]
    before_files, before_runs = files(folder), all_runs(source["env"])
    out = pipelines(monkeypatch, capsys, source["uri"], "cleanup", "--keep-best", "1", "--metric", "cv_f1_macro_mean",
                    "--dry-run")
    assert out.startswith("dry run: nothing is changed")
    lines = out.splitlines()
    deleted = {line.split()[2] for line in lines if line.startswith("delete runs")}
    assert deleted == {ids["leased"], ids["worse"], ids["worst"]}  # nobody holds "leased" in this test
    checkpoints = {line.split()[2] for line in lines if line.startswith("delete checkpoints")}
    assert checkpoints == {ids["killed/fold0"], ids["best/fold1"]}
    assert any(line.startswith("keep") and ids["registered"] in line and "grid-model/1" in line for line in lines)
    assert re.search(r"^would free: \d+ files, \d+ bytes .*, 9 runs$", out, re.MULTILINE)
    assert files(folder) == before_files
    after = all_runs(source["env"])
    assert {k: (r.info.status, r.info.lifecycle_stage, r.data.tags) for k, r in after.items()} == {
        k: (r.info.status, r.info.lifecycle_stage, r.data.tags) for k, r in before_runs.items()}


def test_cleanup_deletes_leftover_checkpoints_of_finished_and_abandoned_runs(source, monkeypatch, capsys, tmp_path):
    store = clone(source, tmp_path / "store")
    ids, env = store["ids"], store["env"]
    targets = [artifact_dir(env, ids[key]) / "checkpoints" for key in ("killed/fold0", "best/fold1", "leased/fold1")]
    expected = [p.stat().st_size for target in targets for p in target.rglob("*") if p.is_file()]
    assert len(expected) >= 6
    before = set(all_runs(env))
    out = pipelines(monkeypatch, capsys, store["uri"], "cleanup", "--checkpoints-only")
    assert f"frees: {len(expected)} files, {sum(expected)} bytes" in out
    assert not any(target.exists() for target in targets)
    assert set(all_runs(env)) == before, "--checkpoints-only deletes no run"
    assert "checkpoint" not in client(env).get_run(ids["killed/fold0"]).data.tags
    assert (artifact_dir(env, ids["best/fold0"]) / "model" / "weights.bin").is_file(), "only checkpoints go"
    again = pipelines(monkeypatch, capsys, store["uri"], "cleanup", "--checkpoints-only")
    assert "frees: 0 files, 0 bytes" in again


LEASE_HOLDER = """
import sys, time
from pipelines.leases import LeaseStore
store = LeaseStore(sys.argv[1], heartbeat_interval=1, grace_period=30)
assert store.acquire(sys.argv[2], "worker-elsewhere") is not None
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def lease_holder():
    """Start another process that takes a worker lease on a run and keeps it (heartbeats) until killed."""
    started = []

    def start(url: str, run_id: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, url, run_id], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_cleanup_keeps_best_k_and_never_a_live_or_registered_run(source, monkeypatch, capsys, tmp_path,
                                                                lease_holder):
    store = clone(source, tmp_path / "store")
    ids, env = store["ids"], store["env"]
    holder = lease_holder(f"sqlite:///{store['folder']}/optuna.db", ids["leased"])
    doomed = [ids[k] for k in ("worse", "worse/fold0", "worse/fold1", "worst", "worst/fold0", "worst/fold1")]
    folders = [artifact_dir(env, run_id) for run_id in doomed]
    leased_checkpoint = artifact_dir(env, ids["leased/fold1"]) / "checkpoints"
    out = pipelines(monkeypatch, capsys, store["uri"], "cleanup", "--experiment", "grid", "--keep-best", "1",
                    "--metric", "cv_f1_macro_mean")
    left = all_runs(env)
    assert not set(doomed) & set(left), "runs beyond the best 1 are removed for good (not only marked deleted)"
    assert not any(folder.exists() for folder in folders)
    for name in ("best", "registered", "leased", "registered/fold0", "leased/fold1"):
        assert left[ids[name]].info.lifecycle_stage == "active", name
    assert leased_checkpoint.is_dir() and any(leased_checkpoint.rglob("*.safetensors")), "a live run is untouched"
    assert re.search(rf"^keep\s+{ids['leased']}.*live lease held by \S+:{holder.pid}:", out, re.MULTILINE)
    assert re.search(rf"^keep\s+{ids['registered']}.*registered model grid-model/1", out, re.MULTILINE)
    assert re.search(r"^frees: \d+ files, \d+ bytes .*, 6 runs$", out, re.MULTILINE)

    holder.kill()
    holder.wait()  # its process is gone: the run is abandoned now
    out = pipelines(monkeypatch, capsys, store["uri"], "cleanup", "--experiment", "grid", "--checkpoints-only")
    assert re.search(rf"^delete checkpoints\s+{ids['leased/fold1']}", out, re.MULTILINE)
    assert not leased_checkpoint.exists()


# ---------------------------------------------------------------- archive, restore


def _history(env: dict, run_id: str) -> dict:
    c = client(env)
    return {key: sorted((m.step, m.timestamp, m.value) for m in c.get_metric_history(run_id, key))
            for key in c.get_run(run_id).data.metrics}


def _own_tags(run) -> dict:
    return {k: v for k, v in run.data.tags.items()
            if k not in ("mlflow.parentRunId", "restored_from_run_id", "restored_from_experiment")}


def test_archive_then_restore_into_a_fresh_store_reproduces_the_runs(source, monkeypatch, capsys, tmp_path):
    ids, env = source["ids"], source["env"]
    archive = tmp_path / "cv.tar.gz"
    out = pipelines(monkeypatch, capsys, source["uri"], "archive", ids["finished"], "--to", archive)
    assert "with 2 child runs" in out and archive.is_file()
    target = store_env(tmp_path / "team")
    out = pipelines(monkeypatch, capsys, target["MLFLOW_TRACKING_URI"], "restore", archive, "--experiment", "moved")
    mapping = table(out, "ORIGINAL")
    assert len(mapping) == 3
    new = {old: row["RESTORED"] for old, row in mapping.items()}
    (parent,) = parents(target, "moved", "kfold")
    assert parent.info.run_id == new[ids["finished"]]
    original = client(env).get_run(ids["finished"])
    assert parent.data.params == original.data.params
    assert _own_tags(parent) == _own_tags(original)
    assert parent.data.tags["restored_from_run_id"] == ids["finished"]
    assert (parent.info.status, parent.info.start_time, parent.info.end_time) == (
        original.info.status, original.info.start_time, original.info.end_time)
    restored_folds = children(target, "moved", parent.info.run_id)
    assert sorted(r.data.tags["fold"] for r in restored_folds) == ["0", "1"]
    for fold in children(env, "cv", ids["finished"]):
        copy = client(target).get_run(new[fold.info.run_id])
        assert copy.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert copy.data.params == fold.data.params and _own_tags(copy) == _own_tags(fold)
        assert _history(target, copy.info.run_id) == _history(env, fold.info.run_id)
        assert max(map(len, _history(env, fold.info.run_id).values())) > 1, "no metric with a history to copy"
        assert files(artifact_dir(target, copy.info.run_id)) == files(artifact_dir(env, fold.info.run_id))
    assert _history(target, parent.info.run_id) == _history(env, ids["finished"])
    assert files(artifact_dir(target, parent.info.run_id)) == files(artifact_dir(env, ids["finished"]))
    rows = table(pipelines(monkeypatch, capsys, target["MLFLOW_TRACKING_URI"], "runs"), "RUN ID")
    assert rows[parent.info.run_id]["PROGRESS"] == "fold 2/2"
    err = refused(monkeypatch, capsys, target["MLFLOW_TRACKING_URI"], "restore", archive, "--experiment", "moved")
    assert f"already restored into experiment 'moved' as run {parent.info.run_id}" in err


def test_archive_leaves_checkpoints_out_unless_asked(source, monkeypatch, capsys, tmp_path):
    ids = source["ids"]
    names = {}
    for flag in ([], ["--with-checkpoints"]):
        path = tmp_path / f"killed{len(flag)}.tar.gz"
        pipelines(monkeypatch, capsys, source["uri"], "archive", ids["killed"], "--to", path, *flag)
        with tarfile.open(path) as tar:
            names[bool(flag)] = tar.getnames()
    fold_checkpoints = f"artifacts/{ids['killed/fold0']}/checkpoints/"
    assert not any(n.startswith(fold_checkpoints) for n in names[False])
    assert any(n.startswith(fold_checkpoints) and n.endswith("manifest.json") for n in names[True])
    assert f"artifacts/{ids['killed']}/config.json" in names[False]
    target = store_env(tmp_path / "team")
    pipelines(monkeypatch, capsys, target["MLFLOW_TRACKING_URI"], "restore", tmp_path / "killed1.tar.gz")
    (parent,) = parents(target, "cv", "kfold")
    assert parent.info.status == "KILLED", "a copy of a RUNNING run has no worker"
    (fold,) = children(target, "cv", parent.info.run_id)
    assert fold.data.tags["checkpoint"] == "checkpoints/checkpoint-4"
    assert (artifact_dir(target, fold.info.run_id) / "checkpoints" / "checkpoint-4" / "manifest.json").is_file()


# ---------------------------------------------------------------- liveness that cannot be checked


def test_running_runs_whose_leases_cannot_be_read_count_as_live(monkeypatch):
    from pipelines.manage import Liveness, Tree
    from pipelines.tracking_admin import RunRecord

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://user@127.0.0.1:9/none")  # never connected

    def stage_run(status: str, storage: str, started: float = HOUR_AGO) -> RunRecord:
        return RunRecord("a" * 32, "1", "e", "kfold", status, int(started), 0, "file:///x",
                         tags={"stage": "kfold", "optuna_storage": storage})

    def holder(run: RunRecord) -> str:
        return Liveness(Tree([run])).holder(run)

    hidden = "postgresql+psycopg2://user:***@db-host:5432/state"
    assert "pass --optuna-storage" in holder(stage_run("RUNNING", hidden))
    assert "not on this machine" in holder(stage_run("RUNNING", "sqlite:////no/such/machine/optuna.db"))
    assert "started less than 30s ago" in holder(stage_run("RUNNING", hidden, started=time.time() * 1000))
    assert holder(stage_run("FINISHED", hidden)) == "", "a finished run needs no lease check"
