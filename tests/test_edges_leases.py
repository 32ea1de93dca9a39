"""Issue 19 item 3: liveness judged by the lease row (its own grace period) and the database's clock, fencing
epochs on every commit, holdout trials under a unit lease, a kill inside ``_ask``, old lease tables upgraded.

New names are imported inside the tests, so that each test fails on its own behaviour on an older version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from helpers import wait_until
from sqlalchemy import create_engine, text

from pipelines.leases import LeaseLost, LeaseStore

ROOT = Path(__file__).resolve().parent.parent


def age(store: LeaseStore, seconds: float) -> None:
    """Make every heartbeat ``seconds`` older (as if its holder had gone quiet that long)."""
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE pipelines_leases SET heartbeat = heartbeat - :s"), {"s": seconds})


class Artifacts:
    """The part of a Tracker that checkpoint and shard commits use, recording what was written."""

    def __init__(self, root: Path):
        self.root, self.tags = root, {}

    def upload(self, run_id, path, artifact_path=None, link=False):
        target = self.root / run_id / (artifact_path or "")
        target.mkdir(parents=True, exist_ok=True)
        (target / Path(path).name).write_bytes(Path(path).read_bytes())

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def set_tags(self, run_id, tags):
        self.tags.update(tags)

    def list_artifacts(self, run_id, path):
        folder = self.root / run_id / path
        return [str(Path(path, p.name)) for p in folder.iterdir()] if folder.is_dir() else []

    def delete_artifacts(self, run_id, path):
        pass


def checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_sweep_with_the_default_grace_keeps_a_live_row_with_grace_300(tmp_path):
    url = f"sqlite:///{tmp_path}/leases.db"
    holder = LeaseStore(url, heartbeat_interval=100, grace_period=300)  # a run started with grace_period=300
    reader = LeaseStore(url)  # an invocation with the defaults (grace_period=30)
    try:
        lease = holder.acquire("parent-run", "fold-0")
        age(holder, 60)  # quiet for a minute: dead by the reader's 30 s, alive by the row's own 300 s
        assert [(i.owner, i.alive) for i in reader.holders("parent-run")] == [(holder.owner, True)]
        assert [i.owner for i in reader.live("parent-run")] == [holder.owner]
        assert reader.acquire("parent-run", "fold-0") is None  # no takeover
        lease.check()
    finally:
        reader.close()
        holder.close()


def test_a_trial_with_grace_300_is_not_requeued_by_a_reader_with_the_default_grace(tmp_path):
    from pipelines.study import StudySettings, open_study, recover_dead_trials, storage_for, study_scope

    def study(grace_period: int):
        settings = StudySettings(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s", direction="maximize",
                                 sampler="random", pruner="none", seed=1, heartbeat_interval=10,
                                 grace_period=grace_period)
        storage = storage_for(settings)
        return open_study(settings, storage), storage

    running, storage = study(300)
    trial = running.ask()
    holder = LeaseStore(storage.url, heartbeat_interval=100, grace_period=300)
    try:
        assert holder.acquire(study_scope(running), f"trial-{trial._trial_id}") is not None
        age(holder, 60)
        reader, reader_storage = study(30)
        assert recover_dead_trials(reader, reader_storage) == []
        assert [t.state.name for t in reader.get_trials()] == ["RUNNING"]
        age(holder, 300)  # now dead by its own grace period
        assert recover_dead_trials(reader, reader_storage) == [trial.number]
        assert [t.state.name for t in reader.get_trials()] == ["FAIL", "WAITING"]
    finally:
        holder.close()


def test_a_live_worker_missing_grace_period_of_heartbeats_stops_before_its_next_commit(tmp_path):
    from pipelines.checkpoints import CheckpointStore

    store = LeaseStore(f"sqlite:///{tmp_path}/leases.db", heartbeat_interval=0.2, grace_period=1.0)
    lease = store.acquire("run-1", "unit")
    with store.engine.begin() as conn:  # the database unreachable for this worker: every heartbeat fails
        conn.execute(text("ALTER TABLE pipelines_leases RENAME TO pipelines_leases_away"))
    try:
        lease.check()  # within grace_period: still ours
        assert wait_until(lambda: lease.lost, timeout=4), "no heartbeat for grace_period must lose the lease"
        with pytest.raises(LeaseLost, match="no heartbeat confirmed for grace_period=1s"):
            lease.check()
        artifacts = Artifacts(tmp_path / "artifacts")
        checkpoints = CheckpointStore(artifacts, "run-1", "fp", guard=lease.fence)
        checkpoints.commit(checkpoint(tmp_path / "out", 5), epoch=1)
        with pytest.raises(LeaseLost):
            checkpoints.wait()
        assert artifacts.files() == [] and artifacts.tags == {}
    finally:
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE pipelines_leases_away RENAME TO pipelines_leases"))
        store.close()


def test_a_stale_epoch_commits_nothing_after_the_takeover(tmp_path):
    from pipelines.checkpoints import CheckpointStore
    from pipelines.stages.shards import Shards

    url = f"sqlite:///{tmp_path}/leases.db"
    stalled, successor = LeaseStore(url, 5, 30), LeaseStore(url, 5, 30)
    try:
        old = stalled.acquire("run-1", "unit")
        new = None
        while new is None:  # the stalled worker's heartbeat is a minute old: taken over
            age(stalled, 60)
            new = successor.acquire("run-1", "unit")
        assert (old.epoch, new.epoch) == (1, 2)
        old.check()  # the stalled worker has not noticed yet (its next heartbeat is seconds away) ...
        with pytest.raises(LeaseLost, match="another owner took it over"):
            old.fence()  # ... but its commit path checks the row

        artifacts = Artifacts(tmp_path / "artifacts")
        stale = CheckpointStore(artifacts, "run-1", "fp", guard=old.fence)
        stale.commit(checkpoint(tmp_path / "old", 5), epoch=1)
        with pytest.raises(LeaseLost):
            stale.wait()
        assert artifacts.files() == []
        current = CheckpointStore(artifacts, "run-1", "fp", guard=new.fence)
        current.commit(checkpoint(tmp_path / "new", 5), epoch=1)
        current.wait()
        manifest = json.loads((tmp_path / "artifacts/run-1/checkpoints/checkpoint-5/manifest.json").read_text())
        assert manifest["lease_epoch"] == 2

        ctx = SimpleNamespace(tracker=artifacts, parent_id="run-1", stage="predict", resumed=False)
        shards = Shards(ctx, pd.DataFrame({"row_id": [0, 1]}), 2, tmp_path)
        output = pd.DataFrame({"row_id": [0, 1], "predicted": ["a", "b"]})
        with pytest.raises(LeaseLost):
            shards._commit(0, output, old)
        assert not (tmp_path / "artifacts/run-1/shards").exists()
        shards._commit(0, output, new)
        assert json.loads((tmp_path / "artifacts/run-1/shards/shard-00000.json").read_text())["lease_epoch"] == 2
    finally:
        stalled.close()
        successor.close()


def test_a_holdout_trial_trains_under_its_runs_unit_lease(tmp_path, monkeypatch):
    from pipelines.stages import search

    url = f"sqlite:///{tmp_path}/leases.db"
    mine, other = LeaseStore(url, 5, 30), LeaseStore(url, 5, 30)
    seen = []

    def fit_unit(unit, run_id, train, valid, lease, callbacks=(), save_model=True):
        seen.append(lease)
        assert lease is not None and lease.held and (lease.scope, lease.unit) == (run_id, "unit")
        assert other.acquire(run_id, "unit") is None  # a second attempt cannot train or prune this run now
        return SimpleNamespace(metrics={"accuracy": 0.5})

    monkeypatch.setattr(search, "fit_unit", fit_unit)
    tracker = SimpleNamespace(get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(tags={})))
    unit = SimpleNamespace(cfg=SimpleNamespace(metric="accuracy", objective="holdout"), tracker=tracker,
                           data=SimpleNamespace(frame=pd.DataFrame({"text": list("abcd")})), leases=mine)
    objective = search._Objective(unit, {}, None, [0], 1)
    try:
        assert objective._evaluate(None, unit, "trial-run") == (0.5, False)
        assert len(seen) == 1 and not seen[0].held  # released once the trial's training ended
        assert other.acquire("trial-run", "unit") is not None
    finally:
        mine.close()
        other.close()


ASKER = r"""
import sys
from contextlib import nullcontext
from pipelines.study import SearchLimits, StudySettings, open_study, optimize, storage_for
settings = StudySettings(storage=sys.argv[1], study_name=sys.argv[2], direction="maximize", sampler="random",
                         pruner="none", seed=3, heartbeat_interval=10, grace_period=300)
storage = storage_for(settings)
optimize(open_study(settings, storage), storage, lambda t: t.suggest_float("x", 0, 1), SearchLimits(3, 0),
         nullcontext)
"""


def test_a_kill_inside_ask_leaves_a_trial_that_is_requeued_with_its_number(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    env = {**os.environ, "PIPELINES_FAILPOINT": "study_ask:2"}  # SIGKILL once the 2nd trial exists, unleased
    killed = subprocess.run([sys.executable, "-c", ASKER, url, "killed"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    from pipelines.study import LOGICAL_ATTR, SearchLimits, StudySettings, open_study, optimize, storage_for

    def study(name: str):
        settings = StudySettings(storage=url, study_name=name, direction="maximize", sampler="random",
                                 pruner="none", seed=3, heartbeat_interval=10, grace_period=300)
        storage = storage_for(settings)
        return open_study(settings, storage), storage

    resumed, storage = study("killed")
    assert [t.state.name for t in resumed.get_trials()] == ["COMPLETE", "RUNNING"]
    # grace_period=300, yet the trial is re-queued at once: it has no lease (its worker died inside _ask)
    assert optimize(resumed, storage, lambda t: t.suggest_float("x", 0, 1), SearchLimits(3, 0), nullcontext)
    trials = resumed.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    done = {t.user_attrs[LOGICAL_ATTR]: t.params for t in trials if t.state.name == "COMPLETE"}
    reference, storage = study("reference")  # uninterrupted
    assert optimize(reference, storage, lambda t: t.suggest_float("x", 0, 1), SearchLimits(3, 0), nullcontext)
    expected = {t.user_attrs[LOGICAL_ATTR]: t.params for t in reference.get_trials()}
    assert done == expected and sorted(done) == [0, 1, 2]  # the retry kept number 1, and its parameters


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_old_lease_table_is_upgraded_and_its_rows_kept(tmp_path, backend, request):
    from conftest import fresh_database

    url = (f"sqlite:///{tmp_path}/leases.db" if backend == "sqlite"
           else fresh_database(request.getfixturevalue("postgres_url")))
    engine = create_engine(url)  # the table as an older version made it, with one of its rows
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE pipelines_leases (scope VARCHAR(255) NOT NULL, unit VARCHAR(255) NOT NULL, "
                          "owner VARCHAR(255) NOT NULL, heartbeat DOUBLE PRECISION NOT NULL, "
                          "PRIMARY KEY (scope, unit))"))
        conn.execute(text("INSERT INTO pipelines_leases VALUES ('p', 'fold-0', 'elsewhere.invalid:1:0ld', :h)"),
                     {"h": time.time() - 10})
    engine.dispose()
    store = LeaseStore(url, heartbeat_interval=0.2, grace_period=1.0)
    try:
        [row] = store.holders("p")
        assert (row.owner, row.epoch, row.grace_period, row.alive) == ("elsewhere.invalid:1:0ld", 0, None, False)
        assert 9 < row.age < 60  # by the database's clock
        lease = store.acquire("p", "fold-0")  # judged with this store's grace (the row carries none): taken over
        assert lease is not None and lease.epoch == 1 and lease.fence() == 1
        [row] = store.holders("p")
        assert (row.owner, row.grace_period, row.alive) == (store.owner, 1.0, True) and row.age < 1
    finally:
        store.close()
