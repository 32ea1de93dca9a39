"""A local OpenAI-compatible chat-completions server for tests and benchmarks (no real endpoint is reachable).

``with FakeLLM(latency=0.0) as server:`` serves ``POST {server.base_url}/chat/completions`` on 127.0.0.1. The
answer is deterministic: ``"SUMMARY: "`` + the first 8 words of the last user message, cut to ``max_tokens`` words.
Its ``usage`` counts words as tokens, or ``tokens_per_char`` tokens a character of the prompt when that is set.
It counts what it receives (``received``, ``completed``, ``total``, ``log``) and injects faults on demand
(``fail``, ``drop``, ``slow``, ``always_fail``), all safe to change while requests are in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def _error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body."""
    kind = ERROR_TYPES.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code or kind}}


class _Handler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, every answer sent with a Content-Length."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._send(404, _error(404, f"no route for GET {self.path}"))

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
            self._send(404, _error(404, f"no route for POST {self.path}"))
            return
        try:
            request = json.loads(raw or b"{}")
            messages = request["messages"]
            content = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._send(400, _error(400, f"malformed request: {exc!r}"))
            return
        fake, arrived, header = self.server.fake, time.monotonic(), self.headers.get("Authorization", "")
        allowed = header.startswith("Bearer ") and (fake.api_key is None or header == f"Bearer {fake.api_key}")
        fault, extra, message = fake._arrive(content, allowed)
        time.sleep(fake.latency + extra)
        if not allowed:
            status, body = 401, _error(401, "Incorrect API key provided.", "invalid_api_key")
        elif fault == "drop":
            status, body = 0, None  # 0 in ``log``: closed without an answer
        elif fault is not None:
            text = (message or "injected fault {status} for this request").format(
                status=fault, authorization=header.removeprefix("Bearer "))
            status, body = int(fault), _error(int(fault), text)
        else:
            status, body = 200, self._answer(request, messages, content)
        fake._done(arrived, content, status)  # counted before the client can see the answer
        if body is not None:
            self._send(status, body)
            return
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _answer(self, request: dict[str, Any], messages: list[dict[str, Any]], content: str) -> dict[str, Any]:
        words = ["SUMMARY:", *content.split()[:8]]
        if request.get("max_tokens") is not None:
            words = words[: max(int(request["max_tokens"]), 0)]
        texts = [str(m.get("content") or "") for m in messages]
        per_char = self.server.fake.tokens_per_char
        prompt = math.ceil(per_char * sum(map(len, texts))) if per_char else sum(len(t.split()) for t in texts)
        return {"id": f"chatcmpl-{next(self.server.fake._ids)}", "object": "chat.completion",
                "created": int(time.time()), "model": request.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": len(words),
                          "total_tokens": prompt + len(words)}}

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        try:
            self.send_response(status)
            for name, value in {**headers, **({"retry-after": "0"} if status == 429 else {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (its timeout) and closed the connection
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 32+ clients connecting at once are not turned away
    fake: FakeLLM


class FakeLLM:
    """The server. ``received``/``completed``: Counters by last user content; ``log``: (monotonic, content, status)
    per request (status 0: dropped); ``latency``: seconds slept before every answer, mutable at runtime;
    ``tokens_per_char``: the prompt tokens reported per character (None: one per word)."""

    def __init__(self, latency: float = 0.0, api_key: str | None = None, tokens_per_char: float | None = None) -> None:
        self.latency, self.api_key, self.tokens_per_char = latency, api_key, tokens_per_char
        self.received: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.log: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self._rules: list[list[Any]] = []  # [substring, "fault" | "slow", status | "drop" | seconds, left | None,
        #                                     error message | None]
        self._ids = itertools.count(1)
        self._httpd: _Server | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "FakeLLM is not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def total(self) -> int:
        """Requests received so far, faults included."""
        with self._lock:
            return sum(self.received.values())

    def start(self) -> Self:
        """Bind a free port and serve in a daemon thread."""
        if self._httpd is None:
            self._httpd = _Server(("127.0.0.1", 0), _Handler)
            self._httpd.fake = self
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-llm",
                             daemon=True).start()
            logger.debug("fake LLM serving on %s", self.base_url)
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fail(self, content_substring: str, status: int, times: int = 1, message: str | None = None) -> None:
        """The next ``times`` requests whose last user content contains the substring get HTTP ``status``; its
        error ``message`` may name ``{status}`` and ``{authorization}`` (the API key sent, as some gateways echo)."""
        self._add([content_substring, "fault", status, times, message])

    def drop(self, content_substring: str, times: int = 1) -> None:
        """The next ``times`` matching requests have their connection closed without an answer."""
        self._add([content_substring, "fault", "drop", times, None])

    def always_fail(self, content_substring: str, status: int, message: str | None = None) -> None:
        """Every matching request fails with HTTP ``status`` (until ``clear_faults``); ``message`` as in ``fail``."""
        self._add([content_substring, "fault", status, None, message])

    def slow(self, content_substring: str, seconds: float, times: int = 1) -> None:
        """The next ``times`` matching requests sleep ``seconds`` more before answering."""
        self._add([content_substring, "slow", seconds, times, None])

    def clear_faults(self) -> None:
        """Forget every fault and slowdown still pending."""
        with self._lock:
            self._rules.clear()

    def _add(self, rule: list[Any]) -> None:
        with self._lock:
            self._rules.append(rule)

    def _arrive(self, content: str, allowed: bool) -> tuple[Any, float, str | None]:
        """Count a request; if ``allowed`` (right key), consume the first matching fault and the first matching
        slowdown. Returns (status | "drop" | None, extra seconds, the fault's error message | None)."""
        taken: dict[str, Any] = {}
        with self._lock:
            self.received[content] += 1
            for rule in self._rules if allowed else []:
                substring, kind, value, left, message = rule
                if kind not in taken and substring in content and (left is None or left > 0):
                    taken[kind], rule[3] = (value, message), None if left is None else left - 1
        fault, message = taken.get("fault", (None, None))
        return fault, taken.get("slow", (0.0, None))[0], message

    def _done(self, arrived: float, content: str, status: int) -> None:
        with self._lock:
            self.log.append((arrived, content, status))
            if status == 200:
                self.completed[content] += 1
