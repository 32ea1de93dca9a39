"""The `augment` stage (killed and resumed by shard; model and LLM methods) and `augment_from`, which must never
give a fold an augmentation of one of its validation rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import run_entrypoint, store_env
from fake_llm import FakeLLM
from helpers import artifact_frame, children, mlflow_run, parents
from seq2seq_fixtures import make_tiny_bart

from pipelines.eda import PUNCTUATION


def augment_args(data: Path, experiment: str, **extra) -> dict:
    return {"experiment_name": experiment, "data": data, "text_column": "text", "augmentation_methods": "eda",
            "per_method": 2, "shard_size": 40, "seed": 7, **extra}


def test_augment_killed_mid_run_resumes_by_shard(tiny_data, tmp_path):
    env = store_env(tmp_path)
    args = augment_args(tiny_data, "aug")
    killed = run_entrypoint("augment", args, {**env, "PIPELINES_FAILPOINT": "augment_shard:2"}, tmp_path)
    assert killed.returncode != 0
    [parent] = parents(env, "aug", "augment")
    shard0 = Path(parent.info.artifact_uri.removeprefix("file://")) / "shards" / "shard-00000.csv"
    stamp = shard0.stat().st_mtime_ns
    resumed = mlflow_run(env, tmp_path, "augment", {**args, "resume": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2/3 shards done" in resumed.stderr and shard0.stat().st_mtime_ns == stamp
    [parent] = parents(env, "aug", "augment")
    augmented = artifact_frame(env, parent.info.run_id, "augmented.csv", tmp_path / "a")

    fresh = run_entrypoint("augment", {**args, "experiment_name": "aug2"}, env, tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    [other] = parents(env, "aug2", "augment")
    pd.testing.assert_frame_equal(augmented, artifact_frame(env, other.info.run_id, "augmented.csv", tmp_path / "b"))

    data = pd.read_csv(tiny_data)
    originals, new = augmented[augmented["method"] == "original"], augmented[augmented["method"] != "original"]
    pd.testing.assert_frame_equal(originals[list(data.columns)].reset_index(drop=True), data)
    assert set(new["method"]) == {"eda"} and 200 <= len(new) <= 240
    assert parent.data.metrics["rows_new"] == len(new) == parent.data.metrics["rows_eda"]
    for _, row in new.iterrows():
        source = data.loc[row["source_row_id"]]
        assert row["label"] == source["label"] and row["text"] != source["text"]
        assert set(row["text"].split()) <= set(source["text"].split()) | set(PUNCTUATION)


@pytest.mark.slow
def test_kfold_with_augment_from_never_trains_on_a_validation_rows_augmentation(tiny_data, tiny_model, tmp_path):
    env = store_env(tmp_path)
    assert run_entrypoint("augment", augment_args(tiny_data, "cv", per_method=1), env, tmp_path).returncode == 0
    [aug] = parents(env, "cv", "augment")
    args = {"experiment_name": "cv", "data": tiny_data, "model": tiny_model, "k_folds": 3, "epochs": 1,
            "batch_size": 16, "max_length": 32, "augment_from": aug.info.run_id}
    done = run_entrypoint("kfold", args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [parent] = parents(env, "cv", "kfold")
    oof = artifact_frame(env, parent.info.run_id, "oof_predictions.csv", tmp_path / "oof")
    augmented = artifact_frame(env, aug.info.run_id, "augmented.csv", tmp_path / "a")
    sources = augmented.loc[augmented["method"] != "original", "source_row_id"]
    for run in children(env, "cv", parent.info.run_id):
        fold = int(run.data.tags["fold"])
        used = artifact_frame(env, run.info.run_id, "augmentations_used.csv", tmp_path / f"u{fold}")
        validation = set(oof.loc[oof["fold"] == fold, "row_id"])
        assert not set(used["source_row_id"]) & validation, f"fold {fold} trained on a validation row's rewrite"
        assert sorted(used["source_row_id"]) == sorted(s for s in sources if s not in validation)
    bad = run_entrypoint("kfold", {**args, "augment_from": parent.info.run_id}, env, tmp_path)
    assert bad.returncode == 2 and "not a finished augment run" in bad.stderr


def test_model_and_llm_methods(tmp_path):
    env = {**store_env(tmp_path), "FAKE_KEY": "k"}
    model = make_tiny_bart(tmp_path / "bart")
    texts = ["오늘 회의에서 예산 안건을 논의했다", "the server restarts every night at two", "새 버전은 버그를 고쳤다"]
    pd.DataFrame({"text": texts, "label": ["a", "b", "a"]}).to_csv(tmp_path / "d.csv", index=False)
    with FakeLLM() as server:
        args = augment_args(tmp_path / "d.csv", "m", augmentation_methods="back_translation,paraphrase,llm_paraphrase",
                            bt_forward_model=model, bt_backward_model=model, paraphrase_model=model,
                            augment_max_new_tokens=8, augment_num_beams=2, base_url=server.base_url, llm_model="m",
                            api_key_env="FAKE_KEY", paraphrase_prompt="Paraphrase: {text}")
        done = run_entrypoint("augment", args, env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert server.total == 3
    [parent] = parents(env, "m", "augment")
    augmented = artifact_frame(env, parent.info.run_id, "augmented.csv", tmp_path / "a")
    llm = augmented[augmented["method"] == "llm_paraphrase"]
    assert list(llm["text"]) == ["SUMMARY: " + " ".join(f"Paraphrase: {t}".split()[:8]) for t in texts]
    assert parent.data.metrics["rows_back_translation"] + parent.data.metrics["rows_paraphrase"] == \
        len(augmented) - 3 - 3
    unknown = run_entrypoint("augment", augment_args(tmp_path / "d.csv", "m", augmentation_methods="eda,synonyms"),
                             env, tmp_path)
    assert unknown.returncode == 2 and "synonyms" in unknown.stderr
