"""``pipelines``: manage the stage runs of a tracking store (MLFLOW_TRACKING_URI, or the embedded default).

    pipelines runs [--experiment E] [--stage S] [--status S]       one line per stage (parent) run, with progress
    pipelines compare RUN_OR_EXPERIMENT... [--csv F] [--html F]    the params that differ (and where they came
                                                                    from), main metrics side by side
    pipelines cleanup [--experiment E] [--older-than 7d] [--keep-best K --metric M] [--checkpoints-only] [--dry-run]
    pipelines archive RUN_ID --to FILE.tar.gz [--with-checkpoints]  a run with its child runs, to one file
    pipelines restore FILE.tar.gz [--experiment NAME]              ... recreated in the current store

Every mlflow call goes through pipelines/tracking_admin.py (the tracking layer); this module only decides and
formats. A bad run id, experiment or file ends with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import re
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import pandas as pd

from pipelines.checkpoints import EPOCH_TAG
from pipelines.checkpoints import ROOT as CHECKPOINTS
from pipelines.checkpoints import TAG as CHECKPOINT_TAG
from pipelines.errors import ConfigError, NotFound, UserError
from pipelines.leases import TABLE as LEASE_TABLE
from pipelines.leases import LeaseStore, make_engine, owner_alive
from pipelines.tasks import task_settings
from pipelines.tracking import WORKER_TAG, state_storage
from pipelines.tracking_admin import AdminStore, RunRecord

logger = logging.getLogger("pipelines.manage")

ACTIVE = ("RUNNING", "SCHEDULED")
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
DEFAULT_GRACE = 30.0  # seconds; a stage run records its own grace_period param
UNITS = {"kfold": ("fold", "k_folds"), "optuna": ("trial", "n_trials")}  # stage -> child unit tag, total param
SINGLE_UNIT = ("train", "retrain", "tapt")  # the parent run is the one unit: progress in epochs
SHARDS = "shards"  # pipelines/stages/shards.py: shards/shard-<i>.json marks shard i done
NOT_COMPARED = ("fingerprint",)  # a hash of the differing settings, which are listed themselves
CONFIG_ARTIFACT = "config.json"  # a stage run's resolved settings and their `settings_source` (stages/contract.py)
SUMMARY_METRIC = re.compile(r"^(cv_.+_(mean|std)|best_value|ensemble_.+|final_.+)$")
LOWER_IS_BETTER = ("loss", "perplexity", "error", "cost", "latency", "failures", "_std")
RESTORED_TAG = "restored_from_run_id"
LINEAGE = (("tag", "init_from"), ("tag", "model_source_run_id"), ("tag", "params_source"), ("param", "model"),
           ("param", "init_from"))  # where a run names the run it was initialised from (its weights, its params)
RUN_REFERENCE = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:/|$)")
ARCHIVE_FORMAT = "pipelines-archive/1"
ARCHIVE_INDEX = "archive.json"


# ====================================================================== runs, trees, liveness


class Tree:
    """Runs by id with their parent/child links; parents outside the loaded runs are fetched when asked for."""

    def __init__(self, runs: Iterable[RunRecord], fetch: Callable[[str], RunRecord] | None = None):
        self.by_id = {run.run_id: run for run in runs}
        self.fetch = fetch
        self.children: dict[str, list[RunRecord]] = defaultdict(list)
        for run in self.by_id.values():
            if run.parent_id:
                self.children[run.parent_id].append(run)

    def parent(self, run: RunRecord) -> RunRecord | None:
        if not run.parent_id:
            return None
        if run.parent_id not in self.by_id and self.fetch is not None:
            try:
                self.by_id[run.parent_id] = self.fetch(run.parent_id)
            except NotFound:
                return None
        return self.by_id.get(run.parent_id)

    def ancestors(self, run: RunRecord) -> list[RunRecord]:
        chain, seen = [], {run.run_id}
        parent = self.parent(run)
        while parent is not None and parent.run_id not in seen:
            chain.append(parent)
            seen.add(parent.run_id)
            parent = self.parent(parent)
        return chain

    def descendants(self, run: RunRecord) -> list[RunRecord]:
        """Children, grandchildren, ... in breadth-first order (parents before their children)."""
        found, queue = [], list(self.children.get(run.run_id, []))
        while queue:
            child = queue.pop(0)
            if child.run_id != run.run_id and child not in found:
                found.append(child)
                queue += self.children.get(child.run_id, [])
        return found


class Liveness:
    """Whether a live worker may be on a run: its own or an ancestor's status is RUNNING and a lease in the
    scope of one of them (worker, fold, shard leases: pipelines/leases.py) has a live owner.

    Lease databases are opened read-only in effect: a missing SQLite file or lease table means no leases.
    """

    def __init__(self, tree: Tree, storage: str = ""):
        self.tree, self.storage = tree, storage
        self._stores: dict[str, LeaseStore | None] = {}

    def holder(self, run: RunRecord) -> str:
        """Why ``run`` must be left alone; '' when nothing can be working on it (finished or abandoned)."""
        chain = [run, *self.tree.ancestors(run)]
        running = [r for r in chain if r.status in ACTIVE]
        if not running:
            return ""
        grace = float(chain[-1].params.get("grace_period", DEFAULT_GRACE))
        if any(time.time() - r.start_ms / 1000 < grace for r in running):
            return f"started less than {grace:g}s ago"
        url = self._url(chain[-1])
        if not url:
            return ("its leases cannot be checked: pass --optuna-storage with the database its workers use "
                    f"(tag optuna_storage={chain[-1].tags.get('optuna_storage', '?')})")
        scopes = {r.run_id for r in chain} | {r.parent_id for r in chain if r.parent_id}
        try:
            owners = [owner for scope in sorted(scopes) for owner in self._live(url, scope, grace)]
        except Exception as exc:  # noqa: BLE001 - an unreachable lease database: assume someone is on it
            return f"its leases cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        if owners:
            return f"live lease held by {owners[0]}"
        worker = run.tags.get(WORKER_TAG, "")
        return f"its process {worker} is alive" if worker and owner_alive(worker) else ""

    def _url(self, root: RunRecord) -> str:
        """The lease database of a stage run: its ``optuna_storage`` tag (password removed: then --optuna-storage),
        or the default beside an SQLite tracking store."""
        from pipelines.settings import redact

        tag = root.tags.get("optuna_storage", "")
        if self.storage and (not tag or redact(self.storage) == tag):
            return self.storage
        if tag and "***" not in tag:
            return tag
        return "" if tag else _default_storage()

    def _live(self, url: str, scope: str, grace: float) -> list[str]:
        store = self._store(url)
        if store is None:
            return []
        # each row by its own grace period and the database's clock; ``grace`` only for rows of an older version
        return [info.owner for info in store.holders(scope, legacy_grace=grace) if info.alive]

    def _store(self, url: str) -> LeaseStore | None:
        if url not in self._stores:
            self._stores[url] = _open_leases(url)
        return self._stores[url]

    def close(self) -> None:
        for store in self._stores.values():
            if store is not None:
                store.engine.dispose()


def _open_leases(url: str) -> LeaseStore | None:
    """The lease table at ``url``, or None where there is none (never creating a file or table).

    A missing SQLite file is no leases only where it is the default beside this machine's SQLite tracking
    store; any other may be on the machine the workers run on (FileNotFoundError: cannot tell).
    """
    from sqlalchemy import inspect

    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    if path is not None and not path.is_file():
        if url == _default_storage():
            return None
        raise FileNotFoundError(f"lease database {path} is not on this machine")
    engine = make_engine(url)
    try:
        if not inspect(engine).has_table(LEASE_TABLE):
            return None
    finally:
        engine.dispose()
    return LeaseStore(url, heartbeat_interval=1.0, grace_period=2.0)  # liveness is judged by the caller


def _default_storage() -> str:
    try:
        return state_storage("")
    except ConfigError:  # not an SQLite tracking store: no default
        return ""


def _scope(store: AdminStore, experiment: str | None) -> list[RunRecord]:
    ids = [store.experiment_id(experiment)] if experiment else list(store.experiments())
    return store.runs(ids)


# ====================================================================== formatting


def main_metric(run: RunRecord) -> tuple[str, float] | None:
    """The metric that sums a stage run up: the CV mean, the search's best value, the unit's final metric, ..."""
    name = run.params.get("metric", "")
    candidates = [f"cv_{name}_mean", "best_value", f"ensemble_{name}", f"final_{name}", name, "eval_loss",
                  "rouge_mean", "f1_macro", "accuracy", "failures", "changed", "rows_new", "items_done"]
    for key in candidates:
        if key and key in run.metrics:
            return key, run.metrics[key]
    return None


def render(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers, *rows])


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size}{unit}{(seconds % size) // sub_size:02d}{sub}"
    return f"{seconds}s"


def started(run: RunRecord) -> str:
    return datetime.fromtimestamp(run.start_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``1d12h``, ``30m``, ``90s`` -> seconds."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or match is None:
        raise ConfigError(f"--older-than {text!r} is not a duration: write e.g. 7d, 12h, 1d12h, 30m or 90s")
    return sum(float(v or 0) * s for v, s in zip(match.groups(), (86400, 3600, 60, 1)))


# ====================================================================== runs


def progress(run: RunRecord, tree: Tree, store: AdminStore) -> str:
    """Units done / total: ``fold 3/5``, ``trial 11/20``, ``shard 14/30``, ``epoch 2/3``; '-' for no units."""
    if run.stage in UNITS:
        unit, total_param = UNITS[run.stage]
        units: dict[str, RunRecord] = {}
        for child in tree.children.get(run.run_id, []):
            key = child.tags.get(unit)
            if key is not None and (key not in units or units[key].status != "FINISHED"):
                units[key] = child
        done = sum(child.status == "FINISHED" for child in units.values())
        total = max(int(float(run.params.get(total_param, 0))), done)  # an extended search outgrows its param
        unfinished = len(units) - done
        return f"{unit} {done}/{total}" + (f" ({unfinished} unfinished)" if unfinished else "")
    if "shard_size" in run.params:
        return _shard_progress(run, store)
    if run.stage in SINGLE_UNIT and "epochs" in run.params:
        done = run.metrics.get("final_epochs_trained", float(run.tags.get(EPOCH_TAG, 0) or 0))
        return f"epoch {done:g}/{int(float(run.params['epochs']))}"
    return "-"


def _shard_progress(run: RunRecord, store: AdminStore) -> str:
    if "items_total" not in run.metrics:
        return "shard 0/?"
    total = math.ceil(run.metrics["items_total"] / int(float(run.params["shard_size"])))
    if run.status == "FINISHED":
        return f"shard {total}/{total}"
    manifests = [f for f in store.files(run.run_id, SHARDS) if f.path.endswith(".json")]
    return f"shard {len(manifests)}/{total}"


def shown_status(run: RunRecord, liveness: Liveness) -> str:
    if run.status in ACTIVE and not liveness.holder(run):
        return f"{run.status} (abandoned)"
    return run.status


def cmd_runs(args: argparse.Namespace, store: AdminStore, out: TextIO) -> None:
    runs = _scope(store, args.experiment)
    tree = Tree(runs, store.run)
    liveness = Liveness(tree, args.optuna_storage)
    chosen = [r for r in runs if r.stage and (not args.stage or r.stage == args.stage)
              and (not args.status or r.status == args.status.upper())]
    rows = []
    try:
        for run in chosen:
            metric = main_metric(run)
            end = run.end_ms / 1000 if run.end_ms else time.time()
            rows.append([run.run_id, run.experiment, run.stage, shown_status(run, liveness),
                         progress(run, tree, store), f"{metric[0]}={metric[1]:.4g}" if metric else "-",
                         duration(end - run.start_ms / 1000), started(run)])
    finally:
        liveness.close()
    if not rows:
        print(f"no stage runs match in {store.uri}", file=out)
        return
    headers = ["RUN ID", "EXPERIMENT", "STAGE", "STATUS", "PROGRESS", "METRIC", "DURATION", "STARTED"]
    print(render(headers, rows), file=out)


# ====================================================================== compare


def resolve_runs(store: AdminStore, names: list[str]) -> list[RunRecord]:
    """Each name is a run id, or an experiment (name or id) standing for all its stage runs."""
    runs: list[RunRecord] = []
    for name in names:
        try:
            found = [store.run(name)]
        except NotFound:
            try:
                experiment_id = store.experiment_id(name)
            except NotFound:
                raise NotFound(f"{name!r} is neither a run id nor an experiment in {store.uri}; list them with "
                               "`pipelines runs`, or check MLFLOW_TRACKING_URI") from None
            found = [r for r in store.runs([experiment_id]) if r.stage]
            if not found:
                logger.warning("experiment %s has no stage runs", name)
        runs += [r for r in found if r.run_id not in {x.run_id for x in runs}]
    return runs


def compare_frame(runs: list[RunRecord], sources: dict[str, dict[str, str]] | None = None) -> pd.DataFrame:
    """One row per run: experiment, stage, status, the params whose values differ, where each of those (and any
    setting whose origin differs) came from (``source.<name>``: default, config_file, variant, params_from,
    explicit; from ``sources``, run id -> ``settings_source``), the main metrics."""
    sources = sources or {}
    params = sorted({k for r in runs for k in r.params} - set(NOT_COMPARED))
    differing = [k for k in params if len({r.params.get(k) for r in runs}) > 1]
    origins = sorted({k for s in sources.values() for k in s})
    traced = [k for k in origins if k in differing or len({sources.get(r.run_id, {}).get(k) for r in runs}) > 1]
    mains = [m[0] for m in map(main_metric, runs) if m]
    metrics = list(dict.fromkeys([*mains, *sorted({k for r in runs for k in r.metrics if SUMMARY_METRIC.match(k)})]))
    rows = {r.run_id: {"experiment": r.experiment, "stage": r.stage or "-", "status": r.status,
                       **{f"params.{k}": r.params.get(k) for k in differing},
                       **{f"source.{k}": sources.get(r.run_id, {}).get(k) for k in traced},
                       **{f"metrics.{k}": r.metrics.get(k) for k in metrics}} for r in runs}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("run_id")


def settings_sources(store: AdminStore, runs: list[RunRecord]) -> dict[str, dict[str, str]]:
    """Run id -> where each of its settings came from (``settings_source`` of its ``config.json``), for the stage
    runs that recorded it (runs of older versions did not: they have none)."""
    found = {}
    with tempfile.TemporaryDirectory(prefix="pipelines-compare-") as tmp:
        for run in runs:
            if run.stage and CONFIG_ARTIFACT in store.top_level(run.run_id):
                store.download(run.run_id, CONFIG_ARTIFACT, Path(tmp, run.run_id))
                record = json.loads(Path(tmp, run.run_id, CONFIG_ARTIFACT).read_text(encoding="utf-8"))
                found[run.run_id] = record.get("settings_source", {})
    return found


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def writable(path: str | Path, option: str) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise NotFound(f"{option} {path}: folder {path.parent} does not exist; create it or pick another path")
    return path


def cmd_compare(args: argparse.Namespace, store: AdminStore, out: TextIO) -> None:
    for path, option in ((args.csv, "--csv"), (args.html, "--html")):
        if path:
            writable(path, option)
    runs = resolve_runs(store, args.runs)
    if not runs:
        raise NotFound(f"nothing to compare: {', '.join(args.runs)} hold no stage runs")
    frame = compare_frame(runs, settings_sources(store, runs))
    shown = frame.map(_cell).T
    shown.columns = [run_id[:8] for run_id in frame.index]
    if not any(c.startswith("params.") for c in frame.columns):
        print("(all params are equal)" if len(runs) > 1 else "(one run: nothing differs)", file=out)
    print(shown.to_string(), file=out)
    if args.csv:
        frame.to_csv(args.csv)
        print(f"wrote {args.csv}", file=out)
    if args.html:
        write_html(frame, Path(args.html), f"pipelines compare: {len(runs)} runs in {store.uri}")
        print(f"wrote {args.html}", file=out)


def write_html(frame: pd.DataFrame, path: Path, title: str) -> None:
    """The table with fields down and runs across (full run ids), as a standalone page."""
    table = frame.map(_cell).T.to_html(na_rep="-", border=0)
    style = ("table{border-collapse:collapse;font-family:sans-serif}"
             "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}")
    path.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{table}\n</body></html>\n",
                    encoding="utf-8")


# ====================================================================== cleanup


@dataclass
class Step:
    """One line of the cleanup plan: delete a run's checkpoints, delete runs, or keep something, and why."""

    action: str
    run: RunRecord
    why: str
    run_ids: list[str] = field(default_factory=list)  # "delete runs": the stage run and its descendants
    files: int = 0
    bytes: int = 0


DELETE_CHECKPOINTS, DELETE_RUNS, KEEP = "delete checkpoints", "delete runs", "keep"


@dataclass
class Cleanup:
    """Everything a cleanup decides with: the runs in scope and what protects them."""

    store: AdminStore
    tree: Tree
    liveness: Liveness
    sources: dict[str, str]  # run id -> registered model version made from it
    older_than: float  # seconds; 0: any age
    lineage: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # run id -> (run using it, how)

    def protected(self, runs: list[RunRecord]) -> str:
        """Why none of ``runs`` (a stage run and its descendants) may be deleted; '' when they may."""
        family = {run.run_id for run in runs}
        for run in runs:
            if run.run_id in self.sources:
                return f"run {run.run_id} is the source of registered model {self.sources[run.run_id]}"
            users = [(user, how) for user, how in self.lineage.get(run.run_id, []) if user not in family]
            if users:
                more = f" (and {len(users) - 1} more runs)" if len(users) > 1 else ""
                return f"run {run.run_id} is where run {users[0][0]} started from ({users[0][1]}){more}"
        for run in runs:
            holder = self.liveness.holder(run)
            if holder:
                return f"run {run.run_id} is in use: {holder}"
        return self.too_new(runs)

    def too_new(self, runs: list[RunRecord]) -> str:
        last = max((r.end_ms or r.start_ms) / 1000 for r in runs)
        age = time.time() - last
        return f"last active {duration(age)} ago, newer than --older-than" if age < self.older_than else ""


def plan_deletions(cleanup: Cleanup, runs: list[RunRecord], metric: str, keep: int, direction: str) -> list[Step]:
    """The stage runs of each experiment beyond the best ``keep`` by ``metric`` (runs without it are kept)."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.stage and not run.parent_id and metric in run.metrics:
            groups[run.experiment_id].append(run)
    steps = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r.metrics[metric], reverse=not lower_is_better(metric, direction, group))
        for rank, run in enumerate(ranked[keep:], start=keep + 1):
            family = [run, *cleanup.tree.descendants(run)]
            label = f"{metric}={run.metrics[metric]:.4g}, rank {rank}/{len(ranked)}"
            why = cleanup.protected(family)
            if why:
                steps.append(Step(KEEP, run, f"{label}: {why}"))
                continue
            files = [f for r in family for f in cleanup.store.files(r.run_id)]
            steps.append(Step(DELETE_RUNS, run, f"{label}, with {len(family) - 1} child runs",
                              [r.run_id for r in family], len(files), sum(f.size for f in files)))
    return steps


def lower_is_better(metric: str, direction: str, group: list[RunRecord]) -> bool:
    """``--direction`` for ranking ``group`` by ``metric``; ``auto``: for ``best_value``, the direction the searches
    recorded (refused where they differ), else lower for losses, errors, costs."""
    if direction != "auto":
        return direction == "min"
    if metric != "best_value":
        return any(s in metric for s in LOWER_IS_BETTER)
    directions = {run.run_id: search_direction(run) for run in group}
    if len(set(directions.values())) > 1:
        listed = ", ".join(f"{run_id} {way}s" for run_id, way in directions.items())
        raise ConfigError(f"--metric best_value --direction auto: the searches of experiment {group[0].experiment} "
                          f"optimize in different directions ({listed}); their best values cannot be ranked together: "
                          "clean them with --direction max or min if you mean it, or rank by another metric")
    return next(iter(directions.values())) == "minimize"


def search_direction(run: RunRecord) -> str:
    """``maximize`` or ``minimize``: the direction an optuna run recorded (its ``direction``, or its ``metric``'s
    own for ``auto``)."""
    params = run.params
    if params.get("direction") in ("maximize", "minimize"):
        return params["direction"]
    try:  # older runs record no task: classification
        metrics = task_settings(params.get("task", "classification")).metrics(SimpleNamespace(**params))
    except (ConfigError, AttributeError):  # an unknown task, or a task whose metrics need settings not recorded
        metrics = {}
    greater = metrics.get(params.get("metric", ""))
    if greater is None:
        raise ConfigError(f"--direction auto: run {run.run_id} records no direction, task and metric to rank its "
                          f"best_value by (direction={params.get('direction')!r}, task={params.get('task')!r}, "
                          f"metric={params.get('metric')!r}); pass --direction max or min")
    return "maximize" if greater else "minimize"


def lineage(runs: Iterable[RunRecord]) -> dict[str, list[tuple[str, str]]]:
    """Run id -> (run, how) for each run that names it as where it started from (``LINEAGE``: a run id or
    ``runs:/<run id>/...``): deleting it would break that run's lineage, and its resumes that fetch it again."""
    used: dict[str, dict[str, str]] = defaultdict(dict)
    for run in runs:
        for kind, key in LINEAGE:
            match = RUN_REFERENCE.match((run.tags if kind == "tag" else run.params).get(key, ""))
            if match and match.group(1) != run.run_id:
                used[match.group(1)].setdefault(run.run_id, f"{kind} {key}")
    return {run_id: list(users.items()) for run_id, users in used.items()}


def plan_checkpoints(cleanup: Cleanup, runs: list[RunRecord]) -> list[Step]:
    """Leftover ``checkpoints/`` of runs nothing works on any more (finished, failed, killed, abandoned)."""
    steps = []
    for run in runs:
        if CHECKPOINTS not in cleanup.store.top_level(run.run_id):
            continue
        files = cleanup.store.files(run.run_id, CHECKPOINTS)
        kind = f"{run.stage} run" if run.stage else f"{run.name or 'child'} of {run.parent_id[:8]}"
        holder = cleanup.liveness.holder(run) or cleanup.too_new([run])
        if holder:
            steps.append(Step(KEEP, run, f"checkpoints of {kind}: {holder}"))
            continue
        status = shown_status(run, cleanup.liveness)
        steps.append(Step(DELETE_CHECKPOINTS, run, f"{kind}, {status}", files=len(files),
                          bytes=sum(f.size for f in files)))
    return steps


def _check_cleanup_args(args: argparse.Namespace) -> None:
    if (args.keep_best is None) != (not args.metric):
        raise ConfigError("--keep-best K and --metric M go together: e.g. --keep-best 3 --metric cv_f1_macro_mean")
    if args.keep_best is not None and args.keep_best < 1:
        raise ConfigError(f"--keep-best {args.keep_best}: keep at least 1 run")
    if args.keep_best is not None and args.checkpoints_only:
        raise ConfigError("--checkpoints-only deletes no runs: drop it, or drop --keep-best/--metric")


def cmd_cleanup(args: argparse.Namespace, store: AdminStore, out: TextIO) -> None:
    _check_cleanup_args(args)
    runs = _scope(store, args.experiment)
    tree = Tree(runs, store.run)
    users = lineage(_scope(store, None) if args.experiment else runs)  # runs of any experiment may start from these
    cleanup = Cleanup(store, tree, Liveness(tree, args.optuna_storage), store.model_sources(),
                      parse_age(args.older_than) if args.older_than else 0.0, users)
    try:
        steps = plan_deletions(cleanup, runs, args.metric, args.keep_best, args.direction) if args.keep_best else []
        doomed = {run_id for step in steps for run_id in step.run_ids}
        steps += plan_checkpoints(cleanup, [r for r in runs if r.run_id not in doomed])
    finally:
        cleanup.liveness.close()
    _print_plan(steps, args.dry_run, out)
    if not args.dry_run:
        _execute(store, steps, out)


def _print_plan(steps: list[Step], dry_run: bool, out: TextIO) -> None:
    if dry_run:
        print("dry run: nothing is changed", file=out)
    rows = [[step.action, step.run.run_id, step.run.experiment, f"{step.files} files" if step.action != KEEP else "",
             size(step.bytes) if step.action != KEEP else "", step.why] for step in sorted(steps, key=_order)]
    if rows:
        print(render(["ACTION", "RUN ID", "EXPERIMENT", "FILES", "SIZE", "WHAT / WHY"], rows), file=out)
    doing = [s for s in steps if s.action != KEEP]
    runs = sum(len(s.run_ids) for s in doing)
    files, total = sum(s.files for s in doing), sum(s.bytes for s in doing)
    print(f"{'would free' if dry_run else 'frees'}: {files} files, {total} bytes ({size(total)}), {runs} runs",
          file=out)


def _order(step: Step) -> int:
    """Deletions of runs (by experiment, in rank order), of checkpoints, then what is kept (a stable sort)."""
    return {DELETE_RUNS: 0, DELETE_CHECKPOINTS: 1, KEEP: 2}[step.action]


def _execute(store: AdminStore, steps: list[Step], out: TextIO) -> None:
    for step in steps:
        if step.action == DELETE_CHECKPOINTS:
            store.delete_folder(step.run.run_id, CHECKPOINTS, (CHECKPOINT_TAG, EPOCH_TAG))
    doomed = [run_id for step in steps if step.action == DELETE_RUNS for run_id in step.run_ids]
    if doomed and not store.delete_runs(doomed):
        print(f"the {len(doomed)} runs are deleted but not yet removed: {store.uri} is not a database store; run "
              "`mlflow gc` against the server's database to free their space", file=out)


# ====================================================================== archive, restore


def cmd_archive(args: argparse.Namespace, store: AdminStore, out: TextIO) -> None:
    root = store.run(args.run_id)
    target = writable(args.to, "--to")
    family = [root, *Tree(store.runs([root.experiment_id])).descendants(root)]
    with tempfile.TemporaryDirectory(prefix="pipelines-archive-") as tmp:
        folder = Path(tmp)
        records = []
        for run in family:
            record = store.export_run(run)
            record["parent_id"] = run.parent_id if run is not root else ""
            for entry in store.top_level(run.run_id):
                if args.with_checkpoints or entry != CHECKPOINTS:
                    store.download(run.run_id, entry, folder / "artifacts" / run.run_id)
            records.append(record)
        index = {"format": ARCHIVE_FORMAT, "root_run_id": root.run_id, "experiment": root.experiment,
                 "source_tracking_uri": store.uri, "with_checkpoints": args.with_checkpoints, "runs": records}
        (folder / ARCHIVE_INDEX).write_text(json.dumps(index, indent=1))
        files = [p.stat().st_size for p in (folder / "artifacts").rglob("*") if p.is_file()]
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(folder / ARCHIVE_INDEX, ARCHIVE_INDEX)
            if (folder / "artifacts").is_dir():
                tar.add(folder / "artifacts", "artifacts")
        partial.replace(target)
    values = sum(len(h) for r in records for h in r["metrics"].values())
    print(f"archived {root.stage or 'run'} {root.run_id} ({root.experiment}) with {len(family) - 1} child runs: "
          f"{values} metric values, {len(files)} artifact files ({size(sum(files))}"
          f"{', checkpoints included' if args.with_checkpoints else ', checkpoints left out'}) -> {target}", file=out)


def _read_archive(path: Path, dst: Path) -> dict:
    if not path.is_file():
        raise NotFound(f"archive {path} not found; pass a file written by `pipelines archive RUN_ID --to FILE`")
    try:
        with tarfile.open(path, "r:*") as tar:
            _extract(tar, dst)
        index = json.loads((dst / ARCHIVE_INDEX).read_text())
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a pipelines archive ({exc}); pass a file written by `pipelines archive`") \
            from None
    if index.get("format") != ARCHIVE_FORMAT:
        raise UserError(f"{path} has format {index.get('format')!r}, not {ARCHIVE_FORMAT}: restore it with the "
                        "pipelines version that wrote it")
    return index


def _extract(tar: tarfile.TarFile, dst: Path) -> None:
    """Extract plain files and folders only, all inside ``dst`` (the ``data`` filter where Python has it)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dst, filter="data")
        return
    root = dst.resolve()
    for member in tar.getmembers():
        if not (member.isfile() or member.isdir()) or not (dst / member.name).resolve().is_relative_to(root):
            raise tarfile.TarError(f"unsafe member {member.name!r}")
    tar.extractall(dst)


def restored_tags(record: dict, ids: dict[str, str], index: dict) -> dict[str, str]:
    """The run's tags with references to archived runs (parent, stage_run_id) pointing at their copies."""
    tags = {k: ids.get(v, v) for k, v in record["tags"].items() if k != "mlflow.parentRunId"}
    if record["parent_id"]:
        tags["mlflow.parentRunId"] = ids[record["parent_id"]]
    tags[RESTORED_TAG] = record["run_id"]
    tags["restored_from_experiment"] = index["experiment"]
    if record["status"] in ACTIVE:  # a copy has no worker: a later resume=true takes it up
        tags["status_reason"] = f"archived while {record['status']}; restored as KILLED"
    return tags


def cmd_restore(args: argparse.Namespace, store: AdminStore, out: TextIO) -> None:
    with tempfile.TemporaryDirectory(prefix="pipelines-restore-") as tmp:
        index = _read_archive(Path(args.archive), Path(tmp))
        name = args.experiment or index["experiment"]
        experiment_id = store.target_experiment(name)
        earlier = store.find_tagged(experiment_id, RESTORED_TAG, index["root_run_id"])
        if earlier:
            raise UserError(f"run {index['root_run_id']} was already restored into experiment {name!r} as run "
                            f"{earlier[0]}; delete that copy first, or pass --experiment OTHER_NAME")
        ids: dict[str, str] = {}
        for record in index["runs"]:
            if record["status"] in ACTIVE:
                record = {**record, "status": "KILLED"}
            ids[record["run_id"]] = store.import_run(record, experiment_id, restored_tags(record, ids, index),
                                                     Path(tmp, "artifacts", record["run_id"]))
    root = index["root_run_id"]
    print(f"restored run {root} as {ids[root]} in experiment {name!r} of {store.uri} with {len(ids) - 1} child "
          "runs:", file=out)
    print(render(["ORIGINAL", "RESTORED"], [[old, new] for old, new in ids.items()]), file=out)


# ====================================================================== command line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pipelines", description="Manage the stage runs of the tracking store "
                                  "named by MLFLOW_TRACKING_URI (default: the embedded mlruns/mlflow.db).")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runs = sub.add_parser("runs", help="one line per stage run: status, progress, main metric, duration")
    runs.add_argument("--experiment", help="only this experiment (name or id); default: all")
    runs.add_argument("--stage", help="only this stage (kfold, optuna, train, predict, ...)")
    runs.add_argument("--status", type=str.upper, choices=STATUSES, help="only runs with this status")
    compare = sub.add_parser("compare", help="params that differ and main metrics, side by side")
    compare.add_argument("runs", nargs="+", metavar="RUN_OR_EXPERIMENT",
                         help="run ids and/or experiments (all their stage runs)")
    compare.add_argument("--csv", help="also write the table (one row per run) to this CSV file")
    compare.add_argument("--html", help="also write the table to this HTML file")
    cleanup = sub.add_parser("cleanup", help="delete leftover checkpoints and runs beyond the best K")
    cleanup.add_argument("--experiment", help="only this experiment (name or id); default: all")
    cleanup.add_argument("--older-than", help="only runs last active longer ago than this (7d, 12h, 30m)")
    cleanup.add_argument("--keep-best", type=int, metavar="K", help="per experiment, delete the stage runs beyond "
                         "the best K by --metric (with their child runs), for good")
    cleanup.add_argument("--metric", help="metric ranking the stage runs, e.g. cv_f1_macro_mean, best_value")
    cleanup.add_argument("--direction", choices=("auto", "max", "min"), default="auto",
                         help="whether greater --metric is better (auto: best_value as each search recorded it; "
                         "otherwise lower for loss, perplexity, error, cost)")
    cleanup.add_argument("--checkpoints-only", action="store_true", help="delete checkpoints only, never runs")
    cleanup.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    archive = sub.add_parser("archive", help="write a run with its child runs to a .tar.gz")
    archive.add_argument("run_id")
    archive.add_argument("--to", required=True, metavar="FILE.tar.gz")
    archive.add_argument("--with-checkpoints", action="store_true", help="include checkpoints/ folders")
    restore = sub.add_parser("restore", help="recreate an archived run in the current tracking store")
    restore.add_argument("archive", metavar="FILE.tar.gz")
    restore.add_argument("--experiment", help="experiment to restore into (created if missing); default: the "
                         "archived run's")
    for command in (runs, cleanup):
        command.add_argument("--optuna-storage", default="", help="database of the runs' leases when their "
                             "optuna_storage tag hides a password (default: the tag, or optuna.db beside SQLite)")
    return top


COMMANDS = {"runs": cmd_runs, "compare": cmd_compare, "cleanup": cmd_cleanup, "archive": cmd_archive,
            "restore": cmd_restore}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("PIPELINES_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    top = parser()
    args = top.parse_args(argv)
    try:
        COMMANDS[args.command](args, AdminStore(create=args.command == "restore"), sys.stdout)
    except UserError as exc:
        top.exit(2, f"pipelines {args.command}: error: {exc}\n")
    except BrokenPipeError:  # the reader stopped early (`pipelines runs | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed


if __name__ == "__main__":
    main()
