"""Reading a real tracking store back in tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def client(env: dict) -> MlflowClient:
    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def runs(env: dict, experiment: str, filter_string: str = "") -> list:
    c = client(env)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return c.search_runs([exp.experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"])


def parents(env: dict, experiment: str, stage: str) -> list:
    return runs(env, experiment, f"tags.stage = '{stage}'")


def children(env: dict, experiment: str, parent_id: str) -> list:
    return runs(env, experiment, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def artifact_text(env: dict, run_id: str, path: str, dst: Path) -> str:
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))
    return Path(local).read_text()


def artifact_frame(env: dict, run_id: str, path: str, dst: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def metric_steps(env: dict, run_id: str) -> dict[str, list[int]]:
    c = client(env)
    return {k: [m.step for m in c.get_metric_history(run_id, k)] for k in c.get_run(run_id).data.metrics}


def mlflow_run(env, cwd, entry: str, args: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """The interface users type: `mlflow run . -e ENTRY --experiment-name E -P k=v ...`."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", args["experiment_name"]]
    for key, value in args.items():
        if key != "experiment_name":
            cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(env: dict, model_uri: str, cwd: Path, timeout: float = 120):
    """`mlflow models serve -m model_uri` (this environment's mlflow, --env-manager local) on a free port of
    127.0.0.1, once it answers /ping: yields the port; the server (its process group) is stopped after."""
    port, bin_dir, log = free_port(), Path(sys.executable).parent, Path(cwd) / f"serve-{time.monotonic_ns()}.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
                                   "local", "--host", "127.0.0.1", "-p", str(port)],
                                  env={**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}, cwd=cwd,
                                  stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)

    def up() -> bool:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return True
        except OSError:
            return False

    try:
        assert wait_until(up, timeout), f"{model_uri} not served within {timeout} s: {log.read_text()[-3000:]}"
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def wait_until(predicate, timeout: float) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_together(target, workers: int, timeout: float = 120) -> None:
    """``workers`` threads running ``target`` at once, joined."""
    threads = [threading.Thread(target=target) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
