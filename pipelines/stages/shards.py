"""The one shard mechanism of the batch stages (`predict`, `llm`, `augment`, `correct`, `validate`).

A stage's items (rows with a ``row_id``) are split into shards of ``size`` rows. Shard ``i`` is a unit:
done under its lease (so several workers can share a stage), its output logged as
``shards/shard-<i>.csv`` followed by ``shards/shard-<i>.json`` (row ids, the CSV's sha256 and the epoch of
the shard's lease, its fencing token: pipelines/leases.py). The manifest
comes last, so a shard is done only once it exists and the CSV matches it: a copy torn by a kill is done
again. A resumed run skips the done shards; the outputs are assembled in shard order, so the result is the
same as an uninterrupted run's wherever the work itself is deterministic. Progress is logged to the parent
run as metrics ``items_done`` (at step = items done) and ``items_total``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipelines import faults
from pipelines.data import DataError, read_artifact_csv
from pipelines.leases import Lease
from pipelines.stages.common import share_units, upload_frame
from pipelines.stages.contract import StageContext

logger = logging.getLogger(__name__)

FOLDER = "shards"
ERROR, FAILURES = "error", "failures.csv"  # why a row's work failed ("" when it did not); the list of such rows
Work = Callable[[pd.DataFrame], pd.DataFrame]  # a shard's items -> its output rows (any number, any columns)


class Shards:
    """The shards of ``items`` in the parent run of ``ctx``.

    A shard's output may list failed rows (:func:`failures`); with ``retry_failed`` a done shard that has any
    is done again (the LLM ledger answers what was answered: only the failures are sent again). ``read`` parses
    a shard's CSV (default: ``read_artifact_csv``, every cell verbatim text).
    """

    def __init__(self, ctx: StageContext, items: pd.DataFrame, size: int, tmp: Path, retry_failed: bool = False,
                 read: Callable[[Path], pd.DataFrame] = read_artifact_csv):
        self.ctx, self.items, self.size, self.tmp = ctx, items.reset_index(drop=True), size, tmp
        self.retry_failed, self.read = retry_failed, read
        self.running: Callable[[pd.DataFrame], dict[str, float]] | None = None
        self.last_step = -1
        self.starts = range(0, len(items), size)
        self.outputs: dict[int, pd.DataFrame] = {}
        listed = self._listed()
        self.done = {i for i in range(len(self)) if self._verified(i, listed)}

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, i: int) -> pd.DataFrame:
        return self.items.iloc[self.starts[i]:self.starts[i] + self.size].reset_index(drop=True)

    def run(self, work: Work, running: Callable[[pd.DataFrame], dict[str, float]] | None = None) -> pd.DataFrame:
        """Do every shard not yet done (sharing them with other workers) and return all outputs in order.

        ``running(outputs so far)``: metrics logged with ``items_done`` after each shard (e.g. a running mean).
        """
        self.running = running
        tracker, run_id = self.ctx.tracker, self.ctx.parent_id
        if self.ctx.resumed:
            logger.info("resuming %s run %s: %d/%d shards done", self.ctx.stage, run_id, len(self.done), len(self))
        if not len(self.items):
            raise DataError(f"{self.ctx.stage}: no items to work on (is the data file empty?)")
        logged = tracker.logged_steps(run_id)
        self.last_step = logged.get("items_done", -1)  # a resumed run never logs a step twice
        if "items_total" not in logged:
            tracker.log_metrics(run_id, {"items_total": len(self.items)})
        self._progress()
        share_units(self.ctx, len(self), lambda i: self._attempt(i, work), "shards")
        return pd.concat([self._output(i) for i in range(len(self))], ignore_index=True)

    def _attempt(self, i: int, work: Work) -> bool | None:
        """True once shard ``i`` is done (by this worker now, or before); None while another worker holds it."""
        if i in self.done:
            return True
        lease = self.ctx.leases.acquire(self.ctx.parent_id, f"shard-{i}")
        if lease is None:
            return None
        with lease:
            if not self._verified(i, self._listed()):  # another worker may have finished it meanwhile
                output = work(self.rows(i))
                self._commit(i, output, lease)
                faults.failpoint(f"{self.ctx.stage}_shard")
                logger.info("%s shard %d/%d done by this worker (%d items)", self.ctx.stage, i + 1, len(self),
                            len(self.rows(i)))
        self.done.add(i)
        self._progress()
        return True

    def _commit(self, i: int, output: pd.DataFrame, lease: Lease) -> None:
        """The shard's CSV, then its manifest: the shard counts as done only once both are there and agree. Each
        is written only after the shard's lease is renewed under its epoch (recorded as ``lease_epoch``): a
        worker whose shard was taken over commits nothing."""
        tracker, run_id = self.ctx.tracker, self.ctx.parent_id
        with tempfile.TemporaryDirectory() as tmp:
            csv, manifest = Path(tmp, self._name(i, "csv")), Path(tmp, self._name(i, "json"))
            output.to_csv(csv, index=False)
            lease.fence()
            tracker.upload(run_id, csv, FOLDER)
            meta = {"rows": self._ids(i), "sha256": _sha256(csv), "lease_epoch": lease.fence()}
            manifest.write_text(json.dumps(meta))
            tracker.upload(run_id, manifest, FOLDER)
            self.outputs[i] = self.read(csv)  # as a restored shard reads it: the same result either way

    def _verified(self, i: int, listed: set[str]) -> bool:
        """Whether shard ``i`` is logged whole, for its rows, and accepted; its output is kept if so."""
        csv, manifest = self._name(i, "csv"), self._name(i, "json")
        if csv not in listed or manifest not in listed:
            return False
        tracker, run_id = self.ctx.tracker, self.ctx.parent_id
        try:
            meta = json.loads(tracker.download(run_id, f"{FOLDER}/{manifest}", self.tmp).read_text())
            local = tracker.download(run_id, f"{FOLDER}/{csv}", self.tmp)
            whole = meta["rows"] == self._ids(i) and meta["sha256"] == _sha256(local)
        except (OSError, ValueError, KeyError):
            whole = False
        if not whole:
            logger.warning("shard %s of run %s is incomplete or for other rows: it is done again", csv, run_id)
            return False
        output = self.read(local)
        if self.retry_failed and len(failed := failures(output)):
            logger.info("shard %s of run %s is done again for its %d failed rows (retry_failed=true)", csv, run_id,
                        len(failed))
            return False
        self.outputs[i] = output
        return True

    def _output(self, i: int) -> pd.DataFrame:
        if i not in self.outputs and not self._verified(i, self._listed()):  # done by another worker, or not
            raise RuntimeError(f"shard {i} of run {self.ctx.parent_id} was reported done but does not verify")
        return self.outputs[i]

    def _progress(self) -> None:
        done = sum(len(self.rows(i)) for i in self.done)
        outputs = [self.outputs[i] for i in sorted(self.done) if i in self.outputs]
        if done <= self.last_step:
            return
        metrics = self.running(pd.concat(outputs, ignore_index=True)) if self.running and outputs else {}
        self.ctx.tracker.log_metrics(self.ctx.parent_id, {"items_done": done, **metrics}, step=done)
        self.last_step = done

    def _ids(self, i: int) -> list[int]:
        return [int(x) for x in self.rows(i)["row_id"]]

    def _listed(self) -> set[str]:
        return {Path(p).name for p in self.ctx.tracker.list_artifacts(self.ctx.parent_id, FOLDER)}

    @staticmethod
    def _name(i: int, suffix: str) -> str:
        return f"shard-{i:05d}.{suffix}"


def failures(output: pd.DataFrame, row_id: str = "row_id") -> pd.DataFrame:
    """The rows of a shard's or stage's output whose work finally failed (a non-empty ``error`` column), as
    ``failures.csv`` lists them: ``row_id`` (the row of ``data``; taken from column ``row_id``) and ``error``
    first. An output without an ``error`` column has none."""
    if ERROR not in output.columns:
        return pd.DataFrame(columns=["row_id", ERROR])
    failed = output[output[ERROR].fillna("") != ""].rename(columns={row_id: "row_id"})
    first = [c for c in ("row_id", ERROR) if c in failed.columns]
    return failed[first + [c for c in failed.columns if c not in first]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finish(ctx: StageContext, artifacts: dict[str, pd.DataFrame], metrics: dict[str, float]) -> None:
    """Log a batch stage's assembled outputs and summary metrics, and end its parent run: once, however many
    workers end together."""
    with ctx.leases.wait_for(ctx.parent_id, "finish"):
        for name, frame in artifacts.items():
            upload_frame(ctx.tracker, ctx.parent_id, name, frame)
        latest = ctx.tracker.metrics(ctx.parent_id)  # a resume that changed nothing logs nothing again
        changed = {k: v for k, v in metrics.items() if latest.get(k) != float(v)}
        steps = ctx.tracker.logged_steps(ctx.parent_id)
        step = max([int(latest.get("items_total", 0)), *(steps[k] + 1 for k in changed if k in steps)])
        ctx.tracker.log_metrics(ctx.parent_id, changed, step=step)  # at the last step: what the UI shows
        ctx.tracker.finish(ctx.parent_id)
