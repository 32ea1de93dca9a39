"""The `validate` stage: a model scored shard by shard (killed and resumed), and another run's predictions
joined to their references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from conftest import run_entrypoint, store_env
from fake_llm import FakeLLM
from helpers import artifact_frame, client, metric_steps, mlflow_run, parents
from sklearn.metrics import accuracy_score, f1_score

from pipelines.rouge import score_rows


def labelled_copy(model: Path, labels: list[str], folder: Path) -> Path:
    """The tiny classifier with the data's class names (its head is untrained: predictions are arbitrary)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = dict(enumerate(labels))
    config["label2id"] = {label: i for i, label in enumerate(labels)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_validate_model_killed_mid_run_resumes_by_shard(tiny_model, tiny_data, tmp_path):
    env = store_env(tmp_path)
    labels = sorted(pd.read_csv(tiny_data)["label"].unique())[:2]  # its head has 2 outputs
    model = labelled_copy(tiny_model, labels, tmp_path / "model")
    args = {"experiment_name": "val", "model_uri": model, "data": tiny_data, "task": "classification",
            "shard_size": 40, "max_length": 32}
    killed = run_entrypoint("validate", args, {**env, "PIPELINES_FAILPOINT": "validate_shard:2"}, tmp_path)
    assert killed.returncode != 0
    [parent] = parents(env, "val", "validate")
    shard0 = Path(parent.info.artifact_uri.removeprefix("file://")) / "shards" / "shard-00000.csv"
    stamp = shard0.stat().st_mtime_ns
    resumed = mlflow_run(env, tmp_path, "validate", {**args, "resume": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2/3 shards done" in resumed.stderr and shard0.stat().st_mtime_ns == stamp

    [parent] = parents(env, "val", "validate")
    scores = artifact_frame(env, parent.info.run_id, "scores.csv", tmp_path / "s")
    data = pd.read_csv(tiny_data)
    assert list(scores["row_id"]) == list(range(len(data))) and list(scores["reference"]) == list(data["label"])
    metrics = parent.data.metrics
    assert metrics["accuracy"] == accuracy_score(scores["reference"], scores["prediction"])
    assert metrics["f1_macro"] == f1_score(scores["reference"], scores["prediction"], average="macro",
                                           zero_division=0)
    assert metric_steps(env, parent.info.run_id)["items_done"] == [0, 40, 80, 120]
    listed = {a.path for a in client(env).list_artifacts(parent.info.run_id)}
    assert {"scores.csv", "worst_examples.csv", "per_class.csv", "confusion_matrix.png"} <= listed

    fresh = run_entrypoint("validate", {**args, "experiment_name": "val2"}, env, tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    [other] = parents(env, "val2", "validate")
    pd.testing.assert_frame_equal(scores, artifact_frame(env, other.info.run_id, "scores.csv", tmp_path / "s2"))


def test_validate_llm_summaries_against_references(tmp_path):
    env = {**store_env(tmp_path), "FAKE_KEY": "k"}
    texts = [f"문서 {i} 오늘 회의에서 예산 안건을 논의했다 다음 주에 다시 모인다" for i in range(12)]
    frame = pd.DataFrame({"text": texts, "summary": [
        "SUMMARY: " + " ".join(t.split()[:8]) if i % 2 == 0 else "예산 안건 논의" for i, t in enumerate(texts)]})
    frame.to_csv(tmp_path / "docs.csv", index=False)
    with FakeLLM() as server:
        llm = run_entrypoint("llm", {"experiment_name": "v", "data": tmp_path / "docs.csv", "base_url": server.base_url,
                                     "llm_model": "m", "api_key_env": "FAKE_KEY", "shard_size": 5}, env, tmp_path)
    assert llm.returncode == 0, llm.stderr[-2000:]
    [source] = parents(env, "v", "llm")
    args = {"experiment_name": "v", "task": "summarization", "predictions_from": source.info.run_id,
            "data": tmp_path / "docs.csv", "shard_size": 5}
    done = run_entrypoint("validate", args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [parent] = parents(env, "v", "validate")
    scores = artifact_frame(env, parent.info.run_id, "scores.csv", tmp_path / "s")
    assert scores.loc[scores.row_id % 2 == 0, "rouge_mean"].eq(1.0).all()
    expected = score_rows(frame["summary"], scores["prediction"], "whitespace")
    assert abs(parent.data.metrics["rouge_mean"] - expected["rouge_mean"].mean()) < 1e-12
    worst = artifact_frame(env, parent.info.run_id, "worst_examples.csv", tmp_path / "w")
    assert (worst["row_id"].head(6) % 2 == 1).all() and worst["rouge_mean"].is_monotonic_increasing

    frame.assign(text=frame["text"] + " 변경").to_csv(tmp_path / "other.csv", index=False)
    wrong = run_entrypoint("validate", {**args, "data": tmp_path / "other.csv"}, env, tmp_path)
    assert wrong.returncode == 2 and "is not the file llm run" in wrong.stderr
    both = run_entrypoint("validate", {**args, "model_uri": "runs:/x/model"}, env, tmp_path)
    assert both.returncode == 2 and "exactly one of model_uri" in both.stderr
