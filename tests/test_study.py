"""Optuna storage recovery and the reproducible sampler, in-process on real SQLite storages."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from pipelines.config import ConfigError
from pipelines.study import StudySettings, grid_of, load_search_space, open_study, recover_dead_trials, storage_for

SPACE = {"x": FloatDistribution(0.0, 1.0)}


def study_in(tmp_path, sampler="tpe", seed=1, name="s"):
    settings = StudySettings(storage=f"sqlite:///{tmp_path}/optuna.db", study_name=name, direction="maximize",
                             sampler=sampler, pruner="none", seed=seed, heartbeat_interval=1, grace_period=2)
    storage = storage_for(settings)
    return open_study(settings, storage), storage


def running_trial(study, storage, owner: str):
    trial = study.ask(SPACE)
    trial.set_user_attr("worker", owner)
    storage.record_heartbeat(trial._trial_id)
    return trial


def test_trial_of_a_dead_process_on_this_host_is_requeued_at_once(tmp_path):
    study, storage = study_in(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trial = running_trial(study, storage, f"{socket.gethostname()}:{int(dead.stdout)}")
    assert recover_dead_trials(study, storage) == []  # started under a heartbeat interval ago: left alone
    time.sleep(1.2)
    assert recover_dead_trials(study, storage) == [trial.number]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].params == study.trials[0].params
    assert study.trials[1].system_attrs["failed_trial"] == 0


def test_trial_of_another_host_is_requeued_only_when_its_heartbeat_is_stale(tmp_path):
    study, storage = study_in(tmp_path)
    running_trial(study, storage, "another-host:1")
    assert recover_dead_trials(study, storage) == []
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    time.sleep(3.5)  # grace_period=2, and SQLite keeps heartbeat times to the second
    recover_dead_trials(study, storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]


def test_live_local_trial_is_left_alone(tmp_path):
    study, storage = study_in(tmp_path)
    import os

    running_trial(study, storage, f"{socket.gethostname()}:{os.getpid()}")
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


def test_logical_numbers_keep_retries_in_place_and_reuse_numbers_of_failed_trials(tmp_path):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from pipelines.study import logical_number

    study, storage = study_in(tmp_path)
    study.tell(study.ask(SPACE), 0.5)  # 0: complete
    crashed = study.ask(SPACE)  # 1: crashed, retried as 2
    storage.set_trial_state_values(crashed._trial_id, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, storage.get_trial(crashed._trial_id))
    retry = study.ask(SPACE)  # 2: the retry (popped from WAITING)
    study.tell(retry, 0.4)
    study.tell(study.ask(SPACE), state=TrialState.FAIL)  # 3: raised an exception, not retried: its number is free
    fresh = study.ask(SPACE)  # 4
    trials = study.get_trials(deepcopy=False)
    assert [logical_number(t, trials) for t in trials] == [0, 1, 1, 2, 2]
    assert retry.params == crashed.params and fresh.number == 4
