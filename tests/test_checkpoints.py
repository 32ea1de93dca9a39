"""CheckpointStore against a real SQLite store and local artifact store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.checkpoints import CheckpointStore
from pipelines.tracking import Tracker


@pytest.fixture
def unit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    tracker = Tracker("checkpoints")
    run_id = tracker.start_parent("test", "fp1", {})
    return tracker, run_id, CheckpointStore(tracker, run_id, "fp1")


def fake_checkpoint(root: Path, step: int, best: str | None = None) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step % 256]) * 1000)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "best_model_checkpoint": best}))
    return folder


def artifact_file(tracker: Tracker, run_id: str, rel: str) -> Path:
    uri = tracker.client.get_run(run_id).info.artifact_uri
    return Path(uri.removeprefix("file://")) / rel


def test_commit_tags_and_prunes_all_but_latest_and_best(unit, tmp_path):
    tracker, run_id, store = unit
    local = tmp_path / "out"
    store.commit(fake_checkpoint(local, 5), epoch=1)
    store.commit(fake_checkpoint(local, 10), epoch=2, best_dir=str(local / "checkpoint-5"))
    store.commit(fake_checkpoint(local, 15), epoch=3, best_dir=str(local / "checkpoint-5"))
    names = sorted(Path(p).name for p in tracker.list_artifacts(run_id, "checkpoints"))
    assert names == ["checkpoint-15", "checkpoint-5"]
    tags = tracker.get_run(run_id).data.tags
    assert (tags["checkpoint"], tags["checkpoint_epoch"]) == ("checkpoints/checkpoint-15", "3")


def test_corrupt_latest_falls_back_to_previous_good_copy(unit, tmp_path, caplog):
    tracker, run_id, store = unit
    local = tmp_path / "out"
    store.commit(fake_checkpoint(local, 5), epoch=1)
    store.commit(fake_checkpoint(local, 10, best=str(local / "checkpoint-5")), epoch=2,
                 best_dir=str(local / "checkpoint-5"))
    weights = artifact_file(tracker, run_id, "checkpoints/checkpoint-10/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:500])  # a torn copy

    restored = store.restore(tmp_path / "restore")
    assert restored is not None and restored.name == "checkpoint-5"
    assert "model.safetensors does not match its digest" in caplog.text
    assert not (restored / "manifest.json").exists()


def test_best_checkpoint_path_is_rewritten_to_the_local_copy(unit, tmp_path):
    tracker, run_id, store = unit
    local = tmp_path / "out"
    store.commit(fake_checkpoint(local, 5), epoch=1)
    store.commit(fake_checkpoint(local, 10, best="/other/machine/checkpoint-5"), epoch=2,
                 best_dir=str(local / "checkpoint-5"))
    restored = store.restore(tmp_path / "restore")
    state = json.loads((restored / "trainer_state.json").read_text())
    assert restored.name == "checkpoint-10"
    assert state["best_model_checkpoint"] == str(tmp_path / "restore" / "checkpoint-5")
    assert (tmp_path / "restore" / "checkpoint-5" / "model.safetensors").is_file()


def test_checkpoint_of_other_settings_is_rejected(unit, tmp_path, caplog):
    tracker, run_id, _ = unit
    CheckpointStore(tracker, run_id, "fp-other").commit(fake_checkpoint(tmp_path / "out", 5), epoch=1)
    assert CheckpointStore(tracker, run_id, "fp1").restore(tmp_path / "restore") is None
    assert "belongs to settings fp-other" in caplog.text


def test_clear_removes_checkpoints_and_tags(unit, tmp_path):
    tracker, run_id, store = unit
    store.commit(fake_checkpoint(tmp_path / "out", 5), epoch=1)
    store.clear()
    assert tracker.list_artifacts(run_id, "checkpoints") == []
    assert "checkpoint" not in tracker.get_run(run_id).data.tags
    assert store.restore(tmp_path / "restore") is None


def test_manifest_that_does_not_parse_is_a_bad_copy_not_a_crash(unit, tmp_path, caplog):
    tracker, run_id, store = unit
    local = tmp_path / "out"
    store.commit(fake_checkpoint(local, 5), epoch=1)
    store.commit(fake_checkpoint(local, 10, best=str(local / "checkpoint-5")), epoch=2,
                 best_dir=str(local / "checkpoint-5"))
    artifact_file(tracker, run_id, "checkpoints/checkpoint-10/manifest.json").write_text('{"files": {"model.saf')

    restored = store.restore(tmp_path / "restore")
    assert restored is not None and restored.name == "checkpoint-5"
    assert "checkpoint-10" in caplog.text and "its manifest does not parse" in caplog.text
