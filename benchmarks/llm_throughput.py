"""LLM client throughput (requests/s): `pipelines.llm.Client` against a plain sequential `openai` loop, on the local
OpenAI-compatible fake server (tests/fake_llm.py) with a fixed latency per request, and a check of the
requests-per-minute limiter.

    python benchmarks/llm_throughput.py [--requests 64] [--latency 0.2] [--concurrency 1 8 32]

1. a sequential loop of ``client.chat.completions.create`` with the official ``openai`` client;
2. ``Client.answer`` at each concurrency, with a fresh ledger (own SQLite file and scope) and distinct prompts every
   time, so no answer comes from the ledger: seconds, requests/s, speed-up over the loop, and checks that every answer
   is non-empty and the server received exactly ``--requests`` requests;
3. the limiter: concurrency 32, ``requests_per_minute`` 10 and 30 requests, with ``RateLimiter.WINDOW`` shortened
   from 60 s to 5 s for this measurement only (same logic, so that it finishes in ~10 s instead of ~2 minutes). It
   reports the most requests in any 5 s window twice: as admitted by the limiter (the times it hands out, recorded by
   a wrapper around ``RateLimiter.acquire``) and as they arrived at the server (``server.log``), strictly and with a
   tolerance for network jitter (``--jitter``, 0.1 s: windows of 4.9 s). It passes if the limiter admitted <= 10 per
   window, the server saw <= 10 in any window (exact 5 s, and 4.9 s), and the 30 requests took >= 10 s.

Exits 1 if any check that counts fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import openai
from fake_llm import FakeLLM

from pipelines.config import LlmConfig
from pipelines.llm import Client, Ledger, RateLimiter, canonical_request

logger = logging.getLogger("benchmark")
KEY_ENV = "BENCH_KEY"


def prompts(tag: str, count: int) -> list[str]:
    """Distinct prompts, never seen before by any ledger (a fresh random tag per measurement)."""
    return [f"{tag} request {i} summarize the delivery was fast and the price was fair" for i in range(count)]


def sequential_openai(latency: float, count: int) -> dict:
    with FakeLLM(latency=latency) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=os.environ[KEY_ENV], max_retries=0)
        answers, slowest = [], 0.0
        start = time.perf_counter()
        for prompt in prompts(f"seq-{uuid.uuid4().hex[:8]}", count):
            sent = time.perf_counter()
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                   temperature=0.0, max_tokens=256)
            answers.append(reply.choices[0].message.content or "")
            slowest = max(slowest, time.perf_counter() - sent)
        seconds = time.perf_counter() - start
        client.close()
        return {"seconds": seconds, "nonempty": sum(bool(a) for a in answers), "received": server.total,
                "log": list(server.log), "retries": 0, "slowest": slowest}


def client_answer(latency: float, count: int, concurrency: int, requests_per_minute: int = 0,
                  admitted: list[float] | None = None) -> dict:
    """``Client.answer`` on ``count`` fresh prompts, with a fresh ledger; the ledger's set-up is not timed."""
    with FakeLLM(latency=latency) as server, tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        cfg = LlmConfig(base_url=server.base_url, llm_model="m", concurrency=concurrency,
                        requests_per_minute=requests_per_minute, flush_seconds=10, api_key_env=KEY_ENV)
        tag = f"bench-{uuid.uuid4().hex[:12]}"
        ledger = Ledger(f"sqlite:///{tmp}/ledger.db", scope=tag, flush_seconds=10)
        try:
            client = Client(cfg, ledger)
            if admitted is not None:  # record the limiter's admission times; its logic is untouched
                acquire = client._limiter.acquire

                def recorded(*args, **kwargs):  # whatever acquire's signature; None: stopped, nothing admitted
                    entry = acquire(*args, **kwargs)
                    if entry is not None:
                        admitted.append(entry[0])
                    return entry

                client._limiter.acquire = recorded
            requests = [canonical_request(p, cfg, "") for p in prompts(tag, count)]
            start = time.perf_counter()
            frame = client.answer(requests)
            seconds = time.perf_counter() - start
        finally:
            ledger.close()
        nonempty = int(((frame["response"].fillna("") != "") & (frame["error"].fillna("") == "")).sum())
        return {"seconds": seconds, "nonempty": nonempty, "received": server.total, "log": list(server.log),
                "retries": int(frame["retries"].sum()), "slowest": float(frame["latency_s"].max())}


def max_in_window(times: list[float], window: float) -> int:
    """Most arrivals in any half-open interval [t, t + window)."""
    times, best, first = sorted(times), 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput measurement")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the fake server takes per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--limit_requests", type=int, default=30, help="requests of the limiter check")
    parser.add_argument("--limit_per_window", type=int, default=10, help="requests_per_minute of the limiter check")
    parser.add_argument("--limit_window", type=float, default=5.0, help="RateLimiter.WINDOW during the check (s)")
    parser.add_argument("--jitter", type=float, default=0.1, help="network jitter tolerated at the server (s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise (openai's bundled httpx fork: httpx2)
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ[KEY_ENV] = "k"
    n = args.requests

    logger.info("sequential openai loop, %d requests", n)
    rows = [("openai, sequential loop", sequential_openai(args.latency, n))]
    for concurrency in args.concurrency:
        logger.info("Client.answer, concurrency %d, %d requests", concurrency, n)
        rows.append((f"Client.answer, concurrency {concurrency}", client_answer(args.latency, n, concurrency)))

    logger.info("rate limiter: RateLimiter.WINDOW %.0f s, %d per window, %d requests", args.limit_window,
                args.limit_per_window, args.limit_requests)
    saved = RateLimiter.WINDOW
    RateLimiter.WINDOW = args.limit_window  # read through self.WINDOW: shortened for this measurement only
    try:
        admitted: list[float] = []
        limited = client_answer(args.latency, args.limit_requests, 32, args.limit_per_window, admitted)
    finally:
        RateLimiter.WINDOW = saved

    base = rows[0][1]["seconds"]
    print(f"\nfake OpenAI-compatible server on 127.0.0.1, {args.latency * 1000:.0f} ms latency per request, {n} "
          f"requests each; openai {openai.__version__}, Python {platform.python_version()}, {platform.machine()} "
          f"{os.cpu_count()} cores")
    print(f"{'method':32} {'seconds':>8} {'requests/s':>11} {'vs loop':>8} {'non-empty':>10} {'received':>9} "
          f"{'retries':>8} {'slowest s':>10}  check")
    ok = True
    for name, r in rows:
        passed = r["nonempty"] == n and r["received"] == n
        ok &= passed
        print(f"{name:32} {r['seconds']:8.2f} {n / r['seconds']:11.2f} {base / r['seconds']:7.2f}x "
              f"{r['nonempty']:>6}/{n:<3} {r['received']:>9} {r['retries']:>8} {r['slowest']:10.3f}  "
              f"{'PASS' if passed else 'FAIL'}")

    m, per, window = args.limit_requests, args.limit_per_window, args.limit_window
    arrivals, admitted = sorted(t for t, _, _ in limited["log"]), sorted(admitted)
    most_admitted, most_strict = max_in_window(admitted, window), max_in_window(arrivals, window)
    most_jitter = max_in_window(arrivals, window - args.jitter)
    floor = (-(-m // per) - 1) * window  # the last window's requests may start only this late
    tightest = min((arrivals[i + per] - arrivals[i] for i in range(len(arrivals) - per)), default=float("nan"))
    checks = {f"limiter admitted <= {per} in any {window:g} s window": most_admitted <= per,
              f"server saw <= {per} in any {window - args.jitter:g} s window ({args.jitter * 1000:.0f} ms jitter)":
                  most_jitter <= per,
              f"server saw <= {per} in any exact {window:g} s window": most_strict <= per,
              f"total >= {floor:g} s": limited["seconds"] >= floor,
              f"{m}/{m} non-empty answers, {m} requests received": limited["nonempty"] == m and limited["received"] == m}
    ok &= all(checks.values())
    print(f"\nrate limiter (RateLimiter.WINDOW shortened from {saved:g} s to {window:g} s so the benchmark finishes "
          f"fast; same sliding-window logic): concurrency 32, requests_per_minute={per} (= {per} per {window:g} s "
          f"window), {m} requests")
    print(f"  total {limited['seconds']:.2f} s, achieved {m / limited['seconds']:.2f} requests/s (sustained limit "
          f"{per / window:.2f}/s; the first window's {per} go out at once); retries {limited['retries']}")
    print(f"  most requests in any {window:g} s window: admitted by the limiter {most_admitted}; arrived at the server "
          f"{most_strict} strictly, {most_jitter} in any {window - args.jitter:g} s window; in any 1 s window "
          f"{max_in_window(arrivals, 1.0)}")
    print(f"  tightest span of {per + 1} consecutive server arrivals: {tightest:.4f} s (limiter: "
          f"{min((admitted[i + per] - admitted[i] for i in range(len(admitted) - per)), default=float('nan')):.4f} s)")
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    print(f"\noverall: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
