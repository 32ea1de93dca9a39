"""Optuna: search spaces, the RDB storage with heartbeats, a reproducible sampler, and the study.

Reproducibility: each trial gets a fresh sampler seeded from ``seed`` and the trial's *logical*
number (its position among original trials; a retry of a crashed trial keeps the original's
number and parameters).  A search killed and resumed therefore proposes exactly what an
uninterrupted search proposes, without persisting any sampler state.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipelines.config import DEFAULT_OPTUNA_STORAGE, ConfigError

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


# ------------------------------------------------------------------ sampler


def _root(trial: FrozenTrial) -> int:
    """Number of the original trial of a retry chain (the trial itself when it is not a retry)."""
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if original is None else original


def dead_roots(trials: list[FrozenTrial]) -> set[int]:
    """Retry chains whose last attempt failed and was not retried (an exception, or a surplus trial)."""
    last: dict[int, FrozenTrial] = {}
    for t in trials:
        if _root(t) not in last or t.number > last[_root(t)].number:
            last[_root(t)] = t
    return {root for root, t in last.items() if t.state == TrialState.FAIL}


def logical_number(trial: FrozenTrial, trials: list[FrozenTrial]) -> int:
    """Position among live retry chains: a retry keeps its original's number; a dead chain frees its number."""
    root, dead = _root(trial), dead_roots(trials)
    return sum(1 for t in trials if _root(t) == t.number and t.number < root and t.number not in dead)


class ReproducibleSampler(BaseSampler):
    """Delegates to a fresh TPE/random/grid sampler seeded by ``seed`` and the trial's logical number."""

    def __init__(self, kind: str, seed: int, grid: dict[str, list] | None = None):
        self.kind, self.seed, self.grid = kind, seed, grid
        self._inner: dict[int, BaseSampler] = {}

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> BaseSampler:
        if trial.number not in self._inner:
            trials = study.get_trials(deepcopy=False)
            seed = self.seed * 1_000_003 + logical_number(trial, trials)
            if self.kind == "tpe":
                sampler = TPESampler(seed=seed, constant_liar=True)
            elif self.kind == "random":
                sampler = RandomSampler(seed=seed)
            else:
                sampler = GridSampler(self.grid, seed=seed)
            self._inner[trial.number] = sampler
        return self._inner[trial.number]

    def before_trial(self, study, trial):
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._inner.pop(trial.number).after_trial(study, trial, state, values)


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


def redact(url: str) -> str:
    """The storage URL with any password removed."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show only its scheme
        return url.split("://", 1)[0] + "://..."


def storage_for(settings: StudySettings) -> RDBStorage:
    if settings.storage == DEFAULT_OPTUNA_STORAGE:
        Path("mlruns").mkdir(exist_ok=True)
    try:
        return RDBStorage(
            settings.storage,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True),
        )
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors: name the storage and the fix
        raise ConfigError(f"optuna_storage {redact(settings.storage)} cannot be opened: {exc}") from None


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


def recover_dead_trials(study: optuna.Study, storage: RDBStorage) -> list[int]:
    """Fail and re-queue RUNNING trials whose process on this host is gone (no wait for the heartbeat).

    Trials of other hosts are recovered by Optuna's heartbeat once they are ``grace_period`` stale.
    """
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    recovered = []
    settle = datetime.timedelta(seconds=storage.get_heartbeat_interval() or 0)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, _, pid = str(trial.user_attrs.get(OWNER_ATTR, "")).rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if trial.datetime_start and datetime.datetime.now() - trial.datetime_start < settle:
            continue  # a retry just taken by a live worker still carries its dead predecessor's owner
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial_id))
                recovered.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker recovered it first
    optuna.storages.fail_stale_trials(study)
    return recovered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
