"""CheckpointStore against a real SQLite store and local artifact store."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from pipelines.checkpoints import CheckpointStore
from pipelines.tracking import Tracker
from pipelines.training import _train


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
    store.wait()
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
    store.wait()
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
    store.wait()
    restored = store.restore(tmp_path / "restore")
    state = json.loads((restored / "trainer_state.json").read_text())
    assert restored.name == "checkpoint-10"
    assert state["best_model_checkpoint"] == str(tmp_path / "restore" / "checkpoint-5")
    assert (tmp_path / "restore" / "checkpoint-5" / "model.safetensors").is_file()


def test_checkpoint_of_other_settings_is_rejected(unit, tmp_path, caplog):
    tracker, run_id, _ = unit
    other = CheckpointStore(tracker, run_id, "fp-other")
    other.commit(fake_checkpoint(tmp_path / "out", 5), epoch=1)
    other.wait()
    assert CheckpointStore(tracker, run_id, "fp1").restore(tmp_path / "restore") is None
    assert "belongs to settings fp-other" in caplog.text


def test_clear_removes_checkpoints_and_tags(unit, tmp_path):
    tracker, run_id, store = unit
    store.commit(fake_checkpoint(tmp_path / "out", 5), epoch=1)
    store.wait()
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
    store.wait()
    artifact_file(tracker, run_id, "checkpoints/checkpoint-10/manifest.json").write_text('{"files": {"model.saf')

    restored = store.restore(tmp_path / "restore")
    assert restored is not None and restored.name == "checkpoint-5"
    assert "checkpoint-10" in caplog.text and "its manifest does not parse" in caplog.text


def call(function, *args) -> list[BaseException]:
    """The exception ``function(*args)`` raised, in a list (for a thread whose errors the test must see)."""
    try:
        function(*args)
    except BaseException as exc:  # noqa: BLE001
        return [exc]
    return []


class GatedUploads:
    """The real ``Tracker.upload``, recording each call, held at a gate until the test opens it."""

    def __init__(self, tracker: Tracker, monkeypatch):
        self.real, self.calls, self.gate = tracker.upload, [], threading.Event()
        monkeypatch.setattr(tracker, "upload", self)

    def __call__(self, run_id, local_path, artifact_path=None, link=False):
        assert self.gate.wait(timeout=60)
        self.calls.append(f"{artifact_path}/{Path(local_path).name}")
        self.real(run_id, local_path, artifact_path, link=link)


def test_upload_runs_in_the_background_one_at_a_time(unit, tmp_path, monkeypatch):
    tracker, run_id, store = unit
    uploads = GatedUploads(tracker, monkeypatch)
    local = tmp_path / "out"
    store.commit(fake_checkpoint(local, 5), epoch=1)
    # commit returned while its upload waits at the gate: training goes on meanwhile
    assert uploads.calls == [] and "checkpoint" not in tracker.get_run(run_id).data.tags
    shutil.rmtree(local / "checkpoint-5")  # the Trainer's rotation may delete the folder during the upload
    errors = []
    second = threading.Thread(target=lambda: errors.extend(call(store.commit, fake_checkpoint(local, 10), 2)))
    second.start()
    uploads.gate.set()
    second.join()
    store.wait()
    assert errors == []
    # the first copy, manifest last, was committed before any file of the second one
    assert uploads.calls == [f"checkpoints/checkpoint-{step}/{name}" for step in (5, 10)
                             for name in ("model.safetensors", "trainer_state.json", "manifest.json")]
    assert tracker.get_run(run_id).data.tags["checkpoint"] == "checkpoints/checkpoint-10"
    assert [Path(p).name for p in tracker.list_artifacts(run_id, "checkpoints")] == ["checkpoint-10"]
    assert not list(local.glob(".upload-*"))  # the hard-linked snapshots are gone


def test_local_artifact_store_gets_hard_links_that_survive_the_trainer_folder(unit, tmp_path):
    tracker, run_id, store = unit
    local = tmp_path / "out"
    store.commit(fake_checkpoint(local, 5), epoch=1)
    store.wait()
    stored = artifact_file(tracker, run_id, "checkpoints/checkpoint-5/model.safetensors")
    assert os.path.samefile(stored, local / "checkpoint-5" / "model.safetensors")  # linked, not copied
    shutil.rmtree(local)
    assert store.restore(tmp_path / "restore").name == "checkpoint-5"


def test_upload_error_is_raised_by_the_next_call(unit, tmp_path, monkeypatch, caplog):
    tracker, run_id, store = unit

    tried = threading.Event()

    def unreachable(*args, **kwargs):
        tried.set()
        raise ConnectionError("artifact store unreachable")

    monkeypatch.setattr(tracker, "upload", unreachable)
    store.commit(fake_checkpoint(tmp_path / "out", 5), epoch=1)
    with pytest.raises(ConnectionError, match="unreachable"):
        store.wait()
    store.wait()  # raised once
    store.commit(fake_checkpoint(tmp_path / "out", 10), epoch=2)
    with pytest.raises(ConnectionError, match="unreachable"):  # the next commit raises it too
        store.commit(fake_checkpoint(tmp_path / "out", 15), epoch=3)
    tried.clear()
    store.commit(fake_checkpoint(tmp_path / "out", 20), epoch=4)
    assert tried.wait(timeout=30)  # its upload has failed (or is failing): cancelling cannot pre-empt it
    store.cancel()  # training already failed: logged, not raised over that error
    assert "checkpoint upload of run" in caplog.text and "unreachable" in caplog.text
    assert "checkpoint" not in tracker.get_run(run_id).data.tags


def test_guard_stops_the_upload_before_its_manifest(unit, tmp_path):
    tracker, run_id, _ = unit

    def lease_lost():
        raise RuntimeError("lease taken over")

    store = CheckpointStore(tracker, run_id, "fp1", guard=lease_lost)
    store.commit(fake_checkpoint(tmp_path / "out", 5), epoch=1)
    with pytest.raises(RuntimeError, match="lease taken over"):
        store.wait()
    assert "checkpoint" not in tracker.get_run(run_id).data.tags
    assert not artifact_file(tracker, run_id, "checkpoints/checkpoint-5/manifest.json").exists()
    assert CheckpointStore(tracker, run_id, "fp1").restore(tmp_path / "restore") is None


class Interrupted(BaseException):
    """What SIGTERM raises in the main thread of a stage (pipelines.tracking.Interrupted)."""


class CommitsThenReturns:
    """A Trainer whose ``train`` saves one checkpoint (the UploadCheckpoints callback's commit) and returns."""

    def __init__(self, store: CheckpointStore, folder: Path):
        self.store, self.folder = store, folder

    def train(self, resume_from_checkpoint=None):
        self.store.commit(fake_checkpoint(self.folder, 5), epoch=1)


def test_training_returns_only_once_the_last_upload_is_committed(unit, tmp_path, monkeypatch):
    tracker, run_id, store = unit
    uploads = GatedUploads(tracker, monkeypatch)
    threading.Timer(1.0, uploads.gate.set).start()
    _train(CommitsThenReturns(store, tmp_path / "out"), store, None)
    assert uploads.calls[-1] == "checkpoints/checkpoint-5/manifest.json"
    assert tracker.get_run(run_id).data.tags["checkpoint"] == "checkpoints/checkpoint-5"


def test_a_signal_while_waiting_for_the_upload_stops_it_before_the_next_file(unit, tmp_path, monkeypatch):
    tracker, run_id, store = unit
    uploads = GatedUploads(tracker, monkeypatch)

    def interrupt(signum, frame):
        threading.Timer(0.5, uploads.gate.set).start()  # the file in flight finishes after the interrupt
        raise Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)  # a real signal, while _train waits for the upload at the gate
    try:
        with pytest.raises(Interrupted):
            _train(CommitsThenReturns(store, tmp_path / "out"), store, None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # _train returned after the upload thread stopped: the file in flight, nothing after it, no manifest
    assert uploads.calls == ["checkpoints/checkpoint-5/model.safetensors"]
    assert not [t for t in threading.enumerate() if t.name.startswith("upload-")]
    assert "checkpoint" not in tracker.get_run(run_id).data.tags
    assert store.restore(tmp_path / "restore") is None


def test_a_failed_hard_link_falls_back_to_copies(unit, tmp_path, monkeypatch):
    tracker, run_id, store = unit
    real_link, tries = os.link, []

    def link_once_then_cross_device(src, dst):
        tries.append(src)
        if len(tries) > 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_once_then_cross_device)
    local = tmp_path / "out"
    store.commit(fake_checkpoint(local, 5), epoch=1)
    store.wait()
    stored = artifact_file(tracker, run_id, "checkpoints/checkpoint-5/model.safetensors")
    assert stored.read_bytes() == (local / "checkpoint-5" / "model.safetensors").read_bytes()
    assert not os.path.samefile(stored, local / "checkpoint-5" / "model.safetensors")  # copied
    assert not list(stored.parent.glob(".artifact.uploading.*"))
    assert store.restore(tmp_path / "restore").name == "checkpoint-5"
