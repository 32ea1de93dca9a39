"""Checkpoints of one unit's run: upload with a digest manifest, verify, restore, prune.

A Trainer checkpoint folder ``checkpoint-<step>`` is uploaded to ``checkpoints/checkpoint-<step>/``
of the unit's run, its files first and ``manifest.json`` (sha256 of every file, step, fingerprint)
last, so a copy without a manifest, or whose files do not match it, is torn and never used.  The
manifest also records ``lease_epoch``, the fencing token of the unit's lease (pipelines/leases.py): each
file, the manifest and the pruning are written only after that lease is renewed under its epoch, so a
worker whose unit was taken over commits nothing after the takeover.  The run's ``checkpoint`` tag names
the latest verified copy.  Only the latest and the best copies
are kept; all are deleted once the unit has finished and its final model is logged.

Uploads run in a background thread while training goes on, one at a time: a commit waits for the
previous upload to be committed, and ``wait`` (before a unit is marked done) for the last one.  The
thread uploads hard links to the checkpoint's files (the Trainer may delete the folder meanwhile),
and a local artifact store receives hard links too, not copies.  A kill during an upload leaves the
previous verified copy the one a resume uses; so does a failed or interrupted training, which stops
the upload in flight before its next file (``cancel``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipelines import faults
from pipelines.tracking import Tracker

logger = logging.getLogger(__name__)

ROOT = "checkpoints"
MANIFEST = "manifest.json"
TAG = "checkpoint"
EPOCH_TAG = "checkpoint_epoch"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)


def _step(name: str) -> int:
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


class UploadCancelled(Exception):
    """The training thread stopped a background upload: training failed or was interrupted."""


class _Upload:
    """One upload in a daemon thread, with events that a signal raising in the waiting thread cannot leave
    half-set (``Thread.join`` can return early after an interrupted join)."""

    def __init__(self, work: Callable[[Callable[[], None]], None], name: str):
        self.done, self.cancelled = threading.Event(), threading.Event()
        self.failure: BaseException | None = None
        thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        thread.start()
        faults.settle_before_kill(thread)

    def _run(self, work: Callable[[Callable[[], None]], None]) -> None:
        try:
            work(self.check)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait() or cancel()
            self.failure = exc
        finally:
            self.done.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise UploadCancelled("the upload was stopped before it committed")


class CheckpointStore:
    """The checkpoints of one unit run in the artifact store.

    ``guard`` is called in the upload thread before each file, the manifest and the pruning (the unit's
    :meth:`~pipelines.leases.Lease.fence`: a worker that lost its unit must not write into the new owner's run);
    it raises to stop the upload, and returns the fencing token (the lease's epoch) the manifest records.
    """

    def __init__(self, tracker: Tracker, run_id: str, fingerprint: str,
                 guard: Callable[[], int | None] | None = None):
        self.tracker, self.run_id, self.fingerprint = tracker, run_id, fingerprint
        self.guard: Callable[[], int | None] = guard or (lambda: None)
        self._upload: _Upload | None = None

    def commit(self, local_dir: Path, epoch: float, best_dir: str | None = None) -> None:
        """Start uploading ``local_dir`` (a Trainer checkpoint), then pruning all but it and ``best_dir``, in the
        background, once the previous upload is committed. An upload's error is raised by the next call."""
        self.wait()
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=local_dir.parent))
        snapshot = staging / local_dir.name
        try:
            shutil.copytree(local_dir, snapshot, copy_function=_link_or_copy)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._upload = _Upload(lambda check: self._commit(snapshot, epoch, best_dir, check), f"upload-{snapshot.name}")

    def wait(self) -> None:
        """Return once the upload in flight, if any, is committed; raise its error."""
        upload = self._upload
        if upload is None:
            return
        upload.done.wait()
        self._upload = None
        if upload.failure is not None:
            raise upload.failure

    def cancel(self) -> None:
        """Stop the upload in flight before its next file (training failed or was interrupted) and wait for that:
        the previous verified copy stays the one a resume uses. Its own error, if any, is logged."""
        upload, self._upload = self._upload, None
        if upload is None:
            return
        upload.cancelled.set()
        upload.done.wait()
        if upload.failure is not None and not isinstance(upload.failure, UploadCancelled):
            logger.warning("checkpoint upload of run %s failed too: %r", self.run_id, upload.failure)

    def _commit(self, local_dir: Path, epoch: float, best_dir: str | None, check: Callable[[], None]) -> None:
        """Upload the snapshot ``local_dir``, manifest last; tag it; prune; remove the snapshot."""
        def go_on() -> int | None:
            check()
            return self.guard()

        try:
            started = time.perf_counter()
            files = sorted(p for p in local_dir.rglob("*") if p.is_file())
            manifest = {
                "step": _step(local_dir.name),
                "fingerprint": self.fingerprint,
                "files": {str(p.relative_to(local_dir)): _sha256(p) for p in files},
            }
            target = f"{ROOT}/{local_dir.name}"
            for i, path in enumerate(files):
                go_on()
                self.tracker.upload(self.run_id, path, str(Path(target, path.relative_to(local_dir).parent)),
                                    link=True)
                if i == 0:
                    faults.failpoint("checkpoint_upload")
            manifest["lease_epoch"] = go_on()
            with tempfile.TemporaryDirectory() as tmp:
                manifest_path = Path(tmp, MANIFEST)
                manifest_path.write_text(json.dumps(manifest, indent=1))
                self.tracker.upload(self.run_id, manifest_path, target)  # last: it marks the copy complete
        finally:
            shutil.rmtree(local_dir.parent, ignore_errors=True)
        self.tracker.set_tags(self.run_id, {TAG: target, EPOCH_TAG: f"{epoch:g}"})
        logger.info("checkpoint uploaded run=%s path=%s files=%d seconds=%.2f", self.run_id, target, len(files),
                    time.perf_counter() - started)
        keep = {local_dir.name, Path(best_dir).name if best_dir else None}
        go_on()
        for name in self._names():
            if name not in keep:
                self.tracker.delete_artifacts(self.run_id, f"{ROOT}/{name}")
        faults.failpoint("checkpoint_committed")

    def restore(self, dst: Path) -> Path | None:
        """Download the newest verified checkpoint (and the best one it refers to) into ``dst``."""
        names = sorted(self._names(), key=_step, reverse=True)
        for name in names:
            local = self._fetch(name, dst)
            if local is None:
                continue
            self._restore_best(local, dst)
            return local
        if names:
            logger.warning("no usable checkpoint among %s for run %s: the unit starts over", names, self.run_id)
        return None

    def clear(self) -> None:
        """Delete every checkpoint of the run (the unit has finished)."""
        if self._names():
            self.tracker.delete_artifacts(self.run_id, ROOT)
        for tag in (TAG, EPOCH_TAG):
            self.tracker.delete_tag(self.run_id, tag)

    def _names(self) -> list[str]:
        return [Path(p).name for p in self.tracker.list_artifacts(self.run_id, ROOT)]

    def _fetch(self, name: str, dst: Path) -> Path | None:
        shutil.rmtree(dst / name, ignore_errors=True)
        try:
            local = self.tracker.download(self.run_id, f"{ROOT}/{name}", dst)
        except Exception as exc:  # noqa: BLE001 - any failure to fetch means the copy is unusable
            logger.warning("checkpoint %s of run %s could not be downloaded (%s); trying an older one", name,
                           self.run_id, exc)
            return None
        problem = verify(local, self.fingerprint)
        if problem:
            logger.warning("checkpoint %s of run %s is unusable (%s); trying an older one", name, self.run_id, problem)
            shutil.rmtree(local, ignore_errors=True)
            return None
        (local / MANIFEST).unlink()
        return local

    def _restore_best(self, latest: Path, dst: Path) -> None:
        """Point trainer_state.json's best checkpoint at a local, verified copy (or drop it)."""
        state_path = latest / "trainer_state.json"
        state = json.loads(state_path.read_text())
        best = state.get("best_model_checkpoint")
        if not best:
            return
        best_name = Path(best).name
        local_best = latest if best_name == latest.name else self._fetch(best_name, dst)
        if local_best is None:
            logger.warning("best checkpoint %s of run %s is unusable; the final model will be the last one",
                           best_name, self.run_id)
        state["best_model_checkpoint"] = str(local_best) if local_best else None
        state_path.write_text(json.dumps(state, indent=2, sort_keys=True))


def verify(local: Path, fingerprint: str) -> str | None:
    manifest_path = local / MANIFEST
    if not manifest_path.is_file():
        return "no manifest: the upload did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"its manifest does not parse ({exc})"
    if manifest.get("fingerprint") != fingerprint:
        return f"it belongs to settings {manifest.get('fingerprint')}, not {fingerprint}"
    for rel, digest in files.items():
        path = local / rel
        if not path.is_file():
            return f"{rel} is missing"
        if _sha256(path) != digest:
            return f"{rel} does not match its digest"
    return None
