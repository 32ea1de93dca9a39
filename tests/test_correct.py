"""The `correct` stage on the summaries of an `llm` run: by an LLM (killed and resumed by shard) and by a vote
among correction models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from conftest import run_entrypoint, store_env
from fake_llm import FakeLLM
from helpers import artifact_frame, parents
from seq2seq_fixtures import make_tiny_bart

from pipelines.rouge import score_rows


def first_words(text: str) -> str:
    return "SUMMARY: " + " ".join(text.split()[:8])


def llm_summaries(tmp_path: Path, env: dict, server: FakeLLM, rows: int) -> tuple[Path, str]:
    texts = [f"보고서 {i} 서버 점검이 오늘 밤 열 시에 시작되어 두 시간 동안 이어진다" for i in range(rows)]
    pd.DataFrame({"text": texts, "summary": [f"서버 점검 {i}" for i in range(rows)]}).to_csv(tmp_path / "d.csv",
                                                                                          index=False)
    done = run_entrypoint("llm", {"experiment_name": "c", "data": tmp_path / "d.csv", "base_url": server.base_url,
                                  "llm_model": "m", "api_key_env": "FAKE_KEY", "prompt_template": "Sum: {text}"},
                          env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [source] = parents(env, "c", "llm")
    return tmp_path / "d.csv", source.info.run_id


def test_llm_correction_killed_and_resumed(tmp_path):
    env = {**store_env(tmp_path), "FAKE_KEY": "k"}
    with FakeLLM() as server:
        data, source = llm_summaries(tmp_path, env, server, 30)
        args = {"experiment_name": "c", "predictions_from": source, "data": data, "correction_strategy": "llm",
                "base_url": server.base_url, "llm_model": "m", "api_key_env": "FAKE_KEY", "shard_size": 10,
                "correction_prompt": "Fix: {summary} | {text}"}
        killed = run_entrypoint("correct", args, {**env, "PIPELINES_FAILPOINT": "correct_shard:2"}, tmp_path)
        assert killed.returncode != 0
        sent = server.total
        resumed = run_entrypoint("correct", {**args, "resume": "true"}, env, tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "2/3 shards done" in resumed.stderr and server.total == sent + 10  # only the last shard's requests
    [parent] = parents(env, "c", "correct")
    corrected = artifact_frame(env, parent.info.run_id, "corrected.csv", tmp_path / "o")
    frame = pd.read_csv(data)
    originals = [first_words(f"Sum: {t}") for t in frame["text"]]
    assert list(corrected["original"]) == originals
    assert list(corrected["corrected"]) == [first_words(f"Fix: {o} | {t}") for o, t in zip(originals, frame["text"])]
    assert corrected["changed"].eq(1).all() and corrected["chosen_from"].eq("llm").all()
    before = score_rows(frame["summary"], originals, "whitespace")["rouge_mean"].mean()
    assert abs(parent.data.metrics["before_rouge_mean"] - before) < 1e-12
    assert parent.data.metrics["changed"] == 30 and "after_rouge_mean" in parent.data.metrics


def test_vote_takes_the_minimum_bayes_risk_candidate(tmp_path):
    env = {**store_env(tmp_path), "FAKE_KEY": "k"}
    with FakeLLM() as server:
        data, source = llm_summaries(tmp_path, env, server, 6)
    model = make_tiny_bart(tmp_path / "bart")
    args = {"experiment_name": "c", "predictions_from": source, "data": data, "correction_strategy": "vote",
            "correction_models": f"{model},{model}", "augment_max_new_tokens": 6, "augment_num_beams": 2}
    done = run_entrypoint("correct", args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [parent] = parents(env, "c", "correct")
    corrected = artifact_frame(env, parent.info.run_id, "corrected.csv", tmp_path / "o")
    for _, row in corrected.iterrows():
        # the two identical candidates agree with each other: unless the original equals them, one of them wins
        assert row["chosen_from"] == ("original" if row["changed"] == 0 else str(model))
        candidate = row["corrected"] if row["changed"] else None
        if candidate is not None:
            mean_to_others = np.mean(score_rows([row["original"], candidate], [candidate, candidate],
                                                "whitespace")["rouge_mean"])
            original_mean = score_rows([candidate], [row["original"]], "whitespace")["rouge_mean"].iloc[0]
            assert mean_to_others >= original_mean
    bad = run_entrypoint("correct", {**args, "correction_models": ""}, env, tmp_path)
    assert bad.returncode == 2 and "correction_models" in bad.stderr
