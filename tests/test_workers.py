"""Several workers on one stage: a real PostgreSQL tracking store and lease database, real processes and SIGKILL."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
from conftest import entrypoint, fresh_database, store_env
from helpers import artifact_frame, children, metric_steps, parents

pytestmark = pytest.mark.slow


def trained_folds(log: str) -> list[int]:
    return [int(m) - 1 for m in re.findall(r"fold (\d+)/5: ", log)]


def test_three_workers_started_together_on_a_fresh_database_split_the_folds(tiny_data, tiny_model, tmp_path,
                                                                              postgres_url):
    env = {**store_env(tmp_path), "MLFLOW_TRACKING_URI": fresh_database(postgres_url)}
    args = dict(data=tiny_data, model=tiny_model, k_folds=5, epochs=2, batch_size=8, max_length=32,
                learning_rate=1e-3, seed=42, experiment_name="team", resume="true",
                optuna_storage=fresh_database(postgres_url), heartbeat_interval=1, grace_period=5)
    # one worker dies right after the first checkpoint of its first fold; the others take that fold over
    envs = [{**env, "PIPELINES_FAILPOINT": "checkpoint_committed:1"}, env, env]
    workers = [subprocess.Popen(entrypoint("kfold", args), env=e, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for e in envs]
    logs = [w.communicate(timeout=900)[1] for w in workers]
    assert workers[0].returncode == -signal.SIGKILL, logs[0][-3000:]
    assert [w.returncode for w in workers[1:]] == [0, 0], "\n".join(log[-3000:] for log in logs[1:])

    (parent,) = parents(env, "team", "kfold")  # one parent for all workers
    assert parent.info.status == "FINISHED"
    fold_runs = [r for r in children(env, "team", parent.info.run_id) if "fold" in r.data.tags]
    assert sorted(r.data.tags["fold"] for r in fold_runs) == ["0", "1", "2", "3", "4"], "one run per fold"
    assert all(r.info.status == "FINISHED" for r in fold_runs)
    for run in [parent, *fold_runs]:
        assert all(len(s) == len(set(s)) for s in metric_steps(env, run.info.run_id).values()), "a step twice"
    (killed_fold,) = trained_folds(logs[0])
    survivors = trained_folds(logs[1]) + trained_folds(logs[2])
    assert sorted(survivors) == [0, 1, 2, 3, 4], "each fold is trained by exactly one surviving worker"
    assert sum(bool(trained_folds(log)) for log in logs[1:]) == 2, "both survivors took part"
    assert "training starts at step 12 of 24" in logs[1] + logs[2], "the killed fold continued at its checkpoint"
    assert killed_fold in survivors
    oof = artifact_frame(env, parent.info.run_id, "oof_predictions.csv", tmp_path / "oof")
    assert sorted(oof["row_id"]) == list(range(120)) and sorted(oof["fold"].unique()) == [0, 1, 2, 3, 4]
    for i in range(5):
        assert f"fold{i}_accuracy" in parent.data.metrics
