"""`ensemble`, `predict`, `retrain` and serving: real runs, a real registry, real HTTP to `mlflow models serve`."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_entrypoint, store_env
from helpers import artifact_text, children, client, parents
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.slow
TEXTS = ["The computer crashed again.", "Vote for the senator!", "Atoms are mostly empty space.", "x"]


@pytest.fixture(scope="module")
def cv(tiny_data, tiny_model, tmp_path_factory):
    """Two finished 3-fold kfold runs (different seeds) in one store."""
    folder = tmp_path_factory.mktemp("ensemble-store")
    env = store_env(folder)
    for seed in (1, 2):
        args = dict(data=tiny_data, model=tiny_model, k_folds=3, epochs=2, max_length=32, learning_rate=1e-3,
                    seed=seed, early_stopping_patience=1, experiment_name="ens")
        proc = run_entrypoint("kfold", args, env, folder)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = parents(env, "ens", "kfold")
    return {"env": env, "folder": folder, "a": runs[0], "b": runs[1]}


def ensemble(cv, name, *sources, **extra):
    args = {"source_runs": ",".join(s.info.run_id for s in sources), "registered_model_name": name,
            "experiment_name": "ens", **extra}
    return run_entrypoint("ensemble", args, cv["env"], cv["folder"])


def independent_average(env, fold_runs, weights, texts, tmp) -> np.ndarray:
    """Soft vote computed here, from the fold models' own artifacts, without pipelines' inference code."""
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    total = 0
    for run, weight in zip(fold_runs, weights):
        path = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp / run.info.run_id))
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
        with torch.no_grad():
            logits = model(**tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")).logits
        total = total + weight * torch.softmax(logits.double(), dim=-1).numpy()
    return total


def test_registered_ensemble_equals_independent_weighted_average(cv, tmp_path):
    proc = ensemble(cv, "single", cv["a"], weights="score")
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = cv["env"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/single@champion")
    out = model.predict(pd.DataFrame({"text": TEXTS}))
    folds = sorted(children(env, "ens", cv["a"].info.run_id), key=lambda r: int(r.data.tags["fold"]))
    expected = independent_average(env, folds, [1 / 3] * 3, TEXTS, tmp_path)
    got = out[["prob_computers", "prob_politics", "prob_science"]].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert out["label"].tolist() == [["computers", "politics", "science"][i] for i in expected.argmax(axis=1)]

    (run,) = parents(env, "ens", "ensemble")
    assert run.data.tags["member_runs"] == ",".join(r.info.run_id for r in folds)
    assert run.data.tags["source_fingerprints"] == cv["a"].data.tags["fingerprint"]
    assert run.data.tags["data_digests"] == cv["a"].data.tags["data_digest"]
    oof = pd.read_csv(io.StringIO(artifact_text(env, cv["a"].info.run_id, "oof_predictions.csv", tmp_path / "oof")))
    assert run.data.metrics["ensemble_f1_macro"] == f1_score(oof["label"], oof["predicted"], average="macro")
    assert client(env).get_model_version_by_alias("single", "champion").run_id == run.info.run_id


def test_score_weights_are_normalised_metrics_and_optimized_is_reported_honestly(cv):
    a, b = cv["a"], cv["b"]
    proc = ensemble(cv, "pair", a, b, weights="score")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = parents(cv["env"], "ens", "ensemble")[-1]
    sa, sb = a.data.metrics["cv_f1_macro_mean"], b.data.metrics["cv_f1_macro_mean"]
    assert float(run.data.params[f"weight_{a.info.run_id}"]) == round(sa / (sa + sb), 6)
    assert float(run.data.params[f"weight_{b.info.run_id}"]) == round(sb / (sa + sb), 6)

    proc = ensemble(cv, "pair", a, b, weights="optimized")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = parents(cv["env"], "ens", "ensemble")[-1]
    m = run.data.metrics
    assert m["fit_optimized_f1_macro"] >= m["fit_equal_f1_macro"]
    for name in ("heldout_optimized_f1_macro", "heldout_score_f1_macro", "heldout_equal_f1_macro",
                 "source0_f1_macro", "source1_f1_macro", "ensemble_f1_macro"):
        assert 0.0 <= m[name] <= 1.0
    assert str(client(cv["env"]).get_model_version_by_alias("pair", "champion").version) == "2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes, content_type="application/json") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_mlflow_models_serve_answers_good_and_malformed_requests(cv):
    assert ensemble(cv, "served", cv["a"], weights="equal").returncode == 0
    port = _free_port()
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
                               "--host", "127.0.0.1", "-p", str(port)], env=cv["env"], cwd=cv["folder"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.5)
        status, body = _post(port, json.dumps({"dataframe_records": [{"text": t} for t in TEXTS]}).encode())
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == len(TEXTS)
        assert set(predictions[0]) == {"label", "prob_computers", "prob_politics", "prob_science"}
        assert abs(sum(v for k, v in predictions[0].items() if k.startswith("prob_")) - 1) < 1e-6
        split = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
        assert json.loads(_post(port, json.dumps(split).encode())[1])["predictions"] == predictions
        status, body = _post(port, ("text\n" + "\n".join(TEXTS)).encode(), "text/csv")
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == predictions[0]["label"]

        for bad in ({"dataframe_records": [{"body": "no text column"}]},
                    {"dataframe_records": [{"text": 42}]},
                    {"dataframe_records": []}):
            status, body = _post(port, json.dumps(bad).encode())
            assert 400 <= status < 500, (bad, status, body)
        assert _post(port, json.dumps({"dataframe_records": [{"text": "still up"}]}).encode())[0] == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_predict_killed_then_resumed_gives_identical_output(cv, tiny_data, tmp_path):
    assert ensemble(cv, "batch", cv["a"], weights="equal").returncode == 0
    env, folder = cv["env"], cv["folder"]
    args = {"model_uri": "models:/batch@champion", "data": tiny_data, "shard_size": 40}
    reference = run_entrypoint("predict", {**args, "experiment_name": "pred-ref", "output": tmp_path / "ref.csv"},
                               env, folder)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = run_entrypoint("predict", {**args, "experiment_name": "pred"},
                            {**env, "PIPELINES_FAILPOINT": "predict_shard:2"}, folder)
    assert killed.returncode == -signal.SIGKILL
    (run,) = parents(env, "pred", "predict")
    shard0 = Path(run.info.artifact_uri.removeprefix("file://")) / "shards" / "shard-00000.csv"
    stamp = shard0.stat().st_mtime_ns
    resumed = run_entrypoint("predict", {**args, "experiment_name": "pred", "resume": "true",
                                         "output": tmp_path / "out.csv"}, env, folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2/3 shards done" in resumed.stderr
    assert shard0.stat().st_mtime_ns == stamp, "a finished shard was recomputed"
    assert (tmp_path / "out.csv").read_text() == (tmp_path / "ref.csv").read_text()
    assert artifact_text(env, run.info.run_id, "predictions.csv", tmp_path / "a") == (tmp_path / "ref.csv").read_text()
    metrics = parents(env, "pred", "predict")[0].data.metrics
    assert sum(v for k, v in metrics.items() if k.startswith("count_")) == 120
    assert abs(sum(v for k, v in metrics.items() if k.startswith("pct_")) - 100) < 1e-9


def test_retrain_takes_params_and_epochs_from_a_kfold_run(cv, tiny_data, tiny_model):
    env, a = cv["env"], cv["a"]
    proc = run_entrypoint("retrain", {"data": tiny_data, "model": tiny_model, "max_length": 32,
                                      "params_from": a.info.run_id, "experiment_name": "ens"}, env, cv["folder"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = parents(env, "ens", "retrain")
    best = [r.data.metrics["final_best_epoch"] for r in children(env, "ens", a.info.run_id)]
    assert int(run.data.params["epochs"]) == max(1, round(float(np.mean(best))))
    assert float(run.data.params["learning_rate"]) == float(a.data.params["learning_rate"])
    assert run.data.tags["params_source"] == a.info.run_id
    assert "retrain on all 120 rows" in proc.stderr
    assert [f.path for f in client(env).list_artifacts(run.info.run_id, "model")]


def test_missing_member_is_named_or_skipped(cv, tiny_data, tiny_model):
    env, folder = cv["env"], cv["folder"]
    proc = run_entrypoint("train", {"data": tiny_data, "model": tiny_model, "epochs": 1, "max_length": 32,
                                    "experiment_name": "ens"}, env, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (train,) = parents(env, "ens", "train")
    shutil.rmtree(Path(train.info.artifact_uri.removeprefix("file://")) / "model")
    refused = ensemble(cv, "partial", cv["a"], train, weights="equal")
    assert refused.returncode == 2
    assert f"member run {train.info.run_id}" in refused.stderr and "skip_missing=true" in refused.stderr
    accepted = ensemble(cv, "partial", cv["a"], train, weights="equal", skip_missing="true")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert f"member run {train.info.run_id} skipped" in accepted.stderr
    spec = json.loads(artifact_text(env, parents(env, "ens", "ensemble")[-1].info.run_id, "ensemble.json", folder / "s"))
    assert [round(m["weight"], 9) for m in spec["members"]] == [round(1 / 3, 9)] * 3
