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
   passes if no 5 s window holds more than 10 request arrivals at the server and the 30 requests take >= 10 s.
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

import openai  # noqa: E402
from fake_llm import FakeLLM  # noqa: E402

from pipelines.config import LlmConfig  # noqa: E402
from pipelines.llm import Client, Ledger, RateLimiter, canonical_request  # noqa: E402

logger = logging.getLogger("benchmark")
KEY_ENV = "BENCH_KEY"


def prompts(tag: str, count: int) -> list[str]:
    """Distinct prompts, never seen before by any ledger (a fresh random tag per measurement)."""
    return [f"{tag} request {i} summarize the delivery was fast and the price was fair" for i in range(count)]


def sequential_openai(latency: float, count: int) -> dict:
    with FakeLLM(latency=latency) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=os.environ[KEY_ENV], max_retries=0)
        answers = []
        start = time.perf_counter()
        for prompt in prompts(f"seq-{uuid.uuid4().hex[:8]}", count):
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                   temperature=0.0, max_tokens=256)
            answers.append(reply.choices[0].message.content or "")
        seconds = time.perf_counter() - start
        client.close()
        return {"seconds": seconds, "nonempty": sum(bool(a) for a in answers), "received": server.total,
                "log": list(server.log)}


def client_answer(latency: float, count: int, concurrency: int, requests_per_minute: int = 0) -> dict:
    """``Client.answer`` on ``count`` fresh prompts, with a fresh ledger; the ledger's set-up is not timed."""
    with FakeLLM(latency=latency) as server, tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        cfg = LlmConfig(base_url=server.base_url, llm_model="m", concurrency=concurrency,
                        requests_per_minute=requests_per_minute, flush_seconds=10, api_key_env=KEY_ENV)
        tag = f"bench-{uuid.uuid4().hex[:12]}"
        ledger = Ledger(f"sqlite:///{tmp}/ledger.db", scope=tag, flush_seconds=10)
        try:
            client = Client(cfg, ledger)
            requests = [canonical_request(p, cfg, "") for p in prompts(tag, count)]
            start = time.perf_counter()
            frame = client.answer(requests)
            seconds = time.perf_counter() - start
        finally:
            ledger.close()
        nonempty = int(((frame["response"].fillna("") != "") & (frame["error"].fillna("") == "")).sum())
        return {"seconds": seconds, "nonempty": nonempty, "received": server.total, "log": list(server.log)}


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
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
        limited = client_answer(args.latency, args.limit_requests, 32, args.limit_per_window)
    finally:
        RateLimiter.WINDOW = saved

    base = rows[0][1]["seconds"]
    print(f"\nfake OpenAI-compatible server on 127.0.0.1, {args.latency * 1000:.0f} ms latency per request, {n} "
          f"requests each; openai {openai.__version__}, Python {platform.python_version()}, {platform.machine()} "
          f"{os.cpu_count()} cores")
    print(f"{'method':32} {'seconds':>8} {'requests/s':>11} {'vs loop':>8} {'non-empty':>10} {'received':>9}  check")
    ok = True
    for name, r in rows:
        passed = r["nonempty"] == n and r["received"] == n
        ok &= passed
        print(f"{name:32} {r['seconds']:8.2f} {n / r['seconds']:11.2f} {base / r['seconds']:7.2f}x "
              f"{r['nonempty']:>6}/{n:<3} {r['received']:>9}  {'PASS' if passed else 'FAIL'}")

    arrivals = [t for t, _, _ in limited["log"]]
    m = args.limit_requests
    most = max_in_window(arrivals, args.limit_window)
    floor = (-(-m // args.limit_per_window) - 1) * args.limit_window  # the last batch may start only this late
    passed = (most <= args.limit_per_window and limited["seconds"] >= floor and limited["nonempty"] == m
              and limited["received"] == m)
    ok &= passed
    print(f"\nrate limiter (RateLimiter.WINDOW shortened from {saved:.0f} s to {args.limit_window:.0f} s so the "
          f"benchmark finishes fast; same sliding-window logic): concurrency 32, requests_per_minute="
          f"{args.limit_per_window} (= {args.limit_per_window} per {args.limit_window:.0f} s window), {m} requests")
    print(f"  total {limited['seconds']:.2f} s (must be >= {floor:.0f} s), achieved {m / limited['seconds']:.2f} "
          f"requests/s (limit {args.limit_per_window / args.limit_window:.2f}/s sustained)")
    print(f"  most server arrivals in any {args.limit_window:.0f} s window: {most} (must be <= "
          f"{args.limit_per_window}); in any 1 s window: {max_in_window(arrivals, 1.0)}; non-empty answers "
          f"{limited['nonempty']}/{m}, received {limited['received']}")
    print(f"  {'PASS' if passed else 'FAIL'}")
    print(f"\noverall: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
