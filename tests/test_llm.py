"""The `llm` stage against a local OpenAI-compatible server (tests/fake_llm.py), through the real `openai` client.

The server counts the requests it receives, so the tests prove the continuation itself: a resumed run sends
no request whose answer had come back before the kill.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import entrypoint, run_entrypoint, store_env
from fake_llm import FakeLLM
from helpers import artifact_frame, client, mlflow_run, parents

from pipelines.config import LlmConfig
from pipelines.llm import RateLimiter, canonical_request, request_key

SECRET = "sk-test-NEVER-LOGGED-8f3a"


def make_items(path: Path, count: int) -> Path:
    words = ["리뷰", "배송", "가격", "품질", "서비스", "fast", "slow", "good", "bad", "okay"]
    rows = [{"text": f"item {i} " + " ".join(words[(i + j) % len(words)] for j in range(12)),
             "topic": words[i % len(words)]} for i in range(count)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def expected_answer(prompt: str) -> str:
    return "SUMMARY: " + " ".join(prompt.split()[:8])


@pytest.fixture
def server():
    with FakeLLM(api_key=SECRET) as fake:
        yield fake


def args_for(server, data: Path, experiment: str, **extra) -> dict:
    return {"experiment_name": experiment, "data": data, "text_column": "text", "base_url": server.base_url,
            "llm_model": "solar-mini", "prompt_template": "Summarize: {text}", "api_key_env": "PIPELINES_TEST_KEY",
            "shard_size": 50, "concurrency": 4, "flush_seconds": 0, **extra}


def llm_env(folder: Path) -> dict:
    return {**store_env(folder), "PIPELINES_TEST_KEY": SECRET}


def ledger_keys(folder: Path) -> set[str]:
    with sqlite3.connect(folder / "optuna.db") as conn:
        return {key for (key,) in conn.execute("SELECT key FROM pipelines_llm_ledger")}


def test_llm_killed_mid_shard_resumes_without_resending_answered_requests(server, tmp_path, monkeypatch):
    env, data = llm_env(tmp_path), make_items(tmp_path / "items.csv", 120)
    args = args_for(server, data, "llm")
    killed = mlflow_run({**env, "PIPELINES_FAILPOINT": "llm_request:70"}, tmp_path, "llm", args)
    assert killed.returncode != 0, killed.stderr[-2000:]
    recorded = ledger_keys(tmp_path)
    before = Counter(server.received)
    assert 70 <= len(recorded) < 120 and server.total < 120

    resumed = mlflow_run(env, tmp_path, "llm", {**args, "resume": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1/3 shards done" in resumed.stderr  # shard 0 was committed, shard 1 was cut short

    monkeypatch.setenv("PIPELINES_TEST_KEY", SECRET)
    cfg = LlmConfig(base_url=server.base_url, llm_model="solar-mini", api_key_env="PIPELINES_TEST_KEY")
    prompts = [f"Summarize: {text}" for text in pd.read_csv(data)["text"]]
    key_of = {p: request_key(canonical_request(p, cfg, "")) for p in prompts}
    for prompt in prompts:  # every request answered before the kill was not sent again
        if key_of[prompt] in recorded:
            assert server.received[prompt] == before[prompt] == 1, prompt
    resent = [p for p in prompts if server.received[p] > 1]
    assert len(resent) <= 3, f"more requests sent twice than were in flight at the kill: {resent}"
    assert len(server.received) == 120

    [parent] = parents(env, "llm", "llm")
    responses = artifact_frame(env, parent.info.run_id, "responses.csv", tmp_path / "out")
    assert list(responses["row_id"]) == list(range(120))
    assert list(responses["response"]) == [expected_answer(p) for p in prompts]
    assert set(responses.columns) >= {"row_id", "response", "prompt_tokens", "completion_tokens", "latency_s", "error"}
    metrics = parent.data.metrics
    assert metrics["requests"] == 120 and metrics["failures"] == 0 and metrics["items_done"] == 120
    assert metrics["items_total"] == 120 and metrics["total_tokens"] == responses[
        ["prompt_tokens", "completion_tokens"]].to_numpy().sum()
    assert 0 <= metrics["latency_p50_s"] <= metrics["latency_p95_s"]
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "llm"
    shards = [a.path for a in client(env).list_artifacts(parent.info.run_id, "shards")]
    assert "shards/shard-00002.csv" in shards and "shards/shard-00002.json" in shards
    assert_secret_absent(env, tmp_path, [killed, resumed])


def assert_secret_absent(env: dict, folder: Path, processes: list) -> None:
    """The API key is in no param, tag, metric name, artifact, log line or store file."""
    mlflow = client(env)
    for run in mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()]):
        assert SECRET not in json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
    for proc in processes:
        assert SECRET not in proc.stdout + proc.stderr
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the API key is written in {path}"


def test_failures_are_listed_and_retry_failed_resends_only_them(server, tmp_path):
    env, data = llm_env(tmp_path), make_items(tmp_path / "items.csv", 30)
    server.fail("item 3 ", 429, 1)  # retried after retry-after: 0
    server.drop("item 4 ", 1)  # a dropped connection, retried
    server.always_fail("item 7 ", 500)
    server.always_fail("item 21 ", 500)
    args = args_for(server, data, "fail", shard_size=10, max_retries=2)
    first = run_entrypoint("llm", args, env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 LLM requests failed" in first.stderr and "retry_failed=true" in first.stderr
    [parent] = parents(env, "fail", "llm")
    failures = artifact_frame(env, parent.info.run_id, "failures.csv", tmp_path / "f")
    assert list(failures["row_id"]) == [7, 21] and failures["error"].str.contains("500").all()
    responses = artifact_frame(env, parent.info.run_id, "responses.csv", tmp_path / "r")
    assert responses.loc[3, "retries"] == 1 and responses.loc[4, "retries"] == 1
    assert responses.loc[3, "response"].startswith("SUMMARY: Summarize: item 3")
    assert parent.data.metrics["failures"] == 2 and parent.data.metrics["retries"] == 1 + 1 + 2 * 2

    sent = server.total
    plain = run_entrypoint("llm", {**args, "resume": "true"}, env, tmp_path)  # no retry_failed: nothing sent
    assert plain.returncode == 0 and server.total == sent
    server.clear_faults()
    counts = Counter(server.received)
    again = run_entrypoint("llm", {**args, "resume": "true", "retry_failed": "true"}, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    new = Counter(server.received) - counts
    assert sorted(new) == sorted(p for p in server.received if "item 7 " in p or "item 21 " in p)
    assert all(n == 1 for n in new.values())
    [parent] = parents(env, "fail", "llm")
    assert parent.data.metrics["failures"] == 0
    assert artifact_frame(env, parent.info.run_id, "failures.csv", tmp_path / "f2").empty


def test_two_workers_split_the_shards(server, tmp_path):
    env, data = llm_env(tmp_path), make_items(tmp_path / "items.csv", 80)
    server.latency = 0.05
    args = args_for(server, data, "pair", shard_size=10, concurrency=2, resume="true")
    procs = [subprocess.Popen(entrypoint("llm", args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    done = [err.count("done by this worker") for _, err in outputs]
    assert sum(done) == 8 and all(done), done
    assert len(server.received) == 80 and set(server.received.values()) == {1}
    [parent] = parents(env, "pair", "llm")
    assert parent.data.metrics["requests"] == 80


def test_bad_inputs_exit_2_naming_the_fix(server, tmp_path):
    env, data = llm_env(tmp_path), make_items(tmp_path / "items.csv", 5)
    no_key = run_entrypoint("llm", args_for(server, data, "bad", api_key_env="NO_SUCH_VAR"), env, tmp_path)
    assert no_key.returncode == 2 and "NO_SUCH_VAR" in no_key.stderr and "export" in no_key.stderr
    field = run_entrypoint("llm", args_for(server, data, "bad", prompt_template="Fix {summary}"), env, tmp_path)
    assert field.returncode == 2 and "summary" in field.stderr and "topic" in field.stderr
    wrong = run_entrypoint("llm", args_for(server, data, "bad"), {**env, "PIPELINES_TEST_KEY": "wrong"}, tmp_path)
    assert wrong.returncode == 2 and "refused" in wrong.stderr and "api_key_env" in wrong.stderr
    url = run_entrypoint("llm", {**args_for(server, data, "bad"), "base_url": ""}, env, tmp_path)
    assert url.returncode == 2 and "base_url" in url.stderr


def test_template_file_with_other_columns(server, tmp_path):
    env, data = llm_env(tmp_path), make_items(tmp_path / "items.csv", 4)
    template = tmp_path / "prompt.txt"
    template.write_text("Topic {topic}. Text: {text}", encoding="utf-8")
    done = run_entrypoint("llm", args_for(server, data, "tpl", prompt_template=template), env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Topic 리뷰. Text: item 0 리뷰 배송" in " ".join(server.received)


def test_rate_limiter_holds_requests_per_minute():
    limiter = RateLimiter(requests_per_minute=5, tokens_per_minute=0)
    limiter.WINDOW = 1.0  # the same logic over a 1 s window
    starts = []
    for _ in range(12):
        limiter.acquire(10)
        starts.append(time.monotonic())
    assert starts[-1] - starts[0] >= 2.0
    assert all(sum(1 for t in starts if s <= t < s + 1.0) <= 5 for s in starts)


def test_rate_limiter_holds_tokens_per_minute():
    limiter = RateLimiter(requests_per_minute=0, tokens_per_minute=100)
    limiter.WINDOW = 1.0
    starts = []
    for _ in range(6):
        limiter.settle(limiter.acquire(40), 40)
        starts.append(time.monotonic())
    assert all(40 * sum(1 for t in starts if s <= t < s + 1.0) <= 100 for s in starts)
    assert starts[-1] - starts[0] >= 2.0


def test_sigterm_records_every_answer_that_came_back(server, tmp_path):
    """With the default flush_seconds=10, a SIGTERM still writes every returned answer to the ledger before exit."""
    env, data = llm_env(tmp_path), make_items(tmp_path / "items.csv", 200)
    server.latency = 0.05
    args = {**args_for(server, data, "term"), "flush_seconds": 10}
    proc = subprocess.Popen(entrypoint("llm", args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while server.total < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert server.total < 200, "the run finished before the signal: nothing was tested"
    assert len(ledger_keys(tmp_path)) == sum(server.completed.values())
    resumed = run_entrypoint("llm", {**args, "resume": "true"}, env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(server.received) == 200 and set(server.received.values()) == {1}


def test_ledger_keeps_answers_whose_write_failed(tmp_path):
    from pipelines.llm import Ledger

    ledger = Ledger(f"sqlite:///{tmp_path / 'state.db'}", "run-1", flush_seconds=0)
    write, calls = ledger._write, []

    def failing(items):
        calls.append(len(items))
        raise OSError("database unreachable")

    ledger._write = failing
    ledger.record("k1", {"response": "paid for", "error": ""})  # logged, kept buffered, the request not lost
    ledger._write = write
    ledger.flush()
    ledger.close()
    again = Ledger(f"sqlite:///{tmp_path / 'state.db'}", "run-1", flush_seconds=0)
    assert calls == [1] and again.lookup(["k1"]) == {"k1": {"response": "paid for", "error": ""}}
    again.close()
