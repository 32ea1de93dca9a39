"""The MLproject contract through a real `mlflow run`: resolved settings are what runs show and later stages read;
a killed invocation resumes; each invocation is filed under the stage's parent run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from helpers import artifact_text, children, parents, runs


def test_mlproject_is_generated_from_the_configs():
    proc = subprocess.run([sys.executable, "scripts/make_mlproject.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    project = yaml.safe_load((ROOT / "MLproject").read_text())  # what `mlflow run` parses
    assert set(project["entry_points"]) >= {"train", "tapt", "kfold", "optuna", "retrain"}


def mlflow_run(env, cwd, entry: str, *params: str) -> subprocess.CompletedProcess:
    cmd = ["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", "--experiment-name", "proj"]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def units(env, parent_id: str, key: str) -> list:
    return [r for r in children(env, "proj", parent_id) if key in r.data.tags]


@pytest.mark.slow
def test_mlflow_run_records_resolved_settings_resumes_and_feeds_params_from(tiny_data, tiny_model, tmp_path, store):
    config = tmp_path / "settings.yaml"
    # the file sets seed 7; `-P seed=42` (the default) must still win: any explicit -P beats the file
    config.write_text("learning_rate: 1.0e-3\nepochs: 2\nseed: 7\nbatch_size: 8\nk_folds: 3\n")
    common = (f"data={tiny_data}", f"model={tiny_model}", "max_length=32", f"config_file={config}", "seed=42")

    killed = mlflow_run({**store, "PIPELINES_FAILPOINT": "checkpoint_committed:3"}, tmp_path, "kfold", *common)
    assert killed.returncode != 0
    (parent,) = parents(store, "proj", "kfold")
    assert parent.info.status == "RUNNING"  # SIGKILLed: recognised on resume
    (launcher,) = runs(store, "proj", "tags.invocation = 'kfold'")
    assert launcher.info.run_id != parent.info.run_id, "the launcher, holding the literal -P values, is not the parent"
    assert launcher.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert launcher.data.params["learning_rate"] in ("", "''") and launcher.info.status == "FAILED"  # not given
    # the parent shows the values used: file (learning_rate, epochs) and explicit -P over the file (seed)
    used = {k: parent.data.params[k] for k in ("learning_rate", "epochs", "seed", "batch_size", "k_folds")}
    assert used == {"learning_rate": "0.001", "epochs": "2", "seed": "42", "batch_size": "8", "k_folds": "3"}
    settings = json.loads(artifact_text(store, parent.info.run_id, "config.json", tmp_path / "c"))["settings"]
    assert (settings["learning_rate"], settings["seed"], settings["epochs"]) == (1e-3, 42, 2)
    for key in ("torch_version", "transformers_version", "mlflow_version", "optuna_version", "device"):
        assert parent.data.tags[key]

    resumed = mlflow_run(store, tmp_path, "kfold", *common, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming kfold run {parent.info.run_id}: folds 0 finished, fold 1 from epoch 1" in resumed.stderr
    assert "training starts at step 10 of 20" in resumed.stderr  # fold 1 continued from its checkpoint
    (after,) = parents(store, "proj", "kfold")
    assert after.info.run_id == parent.info.run_id and after.info.status == "FINISHED"
    assert sorted(r.data.tags["fold"] for r in units(store, parent.info.run_id, "fold")) == ["0", "1", "2"]
    invocations = units(store, parent.info.run_id, "invocation")
    assert [r.info.status for r in invocations] == ["FAILED", "FINISHED"]
    assert invocations[1].data.tags["mlflow.runName"].startswith("resume of kfold")
    oof = artifact_text(store, parent.info.run_id, "oof_predictions.csv", tmp_path / "oof")
    assert len(oof.splitlines()) == 121

    # a later stage reads the kfold run's resolved settings, not the literal -P values of its launcher
    retrain = mlflow_run(store, tmp_path, "retrain", f"data={tiny_data}", f"model={tiny_model}", "max_length=32",
                         f"params_from={parent.info.run_id}")
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    (model_run,) = parents(store, "proj", "retrain")
    assert (model_run.data.params["learning_rate"], model_run.data.params["batch_size"]) == ("0.001", "8")
    assert model_run.data.tags["params_source"] == parent.info.run_id
