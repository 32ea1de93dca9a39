"""Optuna: search spaces, the RDB storage, a reproducible sampler, and the search loop with trial leases.

Trial identity: a trial's *logical* number is the rank of its original among the study's original
trials (retries excluded).  It is fixed when the trial is created and never reused; a retry (of a
crashed trial, or of one that raised) inherits its original's number and parameters.  Trials are only
created, failed and re-queued under a lock on the study shared by all workers, and only while fewer
than ``n_trials`` are finished, running or queued: no trial is surplus, none is created twice.

Liveness: a running trial holds a lease (pipelines/leases.py) in the study's scope, taken under the lock
as the trial is created and heartbeated while it runs; a RUNNING trial without a live lease (judged by
the row's own ``grace_period`` and the database's clock, never by the reader's settings) is failed and
re-queued under the lock.  Optuna's own heartbeat is not used: it judges by the reader's ``grace_period``.

Reproducibility: each trial gets a fresh sampler seeded from ``seed`` and its logical number.  A
search killed and resumed by one worker therefore proposes exactly what an uninterrupted search
proposes, without persisting any sampler state.  With ``sampler=grid`` logical trial ``n`` is grid point
``n`` (of an order fixed by ``seed``), and a search never has more trials than the grid has points.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipelines import faults
from pipelines.errors import ConfigError
from pipelines.leases import CREATE_RACES, Lease, LeaseLost, LeaseStore
from pipelines.settings import redact

logger = logging.getLogger(__name__)
# heartbeats, retries and the matplotlib plots are "experimental" in Optuna 5; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OWNER_ATTR = "worker"  # host:pid of the process running a trial


# ------------------------------------------------------------------ search space


def load_search_space(spec: str, tunable: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Parse a YAML file path or inline YAML mapping ``name: {type, low, high, log, step, choices}``.

    ``tunable`` maps every setting that may be searched to its default (for type checks).
    """
    source = "<inline>"
    if spec and "\n" not in spec and ":" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"search_space file {spec} does not exist; pass a YAML file or inline YAML")
        spec, source = path.read_text(encoding="utf-8"), str(path)
    try:
        raw = yaml.safe_load(spec)
    except yaml.YAMLError as exc:
        raise ConfigError(f"search_space {source} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search_space {source} must be a non-empty mapping of setting: distribution")
    return {name: _distribution(name, entry, tunable, source) for name, entry in raw.items()}


def _distribution(name: str, entry: Any, tunable: dict[str, Any], source: str):
    where = f"search_space {source}, entry {name!r}"
    if name not in tunable:
        raise ConfigError(f"{where}: unknown setting; tunable settings are {', '.join(sorted(tunable))}")
    if not isinstance(entry, dict) or "type" not in entry:
        raise ConfigError(f"{where}: expected a mapping with 'type' (float, int or categorical)")
    kind = entry["type"]
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}}
    if kind not in allowed:
        raise ConfigError(f"{where}: type {kind!r} is not one of float, int, categorical")
    extra = set(entry) - allowed[kind] - {"type"}
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)} for type {kind}")
    try:
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError("'choices' must be a non-empty list")
            return CategoricalDistribution(choices)
        if "low" not in entry or "high" not in entry:
            raise ValueError("'low' and 'high' are required")
        if kind == "int":
            if isinstance(tunable[name], float):
                raise ValueError(f"{name} is a float setting; use type: float")
            return IntDistribution(int(entry["low"]), int(entry["high"]), log=bool(entry.get("log", False)),
                                   step=int(entry.get("step", 1)))
        if isinstance(tunable[name], (int, bool)) and not isinstance(tunable[name], float):
            raise ValueError(f"{name} is an integer setting; use type: int")
        step = entry.get("step")
        return FloatDistribution(float(entry["low"]), float(entry["high"]), log=bool(entry.get("log", False)),
                                 step=float(step) if step is not None else None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def grid_of(space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, list]:
    """Grid values per parameter: categorical choices, or a range with a step."""
    grid = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif dist.step is not None and not dist.log:
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[name] = [dist.low + i * dist.step for i in range(count)]
            if isinstance(dist, FloatDistribution):
                grid[name] = [round(v, 12) for v in grid[name]]
        else:
            raise ConfigError(f"sampler=grid needs a step or choices for search_space entry {name!r}")
    return grid


# ------------------------------------------------------------------ trial identity


def _root(trial: FrozenTrial) -> int:
    """Number of the original trial of a retry chain (the trial itself when it is not a retry)."""
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if original is None else original


def logical_numbers(trials: list[FrozenTrial]) -> dict[int, int]:
    """Optuna trial number -> logical number: the rank of the chain's original among original trials.

    Retries (crash or exception) are never originals and inherit their original's number.  Only trials
    created earlier have smaller Optuna numbers, so a trial's logical number is fixed when it is created
    and never changes: a failed trial keeps its number for good.
    """
    originals = sorted(t.number for t in trials if _root(t) == t.number)
    rank = {number: i for i, number in enumerate(originals)}
    return {t.number: rank[_root(t)] for t in trials if _root(t) in rank}


def logical_number(trial: FrozenTrial, trials: list[FrozenTrial]) -> int:
    return logical_numbers(trials)[trial.number]


def logical_trials(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Logical number -> the latest attempt of that logical trial."""
    numbers, latest = logical_numbers(trials), {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.number in numbers:
            latest[numbers[t.number]] = t
    return dict(sorted(latest.items()))


# ------------------------------------------------------------------ sampler


class ReproducibleSampler(BaseSampler):
    """Delegates to a fresh TPE/random sampler seeded by ``seed`` and the trial's logical number.

    ``grid``: logical trial ``n`` takes grid point ``n`` of one grid order fixed by ``seed`` (Optuna's
    ``GridSampler`` with its ``grid_id`` set here), so every point is tried exactly once, whichever worker
    asks; the search loop creates no more trials than the grid has points (:func:`trial_budget`).
    """

    def __init__(self, kind: str, seed: int, grid: dict[str, list] | None = None):
        self.kind, self.seed, self.grid = kind, seed, grid
        self._inner: dict[int, BaseSampler] = {}
        self._grid = GridSampler(grid, seed=seed) if kind == "grid" else None

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> BaseSampler:
        if self._grid is not None:
            return self._grid
        if trial.number not in self._inner:
            trials = study.get_trials(deepcopy=False)
            seed = self.seed * 1_000_003 + logical_number(trial, trials)
            if self.kind == "tpe":
                sampler = TPESampler(seed=seed, constant_liar=True)
            else:
                sampler = RandomSampler(seed=seed)
            self._inner[trial.number] = sampler
        return self._inner[trial.number]

    def before_trial(self, study, trial):
        if self._grid is None:
            self._for(study, trial).before_trial(study, trial)
        elif "grid_id" not in trial.system_attrs:  # a retry keeps its original's point (and parameters)
            number, size = logical_number(trial, study.get_trials(deepcopy=False)), grid_size(self.grid)
            if number >= size:
                raise RuntimeError(f"trial {number} has no grid point: the grid has {size}; the search loop must "
                                   "stop at trial_budget()")
            space = {name: list(values) for name, values in sorted(self.grid.items())}
            study._storage.set_trial_system_attr(trial._trial_id, "search_space", space)  # as GridSampler does
            study._storage.set_trial_system_attr(trial._trial_id, "grid_id", number)

    def infer_relative_search_space(self, study, trial):
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        # never GridSampler.after_trial: its study.stop() raises outside Study.optimize; trial_budget stops the loop
        inner = self._inner.pop(trial.number, None)
        if inner is not None:
            inner.after_trial(study, trial, state, values)


def grid_size(grid: dict[str, list]) -> int:
    return math.prod(len(values) for values in grid.values())


def trial_budget(n_trials: int, grid: dict[str, list] | None) -> int:
    """The trials a search runs: ``n_trials``, or the grid's size where ``sampler=grid`` has fewer points."""
    if grid is None or n_trials <= grid_size(grid):
        return n_trials
    logger.info("sampler=grid has %d points, fewer than n_trials=%d: the search stops after the whole grid",
                grid_size(grid), n_trials)
    return grid_size(grid)


# ------------------------------------------------------------------ storage and study


@dataclass
class StudySettings:
    storage: str
    study_name: str  # empty until the stage knows it
    direction: str
    sampler: str
    pruner: str
    seed: int
    heartbeat_interval: int
    grace_period: int
    grid: dict[str, list] | None = None


def storage_for(settings: StudySettings) -> RDBStorage:
    """The Optuna storage; workers opening a fresh database at the same instant race in its schema creation
    (PostgreSQL: ``pg_type_typname_nsp_index``), so the losers retry for up to a minute."""
    if settings.storage.startswith("sqlite:///"):
        Path(settings.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            return _rdb_storage(settings)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors: name the storage and the fix
            if not any(race in str(exc) for race in CREATE_RACES) or time.monotonic() > deadline:
                raise ConfigError(f"optuna_storage {redact(settings.storage)} cannot be opened: {exc}") from None
            time.sleep(random.uniform(0.2, 1.0))


def _rdb_storage(settings: StudySettings) -> RDBStorage:
    # the timings ride on the storage as this worker's trial-lease settings (_trial_leases); no Optuna heartbeat
    # is recorded and Optuna's stale-trial check (which judges by the reader's grace_period) is never run
    return RDBStorage(settings.storage, heartbeat_interval=settings.heartbeat_interval,
                      grace_period=settings.grace_period)


def open_study(settings: StudySettings, storage: RDBStorage) -> optuna.Study:
    pruners = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        "hyperband": optuna.pruners.HyperbandPruner(),
        "none": optuna.pruners.NopPruner(),
    }
    return optuna.create_study(
        storage=storage,
        study_name=settings.study_name,
        direction=settings.direction,
        sampler=ReproducibleSampler(settings.sampler, settings.seed, settings.grid),
        pruner=pruners[settings.pruner],
        load_if_exists=True,
    )


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def study_scope(study: optuna.Study) -> str:
    """The lease scope of a study: its lock (unit ``trials``) and its running trials (``trial-<trial id>``)."""
    return f"optuna-study-{study._study_id}"


def _trial_unit(trial_id: int) -> str:
    return f"trial-{trial_id}"


@contextmanager
def _trial_leases(storage: RDBStorage, leases: LeaseStore | None) -> Iterator[LeaseStore]:
    """``leases``, or (callers without a stage) a store in the storage's database with the storage's timings."""
    if leases is not None:
        yield leases
        return
    own = LeaseStore(storage.url, storage.heartbeat_interval, storage.grace_period)
    try:
        yield own
    finally:
        own.close()


def recover_dead_trials(study: optuna.Study, storage: RDBStorage, leases: LeaseStore | None = None) -> list[int]:
    """Fail and re-queue RUNNING trials without a live lease: their process died or stopped (at once when it was
    on this host, or died inside ``_ask`` before taking the lease), or missed heartbeats for their own
    ``grace_period`` by the database's clock. The dead lease is taken over first (fencing out a stalled holder).

    Call under the study lock, like ``_ask``, which creates a trial and takes its lease.
    """
    recovered = []
    with _trial_leases(storage, leases) as store:
        scope = study_scope(study)
        live = {info.unit for info in store.live(scope)}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _trial_unit(trial._trial_id) in live:
                continue
            lease = store.acquire(scope, _trial_unit(trial._trial_id))
            if lease is None:  # came alive meanwhile
                continue
            with lease:
                try:
                    if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                        requeue(study, storage.get_trial(trial._trial_id), {})
                        recovered.append(trial.number)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # another worker recovered it first
    if recovered:
        logger.warning("trials %s had no live lease (their worker died or stopped): failed and re-queued",
                       recovered)
    return recovered


# ------------------------------------------------------------------ the search loop

LOGICAL_ATTR = "logical_number"  # user attribute: the trial's logical number (also derivable: logical_numbers)
ERROR_ATTR = "error"  # user attribute of an attempt that raised: "<type>: <message>", truncated
ERROR_RETRIES_ATTR = "error_retries"  # system attribute: retries after exceptions so far in the trial's chain
ERROR_CHARS = 1000
GIVE_UP_AFTER = 10  # a worker whose last this many logical trials all failed (each after its retries) stops


class TrialsKeepFailing(RuntimeError):
    """Every recent trial of this worker failed: something systematic is wrong, searching on would waste work."""


@dataclass
class SearchLimits:
    n_trials: int  # finished (COMPLETE or PRUNED) trials the study should have
    max_retries: int  # retries of a trial that raised an exception (a crashed trial is always retried)
    timeout: float = 0  # seconds after which no trial is started; 0: none
    poll: float = 5.0  # seconds between looks while every remaining trial runs in another worker
    max_trials: int = 0  # logical trials the study may have at most (sampler=grid: its points); 0: no limit


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]


def next_action(trials: list[FrozenTrial], n_trials: int, max_trials: int = 0) -> str:
    """``done``, ``ask`` (pop a queued retry, or create a new trial) or ``wait`` (the rest runs elsewhere).

    A new trial is created only while finished + running + queued trials < ``n_trials``, so (with the
    study lock held) no trial is ever surplus and the study ends with exactly ``n_trials`` finished.
    Once ``max_trials`` logical trials exist (every grid point has its trial), none is created: the search
    is done when none runs or is queued any more, even if some failed for good.
    """
    states = Counter(t.state for t in trials)
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    if finished >= n_trials:
        return "done"
    if states[TrialState.WAITING]:
        return "ask"
    if max_trials and sum(_root(t) == t.number for t in trials) >= max_trials:
        return "wait" if states[TrialState.RUNNING] else "done"
    return "ask" if finished + states[TrialState.RUNNING] < n_trials else "wait"


def optimize(study: optuna.Study, storage: RDBStorage, objective: Callable[[optuna.Trial], float],
             limits: SearchLimits, lock: Callable[[], AbstractContextManager], leases: LeaseStore | None = None
             ) -> bool:
    """Run trials until the study has ``n_trials`` finished ones, sharing them with other workers.

    ``lock()`` is a lock on the study shared by every worker: trials are only created, failed and
    re-queued under it, so counts read under it are exact.  ``leases`` holds the running trials' leases
    (default: a store on the storage's database).  True when done, False on timeout.
    """
    with _trial_leases(storage, leases) as store:
        return _optimize(study, storage, objective, limits, lock, store)


def _optimize(study: optuna.Study, storage: RDBStorage, objective: Callable[[optuna.Trial], float],
              limits: SearchLimits, lock: Callable[[], AbstractContextManager], leases: LeaseStore) -> bool:
    deadline = time.monotonic() + limits.timeout if limits.timeout else None
    failed_in_a_row, waited = 0, False
    while deadline is None or time.monotonic() < deadline:
        with lock():
            recover_dead_trials(study, storage, leases)
            action = next_action(study.get_trials(deepcopy=False), limits.n_trials, limits.max_trials)
            asked = _ask(study, leases) if action == "ask" else None
        if action == "done":
            return True
        if asked is None:
            if not waited:
                logger.info("waiting for trials running in other workers")
            waited = True
            time.sleep(limits.poll)
            continue
        waited = False
        trial, lease = asked
        with lease:  # released after the trial's end is told (or on an interruption: then recovered at once)
            outcome = run_trial(study, storage, trial, objective, limits.max_retries, lock, lease)
        failed_in_a_row = {"gave_up": failed_in_a_row + 1, "finished": 0}.get(outcome, failed_in_a_row)
        if failed_in_a_row >= GIVE_UP_AFTER:
            last = storage.get_trial(trial._trial_id).user_attrs.get(ERROR_ATTR)
            raise TrialsKeepFailing(f"the last {failed_in_a_row} trials of this worker all failed, each after "
                                    f"max_retries={limits.max_retries} retries (the last with {last}); fix the "
                                    "cause (see the error tag of the failed trial runs), then resume=true")
    return False


def _ask(study: optuna.Study, leases: LeaseStore) -> tuple[optuna.Trial, Lease]:
    """A queued retry or a new trial, with its lease, owner and logical number (under the study lock). Killed
    before its lease is taken, the trial is RUNNING without a lease: the next look of any worker re-queues it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    faults.failpoint("study_ask")
    lease = leases.acquire(study_scope(study), _trial_unit(trial._trial_id))
    if lease is None:
        raise RuntimeError(f"trial {trial.number} of study {study.study_name} was just created, yet a live worker "
                           f"holds its lease {_trial_unit(trial._trial_id)}: two studies share one lease table "
                           "with different Optuna storages? use one optuna_storage for both")
    try:
        trial.set_user_attr(OWNER_ATTR, worker_id())
        trial.set_user_attr(LOGICAL_ATTR, logical_numbers(study.get_trials(deepcopy=False))[trial.number])
    except BaseException:
        lease.release()
        raise
    return trial, lease


def run_trial(study: optuna.Study, storage: RDBStorage, trial: optuna.Trial,
              objective: Callable[[optuna.Trial], float], max_retries: int,
              lock: Callable[[], AbstractContextManager], lease: Lease) -> str:
    """Run one trial under its ``lease`` and record its end; the outcome: ``finished`` (COMPLETE or PRUNED),
    ``retried`` (it raised, a retry is queued), ``gave_up`` (it raised with no retries left) or ``lost`` (its
    lease, or its unit's, was lost: another worker re-queues or took it over).

    An interruption (SIGTERM, SIGINT: a ``BaseException``) leaves the trial RUNNING: its lease is released, so
    the next look of any worker re-queues it, and the retry continues from its checkpoint.
    """
    try:
        value = float(objective(trial))
        if not math.isfinite(value):
            raise ValueError(f"the objective is {value}")
    except optuna.TrialPruned:
        return "finished" if _tell(study, trial, lease, state=TrialState.PRUNED) else "lost"
    except LeaseLost as exc:
        logger.error("trial %d stopped, its retry continues elsewhere: %s", trial.number, exc)
        return "lost"
    except Exception as exc:  # noqa: BLE001 - a failed trial fails alone; the search goes on
        with lock():
            return fail_trial(study, storage, trial, exc, max_retries, lease)
    finally:
        gc.collect()
    return "finished" if _tell(study, trial, lease, value) else "lost"


def _tell(study: optuna.Study, trial: optuna.Trial, lease: Lease, value: float | None = None,
          state: TrialState | None = None, error: str = "") -> bool:
    """Record the trial's end under its lease (fenced: ``Lease.fence``); False when it is no longer ours (its
    lease was lost and it was re-queued: the retry continues in the same MLflow run and reports a result found
    there)."""
    try:
        lease.fence()
        if error:
            trial.set_user_attr(ERROR_ATTR, error)
        study.tell(trial, value, state=state)
        return True
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError, LeaseLost) as exc:
        logger.warning("trial %d was taken over by another worker, its end is not recorded here: %s",
                       trial.number, exc)
        return False


def fail_trial(study: optuna.Study, storage: RDBStorage, trial: optuna.Trial, exc: Exception,
               max_retries: int, lease: Lease) -> str:
    """Record a trial that raised as FAIL with its error; re-queue it unless its retries are used up.

    Call under the study lock.  Returns ``retried``, ``gave_up`` or ``lost`` (see :func:`run_trial`).
    """
    frozen = storage.get_trial(trial._trial_id)
    number, retries = frozen.user_attrs.get(LOGICAL_ATTR), frozen.system_attrs.get(ERROR_RETRIES_ATTR, 0)
    if not _tell(study, trial, lease, state=TrialState.FAIL, error=describe_error(exc)):
        return "lost"
    if retries >= max_retries:
        logger.error("trial %s (optuna #%d) failed with no retries left (max_retries=%d): its number stays used; "
                     "error: %s", number, trial.number, max_retries, describe_error(exc), exc_info=exc)
        return "gave_up"
    requeue(study, storage.get_trial(trial._trial_id), {ERROR_RETRIES_ATTR: retries + 1})
    logger.error("trial %s (optuna #%d) failed, retry %d/%d queued with the same parameters; error: %s",
                 number, trial.number, retries + 1, max_retries, describe_error(exc), exc_info=exc)
    return "retried"


def requeue(study: optuna.Study, failed: FrozenTrial, system_attrs: dict[str, Any]) -> None:
    """Queue a retry of ``failed`` (as ``RetryHeartbeatStaleTrialCallback`` does): same parameters, same chain."""
    history = [*RetryHeartbeatStaleTrialCallback.retry_history(failed), failed.number]
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING,
        params=failed.params,
        distributions=failed.distributions,
        user_attrs={k: v for k, v in failed.user_attrs.items() if k != ERROR_ATTR},
        system_attrs={**failed.system_attrs, "failed_trial": _root(failed), "retry_history": history,
                      **system_attrs},
        intermediate_values=failed.intermediate_values,
    ))
