"""The MLproject contract: generated file is current, and `mlflow run ... -P resume=true` works."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import artifact_text, children, parents, runs


def test_mlproject_is_generated_from_the_configs():
    proc = subprocess.run([sys.executable, "scripts/make_mlproject.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def mlflow_run(env, cwd, data, model, *params: str) -> subprocess.CompletedProcess:
    cmd = ["mlflow", "run", str(ROOT), "-e", "kfold", "--env-manager", "local", "--experiment-name", "proj",
           "-P", f"data={data}", "-P", "text_column=text", "-P", "label_column=label", "-P", f"model={model}",
           "-P", "k_folds=3", "-P", "epochs=2", "-P", "max_length=32", "-P", "batch_size=8",
           "-P", "learning_rate=1e-3", "-P", "seed=42"]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mlflow_run_kfold_killed_then_resumed(tiny_data, tiny_model, tmp_path, store):
    killed = mlflow_run({**store, "PIPELINES_FAILPOINT": "checkpoint_committed:3"}, tmp_path, tiny_data, tiny_model)
    assert killed.returncode != 0
    (parent,) = parents(store, "proj", "kfold")
    assert parent.info.status == "FAILED"  # mlflow run marks its run FAILED when the entry point dies
    assert parent.data.params["k_folds"] == "3"

    resumed = mlflow_run(store, tmp_path, tiny_data, tiny_model, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming kfold run {parent.info.run_id}: folds 0 finished, fold 1 from epoch 1" in resumed.stderr
    (after,) = parents(store, "proj", "kfold")
    assert after.info.run_id == parent.info.run_id and after.info.status == "FINISHED"
    assert sorted(r.data.tags["fold"] for r in children(store, "proj", parent.info.run_id)) == ["0", "1", "2"]
    (launcher,) = runs(store, "proj", f"tags.resumed_run_id = '{parent.info.run_id}'")
    assert launcher.info.status == "FINISHED"
    oof = artifact_text(store, parent.info.run_id, "oof_predictions.csv", tmp_path / "oof")
    assert len(oof.splitlines()) == 121
