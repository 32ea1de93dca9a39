"""Resume overhead of `kfold`: time from process start to the first new training step, 1 of 3 folds done.

Runs the README demo settings (MiniLM, bundled data, 3 folds, 1 epoch, max_length 64) in a fresh
SQLite store, SIGKILLs the process as soon as fold 2/3 starts, resumes with resume=true and
measures how long the resumed process takes to reach training.  Prints the figures.

    python benchmarks/resume_overhead.py [--epochs 1] [--max_samples 0] [--finish]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], env: dict, cwd: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "entrypoints" / "kfold.py"), *args]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, needle: str, t0: float) -> float:
    for line in proc.stderr:
        if needle in line:
            return time.perf_counter() - t0
    raise RuntimeError(f"process ended before logging {needle!r} (exit {proc.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--max_samples", default="0")
    parser.add_argument("--finish", action="store_true", help="let the resumed run finish and time it")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_RUN_ID", None)
        args = ["--k_folds", "3", "--epochs", opts.epochs, "--max_length", "64", "--max_samples", opts.max_samples,
                "--experiment_name", "bench"]

        t0 = time.perf_counter()
        first = start(args, env, tmp)
        first_step = wait_for(first, "training starts at step 0", t0)
        fold_start = wait_for(first, "fold 2/3:", t0)
        first.send_signal(signal.SIGKILL)
        first.wait()
        print(f"fresh start: first training step after {first_step:.1f} s")
        print(f"fold 0: {fold_start - first_step:.1f} s from its first step to fold 1's start (train + eval + upload)")

        t0 = time.perf_counter()
        resumed = start([*args, "--resume", "true"], env, tmp)
        overhead = wait_for(resumed, "training starts at step", t0)
        print(f"resume overhead (1 of 3 folds finished): first new training step after {overhead:.1f} s")
        if opts.finish:
            resumed.communicate()
            print(f"resumed run finished in {time.perf_counter() - t0:.1f} s (exit {resumed.returncode})")
        else:
            resumed.send_signal(signal.SIGTERM)
            resumed.communicate()


if __name__ == "__main__":
    main()
