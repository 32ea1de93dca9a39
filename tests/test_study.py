"""Optuna storage recovery, trial identity and retries, the search loop and the reproducible sampler, in-process on
real SQLite storages."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import pytest
from helpers import run_together
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import text

from pipelines.errors import ConfigError
from pipelines.leases import LeaseStore
from pipelines.study import (
    ERROR_ATTR,
    LOGICAL_ATTR,
    SearchLimits,
    StudySettings,
    TrialsKeepFailing,
    grid_of,
    load_search_space,
    logical_number,
    logical_numbers,
    logical_trials,
    open_study,
    optimize,
    recover_dead_trials,
    storage_for,
    study_scope,
)

SPACE = {"x": FloatDistribution(0.0, 1.0)}


def study_in(tmp_path, sampler="tpe", seed=1, name="s", grace_period=2):
    settings = StudySettings(storage=f"sqlite:///{tmp_path}/optuna.db", study_name=name, direction="maximize",
                             sampler=sampler, pruner="none", seed=seed, heartbeat_interval=1,
                             grace_period=grace_period)
    storage = storage_for(settings)
    return open_study(settings, storage), storage


def running_trial(study, storage, owner: str, grace_period: float = 2):
    """A RUNNING trial whose lease row names ``owner``, with a fresh heartbeat by the database's clock."""
    trial = study.ask(SPACE)
    LeaseStore(storage.url, 1, 2).close()  # the lease table
    with storage.engine.begin() as conn:
        conn.execute(text("INSERT INTO pipelines_leases (scope, unit, owner, heartbeat, heartbeat_interval, "
                          "grace_period, epoch) VALUES (:s, :u, :o, (julianday('now') - 2440587.5) * 86400.0, 1, "
                          ":g, 1)"), {"s": study_scope(study), "u": f"trial-{trial._trial_id}", "o": owner,
                                      "g": grace_period})
    return trial


def age_heartbeats(storage, seconds: float) -> None:
    with storage.engine.begin() as conn:
        conn.execute(text("UPDATE pipelines_leases SET heartbeat = heartbeat - :s"), {"s": seconds})


def test_trial_of_a_dead_process_on_this_host_is_requeued_at_once(tmp_path):
    study, storage = study_in(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trial = running_trial(study, storage, f"{socket.gethostname()}:{int(dead.stdout)}:0badf00d")
    assert recover_dead_trials(study, storage) == [trial.number]  # at once: no waiting for a stale heartbeat
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].params == study.trials[0].params
    assert study.trials[1].system_attrs["failed_trial"] == 0


def test_trial_of_another_host_is_requeued_only_when_its_heartbeat_is_stale(tmp_path):
    study, storage = study_in(tmp_path)
    running_trial(study, storage, "another-host:1:0badf00d", grace_period=2)
    age_heartbeats(storage, 1.5)
    assert recover_dead_trials(study, storage) == []
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    age_heartbeats(storage, 1.0)  # older than the row's grace_period=2 by the database's clock
    recover_dead_trials(study, storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]


def test_live_local_trial_is_left_alone(tmp_path):
    study, storage = study_in(tmp_path)
    import os

    running_trial(study, storage, f"{socket.gethostname()}:{os.getpid()}:0badf00d")
    assert recover_dead_trials(study, storage) == []
    assert [t.state for t in study.trials] == [TrialState.RUNNING]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_proposals_depend_only_on_seed_and_history(tmp_path, sampler):
    def proposals(name, crash_at=None):
        study, _ = study_in(tmp_path, sampler=sampler, name=name)
        values = []
        for i in range(8):
            trial = study.ask(SPACE)
            values.append(trial.params["x"])
            study.tell(trial, (trial.params["x"] - 0.3) ** 2)
            if i == crash_at:  # a fresh process: a new sampler object over the same storage
                study, _ = study_in(tmp_path, sampler=sampler, name=name)
        return values

    assert proposals("a") == proposals("b", crash_at=3)
    other_seed, _ = study_in(tmp_path, sampler=sampler, seed=2, name="d")
    assert other_seed.ask(SPACE).params["x"] != proposals("e")[0]


def test_grid_needs_steps_or_choices():
    space = load_search_space("{batch_size: {type: categorical, choices: [8, 16]}, "
                              "warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.1}}",
                              {"batch_size": 16, "warmup_ratio": 0.0})
    assert grid_of(space) == {"batch_size": [8, 16], "warmup_ratio": [0.0, 0.1, 0.2]}
    with pytest.raises(ConfigError, match="sampler=grid needs a step or choices for search_space entry 'lr'"):
        grid_of(load_search_space("{lr: {type: float, low: 0.1, high: 0.2}}", {"lr": 0.1}))


TUNABLE = {"learning_rate": 5e-5, "epochs": 3, "batch_size": 16}


@pytest.mark.parametrize("space, message", [
    ("learning_rate: {type: float, low: 1.0e-4}", "entry 'learning_rate': 'low' and 'high' are required"),
    ("lr: {type: float, low: 0.1, high: 0.2}", "entry 'lr': unknown setting; tunable settings are"),
    ("batch_size: {type: normal, low: 1, high: 2}", "entry 'batch_size': type 'normal' is not one of"),
    ("epochs: {type: float, low: 1, high: 3}", "entry 'epochs': epochs is an integer setting"),
    ("batch_size: {type: categorical, choices: []}", "entry 'batch_size': 'choices' must be a non-empty list"),
    ("learning_rate: {type: float, low: 0.1, high: 0.2, sigma: 1}", "entry 'learning_rate': unknown keys ['sigma']"),
    ("learning_rate: [1, 2", "is not valid YAML"),
    ("/no/such/space.yaml", "search_space file /no/such/space.yaml does not exist"),
])
def test_bad_search_space_names_the_entry(space, message):
    with pytest.raises(ConfigError) as error:
        load_search_space(space, TUNABLE)
    assert message in str(error.value)


def test_search_space_file_and_distributions(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
                    "epochs: {type: int, low: 1, high: 3}\nbatch_size: {type: categorical, choices: [8, 16]}\n")
    space = load_search_space(str(path), TUNABLE)
    assert space["learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["epochs"].low == 1 and space["epochs"].high == 3
    assert space["batch_size"].choices == (8, 16)


def test_logical_numbers_are_fixed_at_creation_and_never_reused(tmp_path):
    study, storage = study_in(tmp_path)
    study.tell(study.ask(SPACE), 0.5)  # 0: complete
    crashed = study.ask(SPACE)  # 1: crashed, retried as 2
    storage.set_trial_state_values(crashed._trial_id, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(crashed._trial_id))
    retry = study.ask(SPACE)  # 2: the retry (popped from WAITING)
    study.tell(retry, 0.4)
    study.tell(study.ask(SPACE), state=TrialState.FAIL)  # 3: raised, not retried: its number stays used
    fresh = study.ask(SPACE)  # 4
    trials = study.get_trials(deepcopy=False)
    assert [logical_number(t, trials) for t in trials] == [0, 1, 1, 2, 3]
    assert retry.params == crashed.params and fresh.number == 4
    assert {n: t.number for n, t in logical_trials(trials).items()} == {0: 0, 1: 2, 2: 3, 3: 4}


CHOICES = {"b": CategoricalDistribution([8, 16]), "x": FloatDistribution(0.0, 1.0)}


def raising_objective(trial, started=None):
    """Fails deterministically for b=16 (seed 1 proposes it for logical trial 2 only, of the first 5)."""
    params = {name: trial._suggest(name, dist) for name, dist in CHOICES.items()}
    if started is not None:
        started.append(trial.user_attrs[LOGICAL_ATTR])
    if params["b"] == 16:
        raise RuntimeError("b=16 always fails")
    return params["x"]


def chains(trials):
    """Logical number -> its attempts, oldest first."""
    numbers, attempts = logical_numbers(trials), {}
    for t in sorted(trials, key=lambda t: t.number):
        attempts.setdefault(numbers[t.number], []).append(t)
    return attempts


@pytest.mark.parametrize("max_retries", [0, 1, 2])
def test_a_failing_trial_is_retried_max_retries_times_and_its_number_is_never_reused(tmp_path, max_retries):
    # no takeover is wanted here: a long pause of a big test process must not read as a lost lease
    study, storage = study_in(tmp_path, grace_period=20)
    started = []
    assert optimize(study, storage, lambda t: raising_objective(t, started), SearchLimits(4, max_retries), nullcontext)
    attempts = chains(study.trials)
    assert sorted(attempts) == [0, 1, 2, 3, 4]  # 4 finished, and number 2 stays used by the failed trial
    assert [a.state for a in attempts[2]] == [TrialState.FAIL] * (1 + max_retries)
    assert all(a.params == attempts[2][0].params and a.user_attrs[ERROR_ATTR] == "RuntimeError: b=16 always fails"
               for a in attempts[2])
    assert all([a.state for a in attempts[n]] == [TrialState.COMPLETE] for n in (0, 1, 3, 4))
    assert started == [0, 1, *[2] * (1 + max_retries), 3, 4]  # each attempt after the previous one ended

    # resumed (a fresh process: new study object): the failed trial is neither re-proposed nor retried again
    study, storage = study_in(tmp_path)
    assert optimize(study, storage, raising_objective, SearchLimits(4, max_retries), nullcontext)
    assert len(study.trials) == 4 + 1 + max_retries
    assert optimize(study, storage, raising_objective, SearchLimits(5, max_retries), nullcontext)  # extended
    attempts = chains(study.trials)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 5
    assert sorted(attempts) == list(range(len(attempts))) and len(attempts[2]) == 1 + max_retries


def test_a_resumed_search_proposes_what_an_uninterrupted_one_does_failures_included(tmp_path):
    def params_by_number(name, stops):
        for n_trials in stops:  # each stop: a fresh process (new study object) resuming the same storage
            study, storage = study_in(tmp_path, name=name, grace_period=20)
            assert optimize(study, storage, raising_objective, SearchLimits(n_trials, 1), nullcontext)
        return {n: [(t.params, t.state) for t in tries] for n, tries in chains(study.trials).items()}

    assert params_by_number("once", [5]) == params_by_number("resumed", [1, 2, 2, 4, 5])


def test_raise_if_matches_every_named_parameter(monkeypatch):
    from pipelines.faults import raise_if

    raise_if({"batch_size": 16})  # unset: nothing
    monkeypatch.setenv("PIPELINES_RAISE_IF", "batch_size=16,epochs=2")
    raise_if({"batch_size": 16, "epochs": 1})
    with pytest.raises(RuntimeError, match="PIPELINES_RAISE_IF=batch_size=16,epochs=2 matches"):
        raise_if({"batch_size": 16, "epochs": 2, "learning_rate": 0.1})


def test_a_worker_whose_trials_all_fail_gives_up(tmp_path):
    study, storage = study_in(tmp_path)

    def broken(trial):
        raise OSError("disk full")

    with pytest.raises(TrialsKeepFailing, match=r"the last 10 trials of this worker all failed.*OSError: disk full"):
        optimize(study, storage, broken, SearchLimits(3, max_retries=1), nullcontext)
    assert len(study.trials) == 20 and {t.state for t in study.trials} == {TrialState.FAIL}


def test_interrupted_trial_stays_running_for_recovery(tmp_path):
    study, storage = study_in(tmp_path)

    def interrupted(trial):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(study, storage, interrupted, SearchLimits(3, max_retries=1), nullcontext)
    assert [t.state for t in study.trials] == [TrialState.RUNNING]  # its lease released: re-queued by the next look


def test_three_concurrent_workers_never_share_a_logical_number(tmp_path):
    """Three workers (threads, each with its own storage, study and lease store) on one SQLite study."""
    live, overlaps, errors, lock = set(), [], [], threading.Lock()

    def objective(trial):
        number = trial.user_attrs[LOGICAL_ATTR]
        with lock:
            if number in live:
                overlaps.append(number)
            live.add(number)
        try:
            time.sleep(random.uniform(0.02, 0.15))
            return raising_objective(trial)
        finally:
            with lock:
                live.discard(number)

    def worker():
        try:
            study, storage = study_in(tmp_path, seed=2, grace_period=20)
            # a generous grace period: on a loaded machine a starved heartbeat would make a live trial look dead
            # (a takeover, retried apart from max_retries); no worker dies here
            leases = LeaseStore(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=20)
            study_lock = lambda: leases.wait_for("optuna-study-1", "trials", poll=0.02)
            assert optimize(study, storage, objective, SearchLimits(8, max_retries=1, poll=0.05), study_lock)
            leases.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    study_in(tmp_path, seed=2, grace_period=20)  # the study once before the workers start (a fresh database races)
    LeaseStore(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=20).close()
    run_together(worker, 3)
    assert not errors and not overlaps
    study, _ = study_in(tmp_path, seed=2)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 8
    attempts = chains(study.trials)
    assert sorted(attempts) == list(range(len(attempts)))  # no hole, no number twice
    for number, tries in attempts.items():
        assert [t.user_attrs[LOGICAL_ATTR] for t in tries] == [number] * len(tries)
        assert all(t.state == TrialState.FAIL for t in tries[:-1])
        assert sum(ERROR_ATTR in t.user_attrs for t in tries) <= 2  # max_retries=1: two attempts that raised
        assert all(t.params == tries[0].params for t in tries)
    assert any(len(tries) == 2 for tries in attempts.values()), "seed 2 proposes b=16 early: some trial must fail"
