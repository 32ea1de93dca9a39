"""Chat completions from any OpenAI-compatible endpoint that never pay twice for the same request.

Every request is keyed by the sha256 of its canonical form (model, messages, temperature, max_tokens). Its
outcome (answer, token usage, latency, or the final error) goes into the :class:`Ledger`, a table of the
state database shared by all workers (the one holding leases and Optuna studies: SQLite beside the embedded
store, PostgreSQL for a team), written at least every ``flush_seconds``. Before sending, the client looks the
key up there, so a resumed or second worker re-sends only the requests whose answer never came back.

The API key is read from the environment variable named by ``api_key_env`` and handed to the ``openai``
client only; it is never logged, recorded or written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pandas as pd
from sqlalchemy import Column, MetaData, String, Table, Text, select
from sqlalchemy.dialects import postgresql, sqlite

from pipelines import faults
from pipelines.errors import ConfigError
from pipelines.leases import create_table, make_engine
from pipelines.llm_settings import LLMSettings
from pipelines.settings import redact_url

logger = logging.getLogger(__name__)
for _name in ("httpx", "httpx2"):  # one INFO line per request otherwise (openai 3 bundles httpx2)
    logging.getLogger(_name).setLevel(logging.WARNING)

COLUMNS = ("response", "prompt_tokens", "completion_tokens", "latency_s", "error", "retries")
RETRIED_STATUS = (408, 409, 429)  # and every 5xx; like the openai client's own retries
FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)  # every request would fail
MAX_BACKOFF = 300.0

_metadata = MetaData()
_ledger = Table("pipelines_llm_ledger", _metadata,
                Column("scope", String(255), primary_key=True),
                Column("key", String(64), primary_key=True),
                Column("outcome", Text, nullable=False))


# ---------------------------------------------------------------- prompts and requests


def canonical_request(prompt: str, cfg: LLMSettings, system_prompt: str) -> dict:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": prompt}]
    return {"model": cfg.llm_model, "messages": messages, "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens}


def request_key(request: dict) -> str:
    payload = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def api_key(env: str) -> str:
    key = os.environ.get(env, "")
    if not key:
        raise ConfigError(f"the environment variable {env} (api_key_env) is not set: export {env}=<your API key>, or "
                          "pass api_key_env=<the variable that holds it>")
    return key


# ---------------------------------------------------------------- rate limits


_WIDE = re.compile("[\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff"
                   "\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff]")
_LATIN = re.compile(r"[A-Za-z\s]")
_ASCII_OTHER = re.compile(r"[\x21-\x40\x5b-\x60\x7b-\x7e]")  # ASCII digits and punctuation
MESSAGE_TOKENS = 4  # a chat message's role and separators; 3 more prime the answer


def estimate_tokens(text: str) -> float:
    """A conservative (high) estimate of the tokens of ``text`` by script, for the tokenizer of any provider:
    Hangul, CJK and kana 1.5 a character (BPE vocabularies give them 0.5 to 2), other non-ASCII characters 1,
    ASCII digits and punctuation 1/2, Latin letters and white space 1/4 (English averages 4+ characters a token)."""
    wide, latin, ascii_other = (len(pattern.findall(text)) for pattern in (_WIDE, _LATIN, _ASCII_OTHER))
    return 1.5 * wide + latin / 4 + ascii_other / 2 + (len(text) - wide - latin - ascii_other)


class RateLimiter:
    """At most ``requests_per_minute`` requests and ``tokens_per_minute`` tokens in any 60 s window (0: no limit).

    A request is counted with its estimated tokens when it starts (:meth:`estimate`: its prompt by script, scaled
    by the usage the server reported so far, plus ``max_tokens``) and corrected to the usage the server reports
    once it returns; each report also refines the scale, so the budget converges to the provider's tokenizer.
    """

    WINDOW = 60.0
    MARGIN = 0.02  # a request leaves the window 2% late: arrivals jitter, and providers count exact windows

    def __init__(self, requests_per_minute: int, tokens_per_minute: int):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._sent: deque[list] = deque()  # [time, tokens] of requests in the window
        self._lock = threading.Lock()
        self._prompts = [0.0, 0]  # prompt tokens estimated, and reported by the server, over the answered requests

    def estimate(self, request: dict) -> tuple[int, float]:
        """Tokens to reserve for ``request`` (its prompt estimate scaled by reported/estimated prompt tokens so
        far, plus ``max_tokens``), and its unscaled prompt estimate, for :meth:`settle`."""
        prompt = 3 + sum(MESSAGE_TOKENS + estimate_tokens(m["content"]) for m in request["messages"])
        with self._lock:
            estimated, reported = self._prompts
        scale = reported / estimated if estimated and reported else 1.0
        return math.ceil(prompt * scale) + request["max_tokens"], prompt

    def acquire(self, tokens: int, stop: threading.Event | None = None) -> list | None:
        """Block until the request fits the limits; returns its entry, to :meth:`settle` with the real usage
        (None once ``stop`` is set)."""
        while stop is None or not stop.is_set():
            with self._lock:
                now = time.monotonic()
                while self._sent and now - self._sent[0][0] >= self.WINDOW * (1 + self.MARGIN):
                    self._sent.popleft()
                wait = self._wait(now, tokens)
                if wait <= 0:
                    entry = [now, tokens]
                    self._sent.append(entry)
                    return entry
            time.sleep(min(wait, 1.0))
        return None

    def _wait(self, now: float, tokens: int) -> float:
        waits = [0.0]
        if self.rpm and len(self._sent) >= self.rpm:
            waits.append(self._sent[-self.rpm][0] + self.WINDOW * (1 + self.MARGIN) - now)
        if self.tpm and self._sent:
            used, released = sum(t for _, t in self._sent), 0
            for started, used_by in self._sent:  # wait until enough of the window's tokens have aged out
                if used - released + tokens <= self.tpm:
                    break
                released += used_by
                waits.append(started + self.WINDOW * (1 + self.MARGIN) - now)
        return max(waits)

    def settle(self, entry: list, tokens: int, prompt_estimate: float = 0.0, prompt_tokens: int = 0) -> None:
        """Count the request with the ``tokens`` it used; learn the scale from its prompt's estimate and usage."""
        with self._lock:
            entry[1] = tokens
            if prompt_estimate > 0 and prompt_tokens > 0:
                self._prompts[0] += prompt_estimate
                self._prompts[1] += prompt_tokens


# ---------------------------------------------------------------- the ledger


class Ledger:
    """Outcomes of finished requests of one ``scope`` (a stage's parent run), durable in the state database.

    :meth:`record` buffers; a daemon thread writes the buffer every ``flush_seconds`` (0: every record at once),
    and :meth:`flush` / :meth:`close` write what is left. :meth:`lookup` and :meth:`flush` exclude each other: a
    flush takes rows out of the buffer before they are in the database, and a lookup between the two would miss
    them (and pay for them again).
    """

    def __init__(self, url: str, scope: str, flush_seconds: float):
        self.engine = make_engine(url)
        create_table(self.engine, _ledger)
        self.scope, self.flush_seconds = scope, flush_seconds
        self._buffer: dict[str, dict] = {}
        self._lock = threading.Lock()  # guards the buffer
        self._flushing = threading.Lock()  # one flush (or lookup) at a time: close() waits for a running one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="llm-ledger", daemon=True)
        if flush_seconds > 0:
            self._thread.start()

    def lookup(self, keys: list[str]) -> dict[str, dict]:
        """The recorded outcomes of ``keys``: written or still buffered (never in between, mid-flush)."""
        found: dict[str, dict] = {}
        with self._flushing, self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                query = select(_ledger.c.key, _ledger.c.outcome).where(
                    _ledger.c.scope == self.scope, _ledger.c.key.in_(keys[i:i + 500]))
                found.update({key: json.loads(outcome) for key, outcome in conn.execute(query)})
            with self._lock:
                wanted = set(keys)
                found.update({key: outcome for key, outcome in self._buffer.items() if key in wanted})
        return found

    def record(self, key: str, outcome: dict) -> None:
        with self._lock:
            self._buffer[key] = outcome
        if self.flush_seconds <= 0:
            self._try_flush()
        faults.failpoint("llm_request")

    def flush(self) -> None:
        """Write the buffered outcomes; on failure they stay buffered for the next flush, and it raises."""
        with self._flushing:
            with self._lock:
                rows, self._buffer = self._buffer, {}
            try:
                items = list(rows.items())
                for start in range(0, len(items), 300):
                    self._write(items[start:start + 300])
            except BaseException:
                with self._lock:
                    self._buffer = {**rows, **self._buffer}
                raise

    def _write(self, items: list[tuple[str, dict]]) -> None:
        values = [{"scope": self.scope, "key": key, "outcome": json.dumps(outcome, ensure_ascii=False)}
                  for key, outcome in items]
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(_ledger).values(values)
        statement = statement.on_conflict_do_update(index_elements=["scope", "key"],
                                                    set_={"outcome": statement.excluded.outcome})
        with self.engine.begin() as conn:
            conn.execute(statement)

    def _try_flush(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - kept buffered for the next round; never die
            logger.warning("llm ledger flush failed, will retry: %s", str(exc).splitlines()[0])

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self._try_flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        self.engine.dispose()


# ---------------------------------------------------------------- the client


@dataclass
class Client:
    """Sends the requests of one stage run: concurrently, within rate limits, retried, each recorded once."""

    cfg: LLMSettings
    ledger: Ledger

    def __post_init__(self) -> None:
        self._openai = openai.OpenAI(base_url=self.cfg.base_url, api_key=api_key(self.cfg.api_key_env),
                                     max_retries=0, timeout=self.cfg.request_timeout)
        self._limiter = RateLimiter(self.cfg.requests_per_minute, self.cfg.tokens_per_minute)
        self._stopping = threading.Event()  # set when interrupted: requests in flight finish, nothing new is sent

    def answer(self, requests: list[dict]) -> pd.DataFrame:
        """One row of :data:`COLUMNS` per request, in order: from the ledger where it holds the outcome (a
        failure only unless ``retry_failed``), else from the endpoint."""
        keys = [request_key(r) for r in requests]
        known = self.ledger.lookup(keys)
        if self.cfg.retry_failed:
            known = {k: v for k, v in known.items() if not v["error"]}
        todo = {k: r for k, r in zip(keys, requests) if k not in known}
        if len(known):
            logger.info("llm: %d of %d requests answered before (ledger), sending %d", len(set(keys) & set(known)),
                        len(keys), len(todo))
        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="llm") as pool:
            futures = {k: pool.submit(self._send, k, r) for k, r in todo.items()}
            try:
                known.update({k: f.result() for k, f in futures.items()})
            except BaseException:  # interrupted: record what came back, let requests in flight return, send no more
                self._stopping.set()
                self.ledger._try_flush()
                pool.shutdown(wait=True, cancel_futures=True)
                self.ledger.flush()
                raise
        self.ledger.flush()
        return pd.DataFrame([known[k] for k in keys], columns=list(COLUMNS))

    def _send(self, key: str, request: dict) -> dict:
        estimate, prompt_estimate = self._limiter.estimate(request)
        retries = 0
        while True:
            slot = self._limiter.acquire(estimate, self._stopping)
            if slot is None:
                return {}  # interrupted before sending (again): a resumed run sends it
            started = time.monotonic()
            try:
                reply = self._openai.chat.completions.create(**request)
                answer = reply.choices[0].message.content or ""
            except Exception as exc:  # noqa: BLE001 - recorded per request; the run goes on
                if isinstance(exc, FATAL) or getattr(exc, "code", None) == "insufficient_quota":
                    raise ConfigError(f"{redact_url(self.cfg.base_url)} refused the request ({self._describe(exc)}): "
                                      f"check api_key_env, the account's quota, base_url and llm_model="
                                      f"{self.cfg.llm_model}") from None
                if not _retried(exc) or retries >= self.cfg.max_retries:
                    return self._record(key, _outcome(error=self._describe(exc), retries=retries))
                retries += 1
                if self._stopping.wait(_backoff(exc, retries)):
                    return {}
                continue
            usage = reply.usage
            self._limiter.settle(slot, usage.total_tokens if usage else estimate, prompt_estimate,
                                 usage.prompt_tokens if usage else 0)
            return self._record(key, _outcome(
                response=answer, retries=retries, prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                latency_s=round(time.monotonic() - started, 4)))

    def _describe(self, exc: Exception) -> str:
        """The error in a line, with the API key masked (some gateways echo it)."""
        return _describe(exc, self._openai.api_key)

    def _record(self, key: str, outcome: dict) -> dict:
        self.ledger.record(key, outcome)
        return outcome


def _outcome(response: str = "", prompt_tokens: int = 0, completion_tokens: int = 0, latency_s: float = 0.0,
             error: str = "", retries: int = 0) -> dict:
    return {"response": response, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "latency_s": latency_s, "error": error, "retries": retries}


def _retried(exc: Exception) -> bool:
    """Whether a failed attempt is worth repeating: timeouts, dropped connections, 408/409/429 and 5xx."""
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(exc, openai.APIStatusError) and (status in RETRIED_STATUS or status >= 500)


def _describe(exc: Exception, secret: str) -> str:
    """The error in a line of at most 300 characters of its message, ``secret`` masked first (never half of it)."""
    status = getattr(exc, "status_code", None)
    text = f"{type(exc).__name__}" + (f" {status}" if status else "")
    message = getattr(exc, "message", "") or str(exc)
    if secret:
        message = message.replace(secret, "***")
    return f"{text}: {message.splitlines()[0][:300]}" if message else text


def _backoff(exc: Exception, attempt: int) -> float:
    """Seconds before retry ``attempt``: the server's ``retry-after`` if it sent one, else 2^attempt / 2 with
    jitter, capped at a minute."""
    response = getattr(exc, "response", None)
    header = response.headers.get("retry-after") if response is not None else None
    try:
        seconds = float(header) if header is not None else math.nan
    except ValueError:
        seconds = math.nan
    if math.isfinite(seconds) and seconds >= 0:
        return min(seconds, MAX_BACKOFF)
    return min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF) * random.uniform(0.5, 1.0)


def statistics(responses: pd.DataFrame, cfg: LLMSettings) -> dict[str, float]:
    """The run's metrics over all its requests (the same after a resume: answers come from the ledger)."""
    ok = responses[responses["error"].fillna("") == ""]
    prompt, completion = int(responses["prompt_tokens"].sum()), int(responses["completion_tokens"].sum())
    metrics = {"requests": len(responses), "failures": len(responses) - len(ok),
               "retries": int(responses["retries"].sum()), "prompt_tokens": prompt, "completion_tokens": completion,
               "total_tokens": prompt + completion}
    if len(ok):
        metrics |= {"latency_p50_s": float(ok["latency_s"].quantile(0.5)),
                    "latency_p95_s": float(ok["latency_s"].quantile(0.95))}
    if cfg.price_per_1k_input or cfg.price_per_1k_output:
        metrics["cost"] = prompt / 1000 * cfg.price_per_1k_input + completion / 1000 * cfg.price_per_1k_output
    return metrics
