"""Chaos: SIGKILL whole `mlflow run` process groups at random instants, resume after every kill, and check that
the end result is the uninterrupted one, with nothing done twice and no run left RUNNING."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, entrypoint, run_entrypoint, store_env
from helpers import artifact_text, metric_steps, parents, runs

pytestmark = pytest.mark.slow

KILLS = 10


def mlflow_run(entry: str, params: dict) -> list[str]:
    cmd = ["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", "--experiment-name", "chaos"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return cmd


def kill_at_random_instants(cmd: list[str], env: dict, cwd, rng: random.Random, kills: int,
                            low: float, high: float) -> list[float]:
    """Start ``cmd`` again and again, SIGKILLing its whole process group after a random delay, ``kills`` times."""
    instants = []
    while len(instants) < kills:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        delay = rng.uniform(low, high)
        try:
            proc.wait(timeout=delay)
            break  # it finished before the kill: nothing left to interrupt
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            instants.append(round(delay, 1))
    return instants


def kill_ten_times_then_finish(cmd: list[str], env: dict, cwd, rng: random.Random, latest: float, stage: str):
    """SIGKILL ``cmd`` at ``KILLS`` random instants in [1 s, ``latest``], resuming each time, then let it finish;
    the stage's one parent run (FINISHED) and the kill instants."""
    instants = kill_at_random_instants(cmd, env, cwd, rng, KILLS, 1.0, latest)
    assert len(instants) == KILLS, f"the stage finished after {len(instants)} kills: widen the instants"
    final = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    (parent,) = parents(env, "chaos", stage)
    assert parent.info.status == "FINISHED"
    return parent, instants


def assert_nothing_twice_and_nothing_running(env: dict, unit_key: str) -> None:
    everything = runs(env, "chaos")
    running = [(r.info.run_id, r.data.tags.get("mlflow.runName")) for r in everything if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"
    units = [r.data.tags[unit_key] for r in everything if unit_key in r.data.tags]
    assert len(units) == len(set(units)), f"a {unit_key} has two runs: {sorted(units)}"
    for run in everything:
        for key, steps in metric_steps(env, run.info.run_id).items():
            assert len(steps) == len(set(steps)), f"metric {key} of run {run.info.run_id} logged a step twice"


def test_kfold_killed_ten_times_at_random_instants_ends_as_if_uninterrupted(tiny_data, tiny_model, tmp_path):
    params = {"data": tiny_data, "model": tiny_model, "k_folds": 3, "epochs": 2, "batch_size": 8, "max_length": 32,
              "learning_rate": 1e-3, "seed": 42, "heartbeat_interval": 1, "grace_period": 3}
    reference = tmp_path / "reference"
    reference.mkdir()
    ref_env = store_env(reference)
    done = run_entrypoint("kfold", {**params, "experiment_name": "chaos"}, ref_env, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    (expected,) = parents(ref_env, "chaos", "kfold")

    env = store_env(tmp_path)
    # `mlflow run` itself creates a missing store, in many steps: killed in its first seconds it would leave a
    # broken file (our entry points create stores atomically, see tracking.tracking_uri). Create it first.
    subprocess.run([sys.executable, "-c", "from pipelines.tracking import tracking_uri; tracking_uri()"], env=env,
                   check=True)
    cmd = mlflow_run("kfold", {**params, "resume": "true"})
    parent, instants = kill_ten_times_then_finish(cmd, env, tmp_path, random.Random(7), 16.0, "kfold")
    oof = artifact_text(env, parent.info.run_id, "oof_predictions.csv", tmp_path / "oof")
    assert oof == artifact_text(ref_env, expected.info.run_id, "oof_predictions.csv", tmp_path / "ref")
    cv = {k: v for k, v in parent.data.metrics.items() if k.startswith(("cv_", "fold"))}
    assert cv == {k: v for k, v in expected.data.metrics.items() if k.startswith(("cv_", "fold"))}
    assert_nothing_twice_and_nothing_running(env, "fold")
    launchers = runs(env, "chaos", "tags.`mlflow.project.entryPoint` = 'kfold'")
    # a kill during `mlflow run`'s own start-up comes before it creates its run
    assert len(launchers) <= KILLS + 1 and launchers[-1].info.status == "FINISHED", instants


def test_optuna_killed_ten_times_at_random_instants_ends_as_if_uninterrupted(tiny_data, tiny_model, tmp_path):
    space = "{learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}, batch_size: " \
            "{type: categorical, choices: [8, 16]}}"
    params = {"data": tiny_data, "model": tiny_model, "n_trials": 6, "epochs": 2, "max_length": 32, "seed": 7,
              "search_space": space, "pruner": "none", "heartbeat_interval": 1, "grace_period": 3,
              "experiment_name": "chaos"}
    reference = tmp_path / "reference"
    reference.mkdir()
    ref_env = store_env(reference)
    done = run_entrypoint("optuna_search", params, ref_env, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    (expected,) = parents(ref_env, "chaos", "optuna")

    env = store_env(tmp_path)
    cmd = entrypoint("optuna_search", {**params, "resume": "true"})  # the process itself is killed this time
    parent, instants = kill_ten_times_then_finish(cmd, env, tmp_path, random.Random(11), 9.0, "optuna")
    trials = artifact_text(env, parent.info.run_id, "trials.csv", tmp_path / "t")
    assert trials == artifact_text(ref_env, expected.info.run_id, "trials.csv", tmp_path / "rt"), instants
    assert parent.data.metrics["best_value"] == expected.data.metrics["best_value"]
    assert_nothing_twice_and_nothing_running(env, "trial")
