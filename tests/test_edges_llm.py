"""Edges of the LLM stages (issue 19, items 14, 17, 18, 20), in-process against the local OpenAI-compatible server
(tests/fake_llm.py) through the real `openai` client, with a real SQLite store in tmp_path. The server counts what
it receives, so the tests prove which requests a continuation sends again."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import store_env
from fake_llm import FakeLLM
from helpers import artifact_frame, parents

from pipelines.config import AugmentConfig, CorrectConfig, LlmConfig
from pipelines.llm import Client, Ledger, canonical_request
from pipelines.stages import augment, correct, llm
from pipelines.tracking import _create_sqlite_store

KEY_ENV = "PIPELINES_EDGE_KEY"
KEY = "sk-edge-" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTU"  # 64 characters


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty SQLite tracking store, built once (MLflow's migrations take seconds): each test gets a copy."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    _create_sqlite_store(path)
    return path


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch) -> dict:
    """A fresh SQLite tracking store (and state database) in tmp_path, for stages run in this process."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    env = store_env(tmp_path)
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PIPELINES_FAILPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv(KEY_ENV, KEY)
    return env


@pytest.fixture
def server():
    with FakeLLM(api_key=KEY) as fake:
        yield fake


def endpoint(server: FakeLLM, **extra) -> dict:
    return {"base_url": server.base_url, "llm_model": "m", "api_key_env": KEY_ENV, "max_retries": 0,
            "flush_seconds": 0, "shard_size": 3, **extra}


def sent_since(server: FakeLLM, before: Counter) -> Counter:
    return Counter(server.received) - before


# ---------------------------------------------------------------- item 14: one failure behaviour for every stage


def assert_failures_listed(store, experiment: str, stage: str, rows: list[int], status: str, dst):
    """The stage's one parent run, after checking its failures.csv lists exactly ``rows``, each with ``status``."""
    [parent] = parents(store, experiment, stage)
    failures = artifact_frame(store, parent.info.run_id, "failures.csv", dst)
    assert list(failures["row_id"]) == rows and failures["error"].str.contains(status).all()
    return parent


def test_augment_lists_llm_failures_and_retry_failed_resends_only_them(store, server, tmp_path):
    texts = [f"row {i} 오늘 회의에서 예산 안건을 논의했다" for i in range(6)]
    pd.DataFrame({"text": texts, "label": list("ababab")}).to_csv(tmp_path / "d.csv", index=False)
    cfg = AugmentConfig(experiment_name="aug", data=str(tmp_path / "d.csv"), augmentation_methods="llm_paraphrase",
                        paraphrase_prompt="Paraphrase: {text}", **endpoint(server))
    server.always_fail("row 4 ", 500)
    metrics = augment.run(cfg)
    assert metrics["failures"] == 1 and metrics["rows_llm_paraphrase"] == 5
    parent = assert_failures_listed(store, "aug", "augment", [4], "500", tmp_path / "f")

    before = Counter(server.received)
    assert augment.run(dataclasses.replace(cfg, resume=True))["failures"] == 1
    assert not sent_since(server, before), "a resume without retry_failed sent requests"
    server.clear_faults()
    again = augment.run(dataclasses.replace(cfg, resume=True, retry_failed=True))
    assert list(sent_since(server, before).elements()) == ["Paraphrase: " + texts[4]]  # only the failure, once
    assert again["failures"] == 0 and again["rows_llm_paraphrase"] == 6
    [parent] = parents(store, "aug", "augment")  # the same run (the same ledger scope), finished
    augmented = artifact_frame(store, parent.info.run_id, "augmented.csv", tmp_path / "a")
    assert sorted(augmented.loc[augmented["method"] == "llm_paraphrase", "source_row_id"]) == list(range(6))
    assert artifact_frame(store, parent.info.run_id, "failures.csv", tmp_path / "f2").empty


def test_correct_lists_llm_failures_and_retry_failed_resends_only_them(store, server, tmp_path):
    texts = [f"보고서 {i} 서버 점검이 오늘 밤 열 시에 시작된다" for i in range(5)]
    pd.DataFrame({"text": texts, "summary": [f"점검 {i}" for i in range(5)]}).to_csv(tmp_path / "d.csv", index=False)
    llm.run(LlmConfig(experiment_name="c", data=str(tmp_path / "d.csv"), prompt_template="Sum: {text}",
                      **endpoint(server)))
    [source] = parents(store, "c", "llm")
    cfg = CorrectConfig(experiment_name="c", predictions_from=source.info.run_id, data=str(tmp_path / "d.csv"),
                        correction_strategy="llm", correction_prompt="Fix: {summary} | {text}", **endpoint(server))
    server.always_fail("보고서 2 ", 503)
    metrics = correct.run(cfg)
    assert metrics["failures"] == 1 and metrics["changed"] == 4
    parent = assert_failures_listed(store, "c", "correct", [2], "503", tmp_path / "f")
    corrected = artifact_frame(store, parent.info.run_id, "corrected.csv", tmp_path / "c")
    assert corrected.loc[2, "chosen_from"] == "original" and "503" in corrected.loc[2, "error"]

    before = Counter(server.received)
    server.clear_faults()
    again = correct.run(dataclasses.replace(cfg, resume=True, retry_failed=True))
    [resent] = sent_since(server, before).elements()  # only the failed request, once
    assert resent.startswith("Fix: SUMMARY: Sum: 보고서 2 ")
    assert again["failures"] == 0 and again["changed"] == 5
    [parent] = parents(store, "c", "correct")
    assert artifact_frame(store, parent.info.run_id, "corrected.csv", tmp_path / "c2")["chosen_from"].eq("llm").all()


# ---------------------------------------------------------------- item 17: mask, then cut


def test_an_api_key_echoed_near_the_cut_is_masked_whole(store, server, tmp_path):
    """The key starts ~245 characters into the server's message and runs past the 300-character cut."""
    server.fail("echo", 400, message="x" * 245 + " bad key {authorization} for this account")
    cfg, ledger = LlmConfig(**endpoint(server)), Ledger(f"sqlite:///{tmp_path / 'state.db'}", "run", 0)
    [error] = Client(cfg, ledger).answer([canonical_request("echo", cfg, "")])["error"]
    ledger.close()
    assert "***" in error
    pieces = {KEY[i:i + 8] for i in range(len(KEY) - 7)}
    assert not [p for p in pieces if p in error], f"part of the API key is in the recorded error: {error[-80:]}"
    assert not [p for p in pieces if p.encode() in (tmp_path / "state.db").read_bytes()]


# ---------------------------------------------------------------- item 18: lookup and flush exclude each other


def test_a_lookup_during_a_flush_finds_the_answers_being_written(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'state.db'}", "run", flush_seconds=3600)
    writing, release, write = threading.Event(), threading.Event(), ledger._write

    def held_write(items):  # the flush has taken the rows out of the buffer; hold it before they are written
        writing.set()
        release.wait(30)
        write(items)

    ledger._write = held_write
    ledger.record("k1", {"response": "paid for", "error": ""})
    flusher = threading.Thread(target=ledger.flush)
    flusher.start()
    assert writing.wait(30)
    found: dict = {}
    reader = threading.Thread(target=lambda: found.update(ledger.lookup(["k1"])))
    reader.start()
    reader.join(0.5)  # old code: the lookup returned at once, without k1; now it waits for the flush
    release.set()
    flusher.join(30)
    reader.join(30)
    ledger.close()
    assert found == {"k1": {"response": "paid for", "error": ""}}, "a lookup mid-flush missed an answered request"


# ---------------------------------------------------------------- item 20: tokens by script, learned from usage


def test_rate_limiter_counts_korean_tokens_and_learns_the_providers_count(store, tmp_path):
    """200 Hangul syllables are ~200 tokens (not 67): 8 concurrent requests under 1000 tokens a window must not
    start at once; the reported usage then brings the estimate to the provider's count."""
    prompts = [str(i) + "가나다라마바사아자차" * 20 for i in range(8)]
    ledger = Ledger(f"sqlite:///{tmp_path / 'state.db'}", "run", 0)
    with FakeLLM(api_key=KEY, tokens_per_char=1.0) as server:
        cfg = LlmConfig(**endpoint(server, tokens_per_minute=1000, concurrency=8, max_tokens=5))
        client = Client(cfg, ledger)
        client._limiter.WINDOW = 1.0  # the same logic over a 1 s window
        answers = client.answer([canonical_request(p, cfg, "") for p in prompts])
        log = sorted(t for t, _, status in server.log if status == 200)
    ledger.close()
    assert (answers["error"] == "").all()
    used = int(answers["prompt_tokens"].iloc[0] + answers["completion_tokens"].iloc[0])  # the same for each
    most = max(sum(1 for t in log if s <= t < s + 0.9) for s in log)
    assert most * used <= 1000, f"{most} requests of {used} tokens reached the server within 0.9 s"
    reserved, _ = client._limiter.estimate(canonical_request(prompts[0], cfg, ""))
    assert used <= reserved <= 1.1 * used  # converged to the reported usage (it started at 1.5 a syllable)


def test_an_augment_shard_of_an_older_version_without_an_error_column_is_read_with_no_failures(tmp_path):
    from pipelines.stages.augment import ERROR, _read

    path = tmp_path / "shard-0.csv"
    path.write_text("source_row_id,method,text\n3,eda,NA\n")  # written before failures were listed
    frame = _read(path)
    assert frame[ERROR].tolist() == [""] and frame["text"].tolist() == ["NA"]
