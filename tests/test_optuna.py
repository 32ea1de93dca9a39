"""`optuna` end to end: real Optuna RDB storages (SQLite, PostgreSQL), real subprocesses and SIGKILL."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from collections import Counter

import optuna
import pandas as pd
import pytest
from conftest import entrypoint, fresh_database, run_entrypoint, store_env
from helpers import artifact_frame, artifact_text, children, client, parents

pytestmark = pytest.mark.slow

SPACE = """
learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
weight_decay: {type: float, low: 0.0, high: 0.1}
batch_size: {type: categorical, choices: [8, 16]}
"""


def optuna_args(tiny_data, tiny_model, folder, **extra) -> dict:
    args = dict(data=tiny_data, model=tiny_model, n_trials=5, epochs=2, max_length=32, seed=7, search_space=SPACE,
                optuna_storage=f"sqlite:///{folder}/optuna.db", pruner="none", experiment_name="hpo")
    return {**args, **extra}


def trials_table(env, run_id, dst) -> pd.DataFrame:
    return artifact_frame(env, run_id, "trials.csv", dst)


def trial_runs(env, experiment, parent_id) -> dict[str, object]:
    runs = children(env, experiment, parent_id)
    tags = [r.data.tags["trial"] for r in runs]
    assert len(tags) == len(set(tags)), f"a trial has two MLflow runs: {sorted(tags)}"
    return {r.data.tags["trial"]: r for r in runs}


@pytest.fixture(scope="module")
def baseline(tiny_data, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hpo-baseline")
    env = store_env(folder)
    proc = run_entrypoint("optuna_search", optuna_args(tiny_data, tiny_model, folder), env, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,) = parents(env, "hpo", "optuna")
    return {"env": env, "parent": parent, "trials": trials_table(env, parent.info.run_id, folder / "t"),
            "folder": folder}


def test_full_search_logs_trials_best_params_and_plots(baseline):
    env, parent, table = baseline["env"], baseline["parent"], baseline["trials"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna_study"].startswith("hpo-") and parent.data.tags["optuna_storage"].startswith(
        "sqlite:///")
    assert list(table.columns) == ["number", "state", "value", "params_batch_size", "params_learning_rate",
                                   "params_weight_decay", "error"]
    assert table["number"].tolist() == [0, 1, 2, 3, 4] and set(table["state"]) == {"COMPLETE"}
    best = json.loads(artifact_text(env, parent.info.run_id, "best_params.json", baseline["folder"] / "b"))
    best_row = table.loc[table["value"].idxmax()]
    assert parent.data.metrics["best_value"] == best_row["value"]
    assert best["learning_rate"] == best_row["params_learning_rate"]
    runs = trial_runs(env, "hpo", parent.info.run_id)
    assert sorted(runs) == ["0", "1", "2", "3", "4"]
    assert all(r.data.tags["optuna_state"] == "COMPLETE" and "objective" in r.data.metrics for r in runs.values())
    assert "eval_f1_macro" in runs["0"].data.metrics  # per-epoch metrics of the trial
    plots = {a.path for a in client(env).list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png", "plots/param_importances.png"} <= plots
    assert "plots/learning_curve.png" in {a.path for a in client(env).list_artifacts(runs["0"].info.run_id, "plots")}


def test_sigkill_in_trial_3_resumes_it_from_its_checkpoint_then_extends(baseline, tiny_data, tiny_model, tmp_path):
    env = store_env(tmp_path)
    # trials 0-2 commit two checkpoints each; the 7th commit is trial 3's epoch-1 checkpoint
    args = optuna_args(tiny_data, tiny_model, tmp_path)
    killed = run_entrypoint("optuna_search", args, {**env, "PIPELINES_FAILPOINT": "checkpoint_committed:7"}, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (parent,) = parents(env, "hpo", "optuna")
    before = trial_runs(env, "hpo", parent.info.run_id)
    assert before["3"].data.tags["checkpoint"].startswith("checkpoints/checkpoint-")

    resumed = run_entrypoint("optuna_search", {**args, "resume": "true"}, env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resuming optuna run {parent.info.run_id}: 3/5 trials finished" in resumed.stderr
            and "trial 3 continues from epoch 1" in resumed.stderr)
    after = trial_runs(env, "hpo", parent.info.run_id)
    for number in "0123":
        assert after[number].info.run_id == before[number].info.run_id
    for number in "012":
        assert after[number].info.end_time == before[number].info.end_time, f"trial {number} was rerun"
    table = trials_table(env, parent.info.run_id, tmp_path / "t")
    pd.testing.assert_frame_equal(table, baseline["trials"])

    # extend the finished search from another experiment: 5 -> 6 trials
    more = {**args, "experiment_name": "elsewhere", "resume_from": parent.info.run_id, "n_trials": 6}
    extended = run_entrypoint("optuna_search", more, env, tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    table6 = trials_table(env, parent.info.run_id, tmp_path / "t6")
    assert table6["number"].tolist() == [0, 1, 2, 3, 4, 5]
    pd.testing.assert_frame_equal(table6.iloc[:5], baseline["trials"])
    assert len(trial_runs(env, "hpo", parent.info.run_id)) == 6


def test_cv_objective_prunes_and_records_pruned_trials(tiny_data, tiny_model, tmp_path):
    env = store_env(tmp_path)
    # learning rates up to 5 make some trials diverge: the median pruner stops them after a fold
    space = "learning_rate: {type: float, low: 1.0e-4, high: 5.0, log: true}"
    args = optuna_args(tiny_data, tiny_model, tmp_path, objective="cv", k_folds=3, epochs=1, n_trials=6,
                       metric="loss", pruner="median", search_space=space)
    proc = run_entrypoint("optuna_search", args, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,) = parents(env, "hpo", "optuna")
    table = trials_table(env, parent.info.run_id, tmp_path / "t")
    assert len(table) == 6 and "PRUNED" in set(table["state"]), table
    study = optuna.load_study(study_name=parent.data.tags["optuna_study"], storage=args["optuna_storage"])
    pruned = {t.user_attrs["logical_number"] for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    runs = trial_runs(env, "hpo", parent.info.run_id)
    assert {int(n) for n, r in runs.items() if r.data.tags["optuna_state"] == "PRUNED"} == pruned
    for number in pruned:  # a pruned cv trial stopped before its last fold
        assert len(children(env, "hpo", runs[str(number)].info.run_id)) < 3
    complete = [n for n, r in runs.items() if r.data.tags["optuna_state"] == "COMPLETE"]
    assert len(children(env, "hpo", runs[complete[0]].info.run_id)) == 3


def test_params_from_feeds_kfold(baseline, tiny_data, tiny_model):
    env, parent, folder = baseline["env"], baseline["parent"], baseline["folder"]
    args = dict(data=tiny_data, model=tiny_model, k_folds=3, epochs=1, max_length=32, experiment_name="hpo",
                params_from="latest")
    proc = run_entrypoint("kfold", args, env, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"using parameters of optuna run {parent.info.run_id}" in proc.stderr
    (kfold,) = parents(env, "hpo", "kfold")
    best = json.loads(artifact_text(env, parent.info.run_id, "best_params.json", folder / "bp"))
    assert kfold.data.tags["params_source"] == parent.info.run_id
    assert float(kfold.data.params["learning_rate"]) == best["learning_rate"]
    assert int(kfold.data.params["batch_size"]) == best["batch_size"]


def test_bad_search_space_exits_with_the_entry_named(tiny_data, tiny_model, tmp_path):
    space = "lr: {type: float, low: 0.1, high: 0.2}"
    proc = run_entrypoint("optuna_search", optuna_args(tiny_data, tiny_model, tmp_path, search_space=space),
                          store_env(tmp_path), tmp_path)
    assert proc.returncode == 2 and "search_space <inline>, entry 'lr': unknown setting" in proc.stderr, proc.stderr


def test_two_workers_on_postgres_share_trials_and_recover_a_killed_one(tiny_data, tiny_model, tmp_path,
                                                                        postgres_url):
    env = store_env(tmp_path)
    args = optuna_args(tiny_data, tiny_model, tmp_path, optuna_storage=postgres_url, n_trials=0,
                       heartbeat_interval=1, grace_period=3)
    created = run_entrypoint("optuna_search", args, env, tmp_path)  # create study and parent once
    assert created.returncode == 0, created.stderr[-3000:]
    work = {**args, "n_trials": 6, "resume": "true"}
    doomed = subprocess.Popen(entrypoint("optuna_search", work), cwd=tmp_path,
                              env={**env, "PIPELINES_FAILPOINT": "checkpoint_committed:3"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    survivor = subprocess.Popen(entrypoint("optuna_search", work), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, doomed_err = doomed.communicate(timeout=600)
    _, survivor_err = survivor.communicate(timeout=600)
    assert doomed.returncode == -signal.SIGKILL, doomed_err[-3000:]
    assert survivor.returncode == 0, survivor_err[-3000:]
    (parent,) = parents(env, "hpo", "optuna")
    runs = trial_runs(env, "hpo", parent.info.run_id)
    assert sorted(runs, key=int) == ["0", "1", "2", "3", "4", "5"]
    study = optuna.load_study(study_name=parent.data.tags["optuna_study"], storage=postgres_url)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    retried = {t.system_attrs["retry_history"][-1] for t in study.trials if "retry_history" in t.system_attrs}
    assert failed, "the killed worker left no failed attempt"
    assert {t.number for t in failed} <= retried  # only the killed worker's attempt failed, and it was retried
    originals = [t for t in study.trials if "failed_trial" not in t.system_attrs]
    assert [t.user_attrs["logical_number"] for t in originals] == [0, 1, 2, 3, 4, 5]  # no surplus trial, no hole
    logical = sorted(t.user_attrs["logical_number"] for t in study.trials if t.state.is_finished()
                     and t.state != optuna.trial.TrialState.FAIL)
    assert logical == [0, 1, 2, 3, 4, 5]
    table = pd.read_csv(io.StringIO(artifact_text(env, parent.info.run_id, "trials.csv", tmp_path / "t")))
    assert len(table) == 6 and set(table["state"]) == {"COMPLETE"}


RAISING_SPACE = """
learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
batch_size: {type: categorical, choices: [8, 16]}
"""


def test_three_workers_finish_n_trials_with_a_trial_that_always_raises(tiny_data, tiny_model, tmp_path,
                                                                        postgres_url):
    env = store_env(tmp_path)
    # seed 7 proposes batch_size=16 for logical trials 0, 2, 3, ...: those always raise
    # started together on a fresh database: no create-first step
    storage = fresh_database(postgres_url)
    args = optuna_args(tiny_data, tiny_model, tmp_path, optuna_storage=storage, n_trials=0,
                       epochs=1, search_space=RAISING_SPACE, heartbeat_interval=1, grace_period=3)
    work = {**args, "n_trials": 6, "max_retries": 1, "resume": "true"}
    workers = [subprocess.Popen(entrypoint("optuna_search", work), cwd=tmp_path,
                                env={**env, "PIPELINES_RAISE_IF": "batch_size=16"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [worker.communicate(timeout=600)[1] for worker in workers]
    for worker, err in zip(workers, errors):
        assert worker.returncode == 0, err[-3000:]
    (parent,) = parents(env, "hpo", "optuna")
    assert parent.info.status == "FINISHED"

    study = optuna.load_study(study_name=parent.data.tags["optuna_study"], storage=storage)
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] + states["PRUNED"] == 6 and states["RUNNING"] == states["WAITING"] == 0, states
    by_number = {t.number: t for t in study.trials}
    originals = [t for t in study.trials if "failed_trial" not in t.system_attrs]
    assert [t.user_attrs["logical_number"] for t in originals] == list(range(len(originals)))  # unique, no hole
    attempts: dict[int, list] = {}
    for t in study.trials:  # a retry keeps its original's number and parameters
        original = by_number[t.system_attrs.get("failed_trial", t.number)]
        assert t.user_attrs["logical_number"] == original.user_attrs["logical_number"] and t.params == original.params
        attempts.setdefault(t.user_attrs["logical_number"], []).append(t)
    failed = {n for n, tries in attempts.items() if tries[-1].state.name == "FAIL"}
    assert failed, "no trial drew batch_size=16"
    for number, tries in attempts.items():
        if number in failed:  # tried once, retried max_retries=1 times, then its number stays used
            assert [t.state.name for t in tries] == ["FAIL", "FAIL"] and tries[0].params["batch_size"] == 16
            assert all(t.user_attrs["error"].startswith("RuntimeError: PIPELINES_RAISE_IF=batch_size=16")
                       for t in tries)
        else:
            assert [t.state.name for t in tries] == ["COMPLETE"] and tries[0].params["batch_size"] == 8

    runs = trial_runs(env, "hpo", parent.info.run_id)  # one run per logical trial, shared by its attempts
    assert sorted(runs, key=int) == [str(n) for n in range(len(originals))]
    for number, run in runs.items():
        if int(number) in failed:
            assert run.info.status == "FAILED" and run.data.tags["failed_attempts"] == "2"
            assert run.data.tags["error"].startswith("RuntimeError: PIPELINES_RAISE_IF=batch_size=16")
        else:
            assert run.info.status == "FINISHED" and "error" not in run.data.tags
    table = trials_table(env, parent.info.run_id, tmp_path / "t")
    assert table["number"].tolist() == list(range(len(originals)))
    assert set(table.loc[table["state"] == "FAIL", "number"]) == failed
    assert table.loc[table["state"] == "FAIL", "error"].str.startswith("RuntimeError").all()
    assert (table["state"] == "COMPLETE").sum() == 6


def test_resume_false_starts_a_new_study(tiny_data, tiny_model, tmp_path):
    env = store_env(tmp_path)
    args = optuna_args(tiny_data, tiny_model, tmp_path, n_trials=1, epochs=1)
    for _ in range(2):
        proc = run_entrypoint("optuna_search", args, env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = parents(env, "hpo", "optuna")
    assert first.data.tags["optuna_study"] != second.data.tags["optuna_study"]
    assert "an unfinished optuna run" not in proc.stderr
    for run in (first, second):  # each search ran its own single trial, numbered 0
        assert trials_table(env, run.info.run_id, tmp_path / run.info.run_id)["number"].tolist() == [0]
