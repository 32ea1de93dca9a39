"""`train` end to end: a SIGKILLed run resumes from its checkpoint to the same predictions."""

from __future__ import annotations

import signal

import pytest
from conftest import run_entrypoint
from helpers import artifact_text, metric_steps, parents

pytestmark = pytest.mark.slow


def train_args(tiny_data, tiny_model, **extra) -> dict:
    args = dict(data=tiny_data, model=tiny_model, epochs=2, batch_size=8, max_length=32, learning_rate=1e-3,
                seed=3, validation_fraction=0.25, early_stopping_patience=2, experiment_name="tr")
    return {**args, **extra}


def test_train_killed_mid_epoch_resumes_to_identical_predictions(tiny_data, tiny_model, tmp_path, store):
    reference = tmp_path / "reference"
    reference.mkdir()
    ref_env = {**store, "MLFLOW_TRACKING_URI": f"sqlite:///{reference}/mlflow.db"}
    done = run_entrypoint("train", train_args(tiny_data, tiny_model), ref_env, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    (ref,) = parents(ref_env, "tr", "train")
    expected = artifact_text(ref_env, ref.info.run_id, "predictions.csv", tmp_path / "a")

    # 90 training rows / batch 8 = 12 steps per epoch; die 4 steps into epoch 2
    killed = run_entrypoint("train", train_args(tiny_data, tiny_model), {**store, "PIPELINES_FAILPOINT": "train_step:16"},
                            tmp_path)
    assert killed.returncode == -signal.SIGKILL
    (run,) = parents(store, "tr", "train")
    assert run.data.tags["checkpoint"] == "checkpoints/checkpoint-12"

    resumed = run_entrypoint("train", train_args(tiny_data, tiny_model, resume="true"), store, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming train run {run.info.run_id} from epoch 1 checkpoint" in resumed.stderr
    assert "training starts at step 12 of 24" in resumed.stderr  # continued at the checkpoint, not from step 0
    (after,) = parents(store, "tr", "train")
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert artifact_text(store, after.info.run_id, "predictions.csv", tmp_path / "b") == expected
    final = {k: v for k, v in after.data.metrics.items() if k.startswith("final_")}
    assert final == {k: v for k, v in ref.data.metrics.items() if k.startswith("final_")}
    assert all(len(s) == len(set(s)) for s in metric_steps(store, after.info.run_id).values())

    again = run_entrypoint("train", train_args(tiny_data, tiny_model, resume="true"), store, tmp_path)
    assert again.returncode == 0 and "already finished: nothing to do" in again.stderr
    assert len(parents(store, "tr", "train")) == 1


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_state_survives_a_kill_after_a_non_improving_evaluation(tiny_data, tiny_model, tmp_path, store,
                                                                              patience):
    # a learning rate so small that predictions, hence accuracy, never change: every evaluation after the first
    # is non-improving, whatever the tiny model (its WordPiece vocabulary may differ between sessions)
    args = train_args(tiny_data, tiny_model, epochs=6, learning_rate=1e-9, seed=42, metric="accuracy",
                      early_stopping_patience=patience)
    reference = tmp_path / "reference"
    reference.mkdir()
    ref_env = {**store, "MLFLOW_TRACKING_URI": f"sqlite:///{reference}/mlflow.db"}
    done = run_entrypoint("train", args, ref_env, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    (ref,) = parents(ref_env, "tr", "train")
    stopped = int(ref.data.metrics["final_epochs_trained"])
    assert stopped == 1 + patience and ref.data.metrics["final_best_epoch"] == 1
    # the kill comes right after the checkpoint of a non-improving evaluation: the last one (patience 1, training
    # had decided to stop) or the one before it (patience 2: a patience counter reset by the resume trains on)
    epoch = stopped - (patience - 1)  # 12 steps per epoch
    killed = run_entrypoint("train", args, {**store, "PIPELINES_FAILPOINT": f"checkpoint_committed:{epoch}"}, tmp_path)
    assert killed.returncode == -signal.SIGKILL  # right after the non-improving evaluation's checkpoint
    resumed = run_entrypoint("train", {**args, "resume": "true"}, store, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if patience == 1:  # training had decided to stop there: nothing more is trained
        assert f"training had already stopped at step {12 * epoch}" in resumed.stderr
        assert "training starts at step" not in resumed.stderr
    else:  # it goes on from the checkpoint, the patience counter (1 of 2) restored with it
        assert f"training starts at step {12 * epoch} of 72" in resumed.stderr
    (after,) = parents(store, "tr", "train")
    final = {k: v for k, v in after.data.metrics.items() if k.startswith("final_")}
    assert final == {k: v for k, v in ref.data.metrics.items() if k.startswith("final_")}
    assert artifact_text(store, after.info.run_id, "predictions.csv", tmp_path / "b") == \
        artifact_text(ref_env, ref.info.run_id, "predictions.csv", tmp_path / "a")
