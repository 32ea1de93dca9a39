"""tests/fake_llm.py through the real `openai` client: answers, counts, injected faults, concurrency."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fake_llm import FakeLLM


@pytest.fixture
def server():
    with FakeLLM(latency=0.0) as fake:
        yield fake


def client_for(server: FakeLLM, api_key: str = "k", timeout: float = 5.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=timeout)


def ask(client: openai.OpenAI, content: str, **extra):
    return client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": content}],
                                          **extra)


def test_answer_is_deterministic_with_usage(server):
    client = client_for(server)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "one two three four five six seven eight nine ten"}]
    reply = client.chat.completions.create(model="fake-model", messages=messages, temperature=0.0)
    assert reply.choices[0].message.content == "SUMMARY: one two three four five six seven eight"
    assert reply.choices[0].finish_reason == "stop" and reply.model == "fake-model"
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (12, 9, 21)
    short = ask(client, "alpha  beta\ngamma delta", max_tokens=3)
    assert short.choices[0].message.content == "SUMMARY: alpha beta" and short.usage.completion_tokens == 3
    assert server.received[messages[1]["content"]] == 1 and server.total == 2
    assert server.completed[messages[1]["content"]] == 1
    assert [status for _, _, status in server.log] == [200, 200]


def test_rate_limit_once_then_success(server):
    client = client_for(server)
    server.fail("x", 429, 1)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "please x this")
    assert caught.value.response.headers["retry-after"] == "0"
    assert caught.value.body["type"] == "rate_limit_error"
    assert ask(client, "please x this").choices[0].message.content == "SUMMARY: please x this"
    assert server.received["please x this"] == 2 and server.completed["please x this"] == 1
    assert [status for _, _, status in server.log] == [429, 200]


def test_server_error(server):
    server.fail("boom", 500, 1)
    with pytest.raises(openai.InternalServerError):
        ask(client_for(server), "boom now")
    assert ask(client_for(server), "boom now").choices[0].message.content == "SUMMARY: boom now"


def test_always_fail_and_clear_faults(server):
    client = client_for(server)
    server.always_fail("bad", 503)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            ask(client, "bad item")
    assert ask(client, "good item").choices[0].message.content == "SUMMARY: good item"
    server.clear_faults()
    assert ask(client, "bad item").choices[0].message.content == "SUMMARY: bad item"
    assert server.received["bad item"] == 4 and server.completed["bad item"] == 1


def test_dropped_connection(server):
    client = client_for(server)
    ask(client, "warm up the keep-alive connection")
    server.drop("drop me", 1)
    with pytest.raises(openai.APIConnectionError):
        ask(client, "drop me")
    assert ask(client, "drop me").choices[0].message.content == "SUMMARY: drop me"
    assert server.received["drop me"] == 2 and [s for _, _, s in server.log][-2:] == [0, 200]


def test_slow_request_times_out(server):
    server.slow("slow", 2.0, 1)
    client = client_for(server, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        ask(client, "slow one")
    assert time.monotonic() - started < 1.5
    assert ask(client, "slow one").choices[0].message.content == "SUMMARY: slow one"


def test_wrong_api_key_is_refused():
    with FakeLLM(api_key="right") as server:
        with pytest.raises(openai.AuthenticationError):
            ask(client_for(server, api_key="wrong"), "hello")
        assert ask(client_for(server, api_key="right"), "hello").choices[0].message.content == "SUMMARY: hello"
        assert server.received["hello"] == 2 and server.completed["hello"] == 1


def test_unknown_path_is_404(server):
    client = client_for(server)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="text")


def test_concurrent_requests_overlap():
    with FakeLLM(latency=0.2) as server:
        client = client_for(server)
        prompts = [f"request number {i}" for i in range(16)]
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda p: ask(client, p).choices[0].message.content, prompts))
        elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert replies == [f"SUMMARY: {p}" for p in prompts]
    assert server.total == 16 and all(server.received[p] == 1 for p in prompts)
    assert sum(server.completed.values()) == 16 and len(server.log) == 16
