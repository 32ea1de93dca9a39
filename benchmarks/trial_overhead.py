"""Per-trial time outside the training loop (Optuna storage + MLflow tracking + checkpoints) vs. training time.

Runs a small `optuna` search (default: MiniLM, 400 rows, 2 epochs, 3 trials, no pruning) in a
fresh SQLite tracking store and Optuna storage, then prints per trial: wall time of the trial
run, the Trainer's training loop (train_runtime, which includes evaluation and the save hook),
the checkpoint uploads (in a background thread, overlapping the loop: not added to the rest), and
everything else outside the loop (model load, run bookkeeping, final predictions, plots, Optuna
storage) as a share of the wall time. Model load and predictions are work a bare Trainer does too:
`overhead.py` compares against one.

    python benchmarks/trial_overhead.py [--model PATH] [--max_samples 400] [--epochs 2] [--n_trials 3]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--max_samples", default="400")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--n_trials", default="3")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_RUN_ID", None)
        cmd = [sys.executable, str(ROOT / "entrypoints" / "optuna_search.py"), "--model", opts.model,
               "--max_samples", opts.max_samples, "--epochs", opts.epochs, "--n_trials", opts.n_trials,
               "--max_length", "64", "--pruner", "none", "--experiment_name", "bench",
               "--optuna_storage", f"sqlite:///{tmp}/optuna.db"]
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        uploads: dict[str, float] = {}
        for run_id, seconds in re.findall(r"checkpoint uploaded run=(\w+) .* seconds=([\d.]+)", proc.stderr):
            uploads[run_id] = uploads.get(run_id, 0.0) + float(seconds)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("bench")
        trials = client.search_runs([exp.experiment_id], "tags.trial != ''", order_by=["attributes.start_time ASC"])
        print(f"{'trial':>5} {'wall s':>8} {'train loop s':>13} {'ckpt upload s':>14} {'other s':>8} {'other %':>8}")
        for run in trials:
            wall = (run.info.end_time - run.info.start_time) / 1000
            loop = run.data.metrics["train_runtime"]
            upload = uploads.get(run.info.run_id, 0.0)
            other = wall - loop
            print(f"{run.data.tags['trial']:>5} {wall:8.1f} {loop:13.1f} {upload:14.1f} {other:8.1f} "
                  f"{other / wall * 100:7.1f}%")


if __name__ == "__main__":
    main()
