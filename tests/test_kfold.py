"""`kfold` end to end: real subprocesses, a real SQLite store, real SIGKILL/SIGTERM, resume."""

from __future__ import annotations

import io
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import entrypoint, run_entrypoint, store_env
from helpers import artifact_text, children, client, metric_steps, parents

pytestmark = pytest.mark.slow

K, EPOCHS, BATCH = 3, 2, 8
ROWS_PER_FOLD_TRAIN = 80  # 120 rows, 3 folds
STEPS_PER_EPOCH = ROWS_PER_FOLD_TRAIN // BATCH


def kfold_args(tiny_data, tiny_model, **extra) -> dict:
    args = dict(data=tiny_data, text_column="text", label_column="label", model=tiny_model, k_folds=K,
                epochs=EPOCHS, batch_size=BATCH, max_length=32, learning_rate=1e-3, seed=42, experiment_name="cv")
    args.update(extra)
    return args


def finished_result(env, tmp_path, experiment="cv") -> dict:
    """The parent run and what a user compares: OOF file and CV metrics."""
    (parent,) = parents(env, experiment, "kfold")
    assert parent.info.status == "FINISHED"
    return {
        "env": env,
        "parent": parent,
        "oof": artifact_text(env, parent.info.run_id, "oof_predictions.csv", tmp_path / "oof"),
        "cv": {k: v for k, v in parent.data.metrics.items() if k.startswith(("cv_", "fold"))},
        "folds": children(env, experiment, parent.info.run_id),
    }


@pytest.fixture(scope="module")
def baseline(tiny_data, tiny_model, tmp_path_factory):
    """An uninterrupted kfold run in its own store."""
    tmp = tmp_path_factory.mktemp("baseline")
    env = store_env(tmp)
    proc = run_entrypoint("kfold", kfold_args(tiny_data, tiny_model), env, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return finished_result(env, tmp)


def test_uninterrupted_kfold_logs_folds_metrics_and_oof(baseline):
    parent, folds = baseline["parent"], baseline["folds"]
    assert parent.data.tags["fingerprint"] and parent.data.tags["stage"] == "kfold"
    assert sorted(r.data.tags["fold"] for r in folds) == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" and "checkpoint" not in r.data.tags for r in folds)
    for name in ("cv_accuracy_mean", "cv_accuracy_std", "cv_f1_macro_mean", "cv_f1_macro_std"):
        assert name in baseline["cv"]
    lines = baseline["oof"].splitlines()
    assert lines[0].startswith("row_id,fold,label,predicted,prob_computers,prob_politics,prob_science")
    assert len(lines) == 1 + 120
    assert sorted(int(line.split(",")[0]) for line in lines[1:]) == list(range(120))
    oof = pd.read_csv(io.StringIO(baseline["oof"]))
    probs = oof[["prob_computers", "prob_politics", "prob_science"]]
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.idxmax(axis=1).str.removeprefix("prob_") == oof["predicted"]).all()
    assert oof.groupby("fold").size().tolist() == [40, 40, 40]
    accuracy = [(g["label"] == g["predicted"]).mean() for _, g in oof.groupby("fold")]
    assert [baseline["cv"][f"fold{i}_accuracy"] for i in range(K)] == accuracy
    env = baseline["env"]
    assert {a.path for a in client(env).list_artifacts(parent.info.run_id, "plots")} == \
        {"plots/fold_metrics.png", "plots/confusion_matrix.png"}
    assert all(client(env).list_artifacts(r.info.run_id, "plots")[0].path == "plots/learning_curve.png" for r in folds)


def _kill_then_resume(tiny_data, tiny_model, tmp_path, env, failpoint: str):
    killed = run_entrypoint("kfold", kfold_args(tiny_data, tiny_model), {**env, "PIPELINES_FAILPOINT": failpoint},
                            tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (parent,) = parents(env, "cv", "kfold")
    before = {r.data.tags["fold"]: r for r in children(env, "cv", parent.info.run_id)}
    assert before["0"].info.status == "FINISHED" and before["1"].info.status == "RUNNING"
    resumed = run_entrypoint("kfold", kfold_args(tiny_data, tiny_model, resume="true"), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return parent, before, resumed


def _assert_same_as_baseline(env, result, baseline, parent, before):
    assert result["parent"].info.run_id == parent.info.run_id
    after = {r.data.tags["fold"]: r for r in result["folds"]}
    assert len(result["folds"]) == K, "a fold was run twice"
    assert after["0"].info.run_id == before["0"].info.run_id
    assert after["0"].info.end_time == before["0"].info.end_time, "fold 0 was retrained"
    assert after["1"].info.run_id == before["1"].info.run_id
    for run in result["folds"]:
        for key, steps in metric_steps(env, run.info.run_id).items():
            assert len(steps) == len(set(steps)), f"duplicate steps of {key} in fold {run.data.tags['fold']}"
    assert result["oof"] == baseline["oof"]
    assert result["cv"] == baseline["cv"]


def _starts(log: str) -> list[int]:
    """The step at which each training of the process started (from the `training starts at step N` log)."""
    return [int(line.split("training starts at step ")[1].split()[0]) for line in log.splitlines()
            if "training starts at step " in line]


@pytest.fixture
def env(store):
    return store


def test_sigkill_during_fold_1_resumes_from_its_checkpoint(baseline, tiny_data, tiny_model, tmp_path, env):
    # killed in fold 1, epoch 2, three steps after the epoch-1 checkpoint was uploaded
    step = EPOCHS * STEPS_PER_EPOCH + STEPS_PER_EPOCH + 3
    parent, before, resumed = _kill_then_resume(tiny_data, tiny_model, tmp_path, env, f"train_step:{step}")
    assert before["1"].data.tags["checkpoint"] == f"checkpoints/checkpoint-{STEPS_PER_EPOCH}"
    assert "folds 0 finished, fold 1 from epoch 1 checkpoint" in resumed.stderr
    assert "2 folds to go" in resumed.stderr
    # the continuation itself: fold 1 restarted at its checkpoint's step, fold 2 from scratch, fold 0 not at all
    assert _starts(resumed.stderr) == [STEPS_PER_EPOCH, 0]
    _assert_same_as_baseline(env, finished_result(env, tmp_path), baseline, parent, before)


def test_sigkill_during_checkpoint_upload_is_detected(baseline, tiny_data, tiny_model, tmp_path, env):
    # fold 0 commits 2 checkpoints; the 3rd upload (fold 1, epoch 1) is torn after its first file
    parent, before, resumed = _kill_then_resume(tiny_data, tiny_model, tmp_path, env, "checkpoint_upload:3")
    assert "checkpoint" not in before["1"].data.tags
    assert "no manifest: the upload did not finish" in resumed.stderr
    assert _starts(resumed.stderr) == [0, 0]  # the torn copy was not used: fold 1 started over, then fold 2
    _assert_same_as_baseline(env, finished_result(env, tmp_path), baseline, parent, before)


def test_sigterm_marks_runs_killed_and_changed_setting_is_refused(baseline, tiny_data, tiny_model, tmp_path, env):
    proc = subprocess.Popen(entrypoint("kfold", kfold_args(tiny_data, tiny_model)), env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until fold 1 (the second of three) is training
        if "fold 2/3:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    (parent,) = parents(env, "cv", "kfold")
    assert parent.info.status == "KILLED"
    statuses = [r.info.status for r in children(env, "cv", parent.info.run_id)]
    assert "KILLED" in statuses and "RUNNING" not in statuses

    refused = run_entrypoint("kfold", kfold_args(tiny_data, tiny_model, resume="true", learning_rate=5e-4), env,
                             tmp_path)
    assert refused.returncode == 2
    assert "learning_rate: 0.001 -> 0.0005" in refused.stderr
    assert len(parents(env, "cv", "kfold")) == 1, "a refused resume must not create a run"

    resumed = run_entrypoint("kfold", kfold_args(tiny_data, tiny_model, resume="true"), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = finished_result(env, tmp_path)
    assert result["parent"].info.run_id == parent.info.run_id
    assert result["oof"] == baseline["oof"]


def test_resume_from_continues_a_run_of_another_experiment(baseline, tiny_data, tiny_model, tmp_path, env):
    killed = run_entrypoint("kfold", kfold_args(tiny_data, tiny_model),
                            {**env, "PIPELINES_FAILPOINT": "checkpoint_committed:1"}, tmp_path)
    assert killed.returncode == -signal.SIGKILL
    (parent,) = parents(env, "cv", "kfold")

    other = kfold_args(tiny_data, tiny_model, experiment_name="elsewhere", resume_from=parent.info.run_id)
    mismatch = run_entrypoint("kfold", {**other, "k_folds": 4}, env, tmp_path)
    assert mismatch.returncode == 2 and "k_folds: 3 -> 4" in mismatch.stderr

    resumed = run_entrypoint("kfold", other, env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming kfold run {parent.info.run_id}" in resumed.stderr
    result = finished_result(env, tmp_path)
    assert result["oof"] == baseline["oof"]
