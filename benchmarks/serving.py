"""Serving throughput and latency of the registered ensemble vs. a naive per-request-loading ensemble.

Members are MiniLM-L6 classifiers (22.7M parameters each, 4 classes, max_length 64; their heads are
freshly initialised: the weights' values do not change the cost). For 1 and 5 members, each model
is logged as a pyfunc, served with a real `mlflow models serve` process, and timed over HTTP with
batches of 1 and 64 texts: rows/s, p50 and p95 latency per request.  The naive baseline loads
every member from disk inside each request, as hand-written ensemble code often does.

    python benchmarks/serving.py [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipelines.config import DEFAULT_MODEL
from pipelines.models import resolve_model
from pipelines.serving import SPEC, EnsembleModel, prediction_frame
from pipelines.tracking import log_pyfunc, register_model, set_alias

LABELS = ["computers", "politics", "science", "work"]
TEXTS = pd.read_csv(Path(__file__).resolve().parent.parent / "data" / "fortunes_4class.csv")["text"].tolist()


class NaiveEnsemble(mlflow.pyfunc.PythonModel):
    """Loads each member from disk inside every request (the baseline)."""

    def load_context(self, context):
        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.paths = {m["name"]: context.artifacts[m["name"]] for m in self.spec["members"]}

    def predict(self, context, model_input, params=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        texts = model_input["text"].tolist()
        total = 0
        for member in self.spec["members"]:
            tokenizer = AutoTokenizer.from_pretrained(self.paths[member["name"]])
            model = AutoModelForSequenceClassification.from_pretrained(self.paths[member["name"]])
            with torch.no_grad():
                batch = tokenizer(texts, truncation=True, max_length=member["max_length"], padding=True,
                                  return_tensors="pt")
                total = total + member["weight"] * torch.softmax(model(**batch).logits.double(), -1).numpy()
        return prediction_frame(total, self.spec["labels"])


def make_members(base: str, n: int, folder: Path) -> list[dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    members = []
    for i in range(n):
        set_seed(i)
        path = folder / f"member-{i}"
        AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={name: j for j, name in enumerate(LABELS)}).save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
        members.append({"name": f"member-{i}", "run_id": "benchmark", "weight": 1 / n, "max_length": 64,
                        "path": str(path)})
    return members


def register(model, name: str, members: list[dict], folder: Path) -> None:
    spec = {"labels": LABELS, "batch_size": 64,
            "members": [{k: m[k] for k in ("name", "run_id", "weight", "max_length")} for m in members]}
    spec_path = folder / f"{name}-{SPEC}"
    spec_path.write_text(json.dumps(spec))
    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().get_experiment_by_name("Default")
                                              .experiment_id).info.run_id
    example = pd.DataFrame({"text": ["an example"]})
    output = prediction_frame(np.full((1, len(LABELS)), 0.25), LABELS)
    uri = log_pyfunc(run_id, model, {"spec": str(spec_path), **{m["name"]: m["path"] for m in members}}, example,
                     output, code_paths=[str(Path(__file__).resolve().parent.parent / "pipelines")])
    set_alias(name, "bench", register_model(uri, name))


def serve(name: str, env: dict) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{name}@bench", "--env-manager", "local",
                               "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return server, port
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server for {name} did not start")


def time_requests(port: int, batch: int, requests: int) -> tuple[float, float, float]:
    latencies = []
    for r in range(requests + 1):
        texts = TEXTS[(r * batch) % 1900:(r * batch) % 1900 + batch]
        body = json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            assert response.status == 200
            response.read()
        if r:  # the first request warms up
            latencies.append(time.perf_counter() - start)
    rows_per_s = batch * len(latencies) / sum(latencies)
    return rows_per_s, statistics.median(latencies), float(np.percentile(latencies, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}
        os.environ.update(env)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        base = resolve_model(DEFAULT_MODEL, folder).path
        members = make_members(base, 5, folder)
        print(f"{'model':<22} {'batch':>5} {'rows/s':>8} {'p50 ms':>8} {'p95 ms':>8}", flush=True)
        for n in (1, 5):
            for kind, model in (("ensemble", EnsembleModel()), ("naive", NaiveEnsemble())):
                name = f"{kind}-{n}"
                register(model, name, members[:n], folder)
                server, port = serve(name, env)
                try:
                    for batch in (1, 64):
                        count = opts.requests if kind == "ensemble" else max(3, opts.requests // 4)
                        rows, p50, p95 = time_requests(port, batch, count)
                        print(f"{name + f' ({n} member' + ('s' if n > 1 else '') + ')':<22} {batch:>5} "
                              f"{rows:8.1f} {p50 * 1000:8.0f} {p95 * 1000:8.0f}", flush=True)
                finally:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait()


if __name__ == "__main__":
    sys.exit(main())
