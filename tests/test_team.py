"""The team stack with real servers: PostgreSQL (MLflow backend, Optuna studies, leases), SeaweedFS S3 (artifacts,
proxied by the MLflow server) and an MLflow tracking server, all started by ``scripts/team_stack.sh``.

Workers run the README's commands (``mlflow run . -e STAGE --env-manager local ...``) on "machines": copies of
the working tree with their own HOME, TMPDIR and host name (when ``unshare --uts`` is allowed), given only
MLFLOW_TRACKING_URI and the Optuna storage URL: no S3 keys, no shared folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import helpers
import pandas as pd
import pytest
from conftest import entrypoint
from team_stack import Machine, Stack, can_set_hostname, make_machine, missing_programs, script, start_stack

pytestmark = [pytest.mark.team, pytest.mark.slow]

K, EPOCHS, BATCH = 3, 2, 8
STEPS_PER_EPOCH = 80 // BATCH  # 120 rows, 3 folds: 80 training rows per fold
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    missing = missing_programs()
    if missing:
        message = "team stack: missing " + "; ".join(missing)
        if os.environ.get("PIPELINES_REQUIRE_POSTGRES") or os.environ.get("PIPELINES_REQUIRE_TEAM"):
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("team") / "stack"
    try:
        started = start_stack(folder)
        TIMINGS["stack_start_s"] = started.start_seconds
        yield started
    finally:
        stopped = script("purge", folder)  # stop all three, delete their data (PostgreSQL's may be in /tmp)
        if TIMINGS:
            print("\nteam stack timings: " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))
            out = os.environ.get("PIPELINES_TEAM_TIMINGS")
            if out:
                Path(out).write_text(json.dumps(TIMINGS, indent=1))
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def hostname_ok() -> bool:
    return can_set_hostname()


def env_of(stack: Stack) -> dict:
    return {"MLFLOW_TRACKING_URI": stack.tracking_uri}


def client(stack: Stack):
    return helpers.client(env_of(stack))


def experiment_runs(stack: Stack, experiment: str, filter_string: str = "") -> list:
    return helpers.runs(env_of(stack), experiment, filter_string)


def children(stack: Stack, experiment: str, parent_id: str) -> list:
    return helpers.children(env_of(stack), experiment, parent_id)


def artifact_files(stack: Stack, run_id: str, path: str = "") -> list:
    c, files = client(stack), []
    for info in c.list_artifacts(run_id, path or None):
        files += artifact_files(stack, run_id, info.path) if info.is_dir else [info]
    return files


def artifact_text(stack: Stack, run_id: str, path: str, dst: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(stack.tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))).read_text()


def starts(log: str) -> list[int]:
    """The step at which each training of the process started (``training starts at step N`` log lines)."""
    return [int(m) for m in re.findall(r"training starts at step (\d+) ", log)]


def checkpoint_uploads(log: str) -> list[tuple[str, str]]:
    return re.findall(r"checkpoint uploaded run=(\w+) path=checkpoints/(checkpoint-\d+) ", log)


def checkpoint_dirs(stack: Stack, run) -> dict[str, list[str]]:
    """The checkpoint folders of ``run`` that have objects in the bucket: name -> file names."""
    prefix = stack.run_prefix(run) + "checkpoints/"
    found: dict[str, list[str]] = {}
    for key in stack.objects(prefix):
        name, _, rest = key.removeprefix(prefix).partition("/")
        found.setdefault(name, []).append(rest)
    return found


def kfold_params(machine: Machine, stack: Stack) -> dict:
    return dict(data=machine.inputs["data"], text_column="text", label_column="label", model=machine.inputs["model"],
                k_folds=K, epochs=EPOCHS, batch_size=BATCH, max_length=32, learning_rate=1e-3, seed=42,
                optuna_storage=stack.optuna_storage, heartbeat_interval=1, grace_period=3, resume="true")


def cv_result(stack: Stack, experiment: str, dst: Path) -> dict:
    (parent,) = experiment_runs(stack, experiment, "tags.stage = 'kfold'")
    return {
        "parent": parent,
        "oof": artifact_text(stack, parent.info.run_id, "oof_predictions.csv", dst),
        "cv": {k: v for k, v in parent.data.metrics.items() if k.startswith(("cv_", "fold"))},
        # the parent's children: one run per fold, and the `mlflow run` launcher run of each invocation
        "folds": {r.data.tags["fold"]: r for r in children(stack, experiment, parent.info.run_id)
                  if "fold" in r.data.tags},
        "launchers": [r for r in children(stack, experiment, parent.info.run_id) if "fold" not in r.data.tags],
    }


def test_kfold_killed_on_machine_a_resumes_on_machine_b_through_the_server(stack, tiny_data, tiny_model,
                                                                           tmp_path, hostname_ok):
    inputs = {"data": tiny_data, "model": tiny_model}

    # the uninterrupted reference, the same command on a third machine (another experiment)
    reference = make_machine(tmp_path, "machine-ref", stack, inputs, hostname_ok)
    began = time.perf_counter()
    done = reference.run(reference.mlflow_run("kfold", "cv-reference", kfold_params(reference, stack)))
    TIMINGS["kfold_uninterrupted_s"] = time.perf_counter() - began
    (tmp_path / "reference.log").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = cv_result(stack, "cv-reference", tmp_path / "ref")

    # machine A: its copy of the project must be the one imported
    a = make_machine(tmp_path, "machine-a", stack, inputs, hostname_ok)
    probe = a.run([sys.executable, "-c", "import pipelines; print(pipelines.__file__)"])
    assert probe.stdout.strip().startswith(str(a.root)), probe.stdout + probe.stderr
    # killed (SIGKILL) in fold 1, epoch 2, three steps after its epoch-1 checkpoint went to S3
    step = EPOCHS * STEPS_PER_EPOCH + STEPS_PER_EPOCH + 3
    began = time.perf_counter()
    killed = a.run(a.mlflow_run("kfold", "cv", kfold_params(a, stack)), {"PIPELINES_FAILPOINT": f"train_step:{step}"})
    TIMINGS["kfold_machine_a_until_kill_s"] = time.perf_counter() - began
    (tmp_path / "machine-a.log").write_text(killed.stderr)
    assert killed.returncode != 0 and "failpoint train_step reached" in killed.stderr, killed.stderr[-3000:]
    (parent,) = experiment_runs(stack, "cv", "tags.stage = 'kfold'")
    before = {r.data.tags["fold"]: r for r in children(stack, "cv", parent.info.run_id) if "fold" in r.data.tags}
    assert before["0"].info.status == "FINISHED" and before["1"].info.status == "RUNNING"
    assert before["1"].data.tags["checkpoint"] == f"checkpoints/checkpoint-{STEPS_PER_EPOCH}"
    # the checkpoint B needs is in the bucket, manifest last; fold 0's uploaded checkpoints were deleted from it
    assert "manifest.json" in checkpoint_dirs(stack, before["1"])[f"checkpoint-{STEPS_PER_EPOCH}"]
    fold0_uploads = {name for run_id, name in checkpoint_uploads(killed.stderr) if run_id == before["0"].info.run_id}
    assert fold0_uploads == {f"checkpoint-{STEPS_PER_EPOCH}", f"checkpoint-{2 * STEPS_PER_EPOCH}"}
    assert checkpoint_dirs(stack, before["0"]) == {}, "a finished fold's checkpoints are still in the bucket"
    assert a.local_stores() == [], "machine A wrote a local store"
    shutil.rmtree(a.root)  # the machine is gone: its disk, HOME, TMPDIR (the Trainer's local checkpoints) with it

    # machine B: the same command
    b = make_machine(tmp_path, "machine-b", stack, inputs, hostname_ok)
    began = time.perf_counter()
    resumed = b.run(b.mlflow_run("kfold", "cv", kfold_params(b, stack)))
    TIMINGS["kfold_resume_on_machine_b_s"] = time.perf_counter() - began
    log = resumed.stderr
    (tmp_path / "machine-b.log").write_text(log)
    assert resumed.returncode == 0, log[-3000:]
    assert f"resuming kfold run {parent.info.run_id}" in log
    assert "folds 0 finished, fold 1 from epoch 1 checkpoint" in log and "2 folds to go" in log
    # fold 1's lease was machine A's: taken over once its heartbeat was older than grace_period
    assert re.search(rf"lease taken over scope={parent.info.run_id} unit=fold-1 .* previous_owner={a.hostname}:",
                     log), log[-3000:]
    # fold 1 continued at its checkpoint's step, fold 2 from scratch, fold 0 was not trained at all
    assert starts(log) == [STEPS_PER_EPOCH, 0]
    assert "fold 1/3:" not in log and "fold 2/3:" in log and "fold 3/3:" in log

    result = cv_result(stack, "cv", tmp_path / "b")
    assert result["parent"].info.run_id == parent.info.run_id and result["parent"].info.status == "FINISHED"
    assert sorted(result["folds"]) == ["0", "1", "2"], "one run per fold"
    assert len(result["launchers"]) == 2, "a launcher run per `mlflow run` (A's and B's)"
    assert result["folds"]["0"].info.run_id == before["0"].info.run_id
    assert result["folds"]["0"].info.end_time == before["0"].info.end_time, "fold 0 was retrained"
    assert result["folds"]["1"].info.run_id == before["1"].info.run_id
    c = client(stack)
    for run in [result["parent"], *result["folds"].values()]:
        for key in run.data.metrics:
            steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"metric {key} of run {run.info.run_id} logged a step twice"
    assert result["oof"] == expected["oof"]
    assert result["cv"] == expected["cv"] and len(result["cv"]) >= 2 * K

    # every run (launchers included) ended, and every artifact it has is an object in the bucket
    everything = experiment_runs(stack, "cv")
    assert [r.info.status for r in everything if r.info.status == "RUNNING"] == []
    bucket = stack.objects()
    n_files = 0
    for run in everything:
        prefix = stack.run_prefix(run)
        for info in artifact_files(stack, run.info.run_id):
            assert bucket.get(prefix + info.path) == info.file_size, f"{prefix + info.path} not in the bucket"
            n_files += 1
        assert checkpoint_dirs(stack, run) == {}, f"run {run.info.run_id} left checkpoints in the bucket"
    weights = [key for key in bucket if key.startswith(f"mlflow/{parent.info.experiment_id}/")
               and key.endswith(".safetensors")]  # the folds' models
    assert n_files >= 10 and len(weights) >= K, (n_files, weights)
    assert b.local_stores() == [], "machine B wrote a local store"
    # the database password (PGPASSWORD, never in a URL) is in no param, tag, recorded config or log
    secret = stack.env["PGPASSWORD"]
    for run in everything:
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in v], run.info.run_id
    assert secret not in artifact_text(stack, parent.info.run_id, "config.json", tmp_path / "config")
    assert secret not in killed.stderr + log


def test_two_workers_share_an_optuna_search_through_the_server(stack, tiny_data, tiny_model, tmp_path, hostname_ok):
    import optuna

    n_trials = 4
    workers = [make_machine(tmp_path, f"worker-{i}", stack, {"data": tiny_data, "model": tiny_model}, hostname_ok)
               for i in (1, 2)]
    for w in workers:
        (w.root / "space.yaml").write_text("learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                           "batch_size: {type: categorical, choices: [8, 16]}\n")

    def params(w: Machine) -> dict:
        return dict(data=w.inputs["data"], model=w.inputs["model"], n_trials=n_trials, epochs=1, max_length=32,
                    seed=7, search_space="space.yaml", pruner="none", optuna_storage=stack.optuna_storage,
                    heartbeat_interval=2, grace_period=20, resume="true")

    # `mlflow run` itself creates a missing experiment without handling the race (mlflow/mlflow#4123): two
    # started at the same instant on a new experiment, one fails with RESOURCE_ALREADY_EXISTS. Create it once.
    created = workers[0].run([sys.executable, "-m", "mlflow", "experiments", "create", "--experiment-name", "hpo"])
    assert created.returncode == 0, created.stderr[-3000:]
    began = time.perf_counter()
    procs = [w.popen(w.mlflow_run("optuna", "hpo", params(w))) for w in workers]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    TIMINGS["optuna_two_workers_s"] = time.perf_counter() - began
    for w, log in zip(workers, logs):
        (tmp_path / f"{w.name}.log").write_text(log)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    trained = [[int(n) for n in re.findall(r"\btrial (\d+) \(optuna #\d+;", log)] for log in logs]
    assert all(trained), f"a worker did no trial: {trained}"
    assert sorted(trained[0] + trained[1]) == list(range(n_trials)), f"trials twice or missing: {trained}"

    (parent,) = experiment_runs(stack, "hpo", "tags.stage = 'optuna'")  # one parent for both workers
    assert parent.info.status == "FINISHED"
    trial_runs = [r.data.tags["trial"] for r in children(stack, "hpo", parent.info.run_id) if "trial" in r.data.tags]
    assert sorted(trial_runs, key=int) == [str(n) for n in range(n_trials)], "one MLflow run per trial"
    study = optuna.load_study(study_name=parent.data.tags["optuna_study"], storage=stack.optuna_storage_for_tests())
    states = Counter(t.state.name for t in study.trials)
    assert states == Counter({"COMPLETE": n_trials}), states
    numbers = [t.user_attrs["logical_number"] for t in study.trials]
    assert sorted(numbers) == list(range(n_trials)), f"duplicate trial numbers: {numbers}"
    table = pd.read_csv(io.StringIO(artifact_text(stack, parent.info.run_id, "trials.csv", tmp_path / "t")))
    assert table["number"].tolist() == list(range(n_trials)) and set(table["state"]) == {"COMPLETE"}
    assert stack.objects(stack.run_prefix(parent) + "trials.csv"), "trials.csv is not in the bucket"
    assert all(w.local_stores() == [] for w in workers)


def test_checkpoint_retention_deletes_objects_from_the_bucket(stack, tiny_data, tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PIPELINES_"))}
    env.update(MLFLOW_TRACKING_URI=stack.tracking_uri, PGPASSWORD=stack.env["PGPASSWORD"],
               MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false", PIPELINES_LOG_LEVEL="INFO",
               OMP_NUM_THREADS="1")
    args = dict(data=tiny_data, model=tiny_model, epochs=3, batch_size=8, max_length=32, learning_rate=1e-3,
                seed=42, experiment_name="retention", optuna_storage=stack.optuna_storage, heartbeat_interval=1,
                grace_period=3)
    # killed right after the third checkpoint was committed, i.e. after the first prune that must delete one
    began = time.perf_counter()
    killed = subprocess.run(entrypoint("train", args), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**env, "PIPELINES_FAILPOINT": "checkpoint_committed:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    uploads = checkpoint_uploads(killed.stderr)
    assert len(uploads) == 3 and len({run_id for run_id, _ in uploads}) == 1, uploads
    run = client(stack).get_run(uploads[0][0])
    latest = uploads[-1][1]
    assert run.data.tags["checkpoint"] == f"checkpoints/{latest}"
    kept = checkpoint_dirs(stack, run)
    assert latest in kept and "manifest.json" in kept[latest]
    state_key = stack.run_prefix(run) + f"checkpoints/{latest}/trainer_state.json"
    state = json.loads(stack.s3().get_object(Bucket=stack.env["TEAM_S3_BUCKET"], Key=state_key)["Body"].read())
    best = state.get("best_model_checkpoint")
    expected = {latest} | ({Path(best).name} if best else set())
    assert set(kept) == expected, f"kept {sorted(kept)}, the retention keeps latest and best: {sorted(expected)}"
    assert {name for _, name in uploads} - set(kept), "nothing was pruned"

    # finishing the unit deletes every checkpoint; the model stays
    resumed = subprocess.run(entrypoint("train", {**args, "resume": "true"}), cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=env)
    TIMINGS["train_retention_kill_and_resume_s"] = time.perf_counter() - began
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert starts(resumed.stderr) in ([], [int(latest.split("-")[1])])  # from the third checkpoint, if at all
    run = client(stack).get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "checkpoint" not in run.data.tags
    assert checkpoint_dirs(stack, run) == {}
    assert any(key.endswith(".safetensors") for key in stack.objects(stack.run_prefix(run)))
