"""Unit leases on real databases: a SQLite file and a real PostgreSQL server (no mocks).

Every test runs on both backends; each PostgreSQL test gets its own fresh database, so the table is
created from scratch, and the race test's 8 processes really race on ``CREATE TABLE``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import uuid4

import pytest
from helpers import wait_until
from sqlalchemy import text
from sqlalchemy.engine import make_url

from pipelines.leases import Lease, LeaseLost, LeaseStore, owner_alive

ROOT = Path(__file__).resolve().parent.parent
OTHER_HOST = "elsewhere.invalid"
RACERS = 8

# Imports first, says "ready", waits for a start time on stdin, then (at that instant) opens the store
# -- creating the table -- and tries the lease; holds it until told "done" so that nobody can take it.
RACER = r"""
import json, logging, sys, time
from pipelines.leases import LeaseStore

class Count(logging.Handler):
    retries = 0
    def emit(self, record):
        Count.retries += "raced" in record.getMessage()

logging.getLogger("pipelines.leases").addHandler(Count())
logging.getLogger("pipelines.leases").setLevel(logging.INFO)
url, scope, unit = sys.argv[1:4]
print("ready", flush=True)
start = float(sys.stdin.readline())
while time.time() < start:
    pass
store = LeaseStore(url, heartbeat_interval=0.5, grace_period=5)
lease = store.acquire(scope, unit)
print(json.dumps({"won": lease is not None, "owner": store.owner, "create_retries": Count.retries}), flush=True)
sys.stdin.readline()
store.close()
"""

# Takes a lease, says who it is, and dies without releasing it.
SUICIDE = r"""
import os, signal, sys
from pipelines.leases import LeaseStore
store = LeaseStore(sys.argv[1])
lease = store.acquire(sys.argv[2], sys.argv[3])
print(lease.owner, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def fresh_postgres(server_url: str) -> str:
    """A new, empty database on the test server; its URL."""
    import psycopg2

    url = make_url(server_url)
    name = f"leases_{uuid4().hex[:12]}"
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, dbname=url.database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    """A database no store has touched yet (its SQLite folder does not even exist)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'not-yet' / 'leases.db'}"
    return fresh_postgres(request.getfixturevalue("postgres_url"))


@pytest.fixture
def stores(url):
    """Factory of stores on ``url`` with short timings, all closed at the end."""
    made: list[LeaseStore] = []

    def make(heartbeat_interval: float = 0.2, grace_period: float = 1.0) -> LeaseStore:
        made.append(LeaseStore(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period))
        return made[-1]

    yield make
    for store in made:
        store.close()


def put_row(store: LeaseStore, scope: str, unit: str, owner: str, heartbeat: float) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO pipelines_leases (scope, unit, owner, heartbeat) VALUES (:s, :u, :o, :h)"),
                      {"s": scope, "u": unit, "o": owner, "h": heartbeat})


def test_owner_alive():
    import socket

    host = socket.gethostname()
    assert owner_alive(f"{host}:{os.getpid()}:abcd1234") is True
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    assert owner_alive(f"{host}:{int(gone.stdout)}:abcd1234") is False
    assert owner_alive(f"{OTHER_HOST}:{os.getpid()}:abcd1234") is None
    assert owner_alive("not an owner id") is None


def test_bad_timings_refused(tmp_path):
    with pytest.raises(ValueError):
        LeaseStore(f"sqlite:///{tmp_path}/x.db", heartbeat_interval=5, grace_period=5)
    with pytest.raises(ValueError):
        LeaseStore("sqlite://")  # in-memory: not shared between workers


def test_acquire_refuse_release(stores):
    first, second = stores(), stores()
    lease = first.acquire("fold", "0")
    assert isinstance(lease, Lease) and lease.owner == first.owner and not lease.lost
    assert second.acquire("fold", "0") is None  # a live owner holds it
    assert first.acquire("fold", "0") is lease  # ours already: the same lease
    other = second.acquire("fold", "1")  # other units are independent
    assert other is not None
    [info, _] = second.holders("fold")
    assert (info.unit, info.owner, info.alive) == ("0", first.owner, True)
    assert second.holders("another-scope") == []

    lease.release()
    lease.release()  # idempotent
    assert [info.unit for info in first.live("fold")] == ["1"]
    with second.acquire("fold", "0") as taken:
        assert taken.owner == second.owner
        assert first.acquire("fold", "0") is None
    assert first.acquire("fold", "0") is not None  # freed on leaving the with block


def test_dead_owner_on_this_host_taken_over_at_once(url, stores):
    died = subprocess.run([sys.executable, "-c", SUICIDE, url, "shard", "7"], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=60)
    assert died.returncode == -signal.SIGKILL, died.stderr
    dead_owner = died.stdout.strip()
    store = stores(heartbeat_interval=10, grace_period=300)  # the heartbeat is fresh: only the pid tells
    [info] = store.holders("shard")
    assert info.owner == dead_owner and time.time() - info.heartbeat < 60
    assert owner_alive(dead_owner) is False and not info.alive
    assert store.live("shard") == []
    lease = store.acquire("shard", "7")
    assert lease is not None and [i.owner for i in store.live("shard")] == [store.owner]


def test_owner_on_another_host_taken_over_after_grace(stores):
    store = stores(heartbeat_interval=0.2, grace_period=1.0)
    owner = f"{OTHER_HOST}:{os.getpid()}:0badf00d"
    put_row(store, "fold", "3", owner, time.time())
    assert owner_alive(owner) is None
    assert store.acquire("fold", "3") is None
    assert [(i.owner, i.alive) for i in store.holders("fold")] == [(owner, True)]
    time.sleep(1.3)
    assert [(i.owner, i.alive) for i in store.holders("fold")] == [(owner, False)]
    lease = store.acquire("fold", "3")
    assert lease is not None and lease.owner == store.owner
    lease.release()
    assert store.holders("fold") == []


def test_heartbeat_keeps_lease_and_detects_takeover(stores):
    holder, rival = stores(), stores()
    lease = holder.acquire("fold", "1")
    time.sleep(1.6)  # well past the 1 s grace period
    assert rival.acquire("fold", "1") is None
    [info] = rival.live("fold")
    assert info.owner == holder.owner and time.time() - info.heartbeat < 0.6
    lease.check()

    thief = f"{OTHER_HOST}:1:5eeeeeee"
    with rival.engine.begin() as conn:  # a forced takeover, as another store would do after a long stall
        conn.execute(text("UPDATE pipelines_leases SET owner = :o, heartbeat = :h WHERE scope = 'fold'"),
                     {"o": thief, "h": time.time()})
    assert wait_until(lambda: lease.lost, timeout=3)
    with pytest.raises(LeaseLost):
        lease.check()
    assert holder.acquire("fold", "1") is None  # the thief is alive
    lease.release()  # must not delete the thief's row
    assert [i.owner for i in rival.holders("fold")] == [thief]


def test_wait_for_returns_once_released(stores):
    holder, waiter = stores(), stores()
    lease = holder.acquire("fold", "2")
    with pytest.raises(TimeoutError):
        waiter.wait_for("fold", "2", timeout=0.3, poll=0.05)
    timer = threading.Timer(0.5, lease.release)
    timer.start()
    started = time.monotonic()
    got = waiter.wait_for("fold", "2", timeout=10, poll=0.05)
    timer.join()
    assert got.owner == waiter.owner and time.monotonic() - started >= 0.4
    assert holder.acquire("fold", "2") is None


def race(url: str, scope: str, unit: str) -> list[dict]:
    """``RACERS`` processes open ``url`` and try to take the same lease at the same instant."""
    procs = [subprocess.Popen([sys.executable, "-c", RACER, url, scope, unit], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(RACERS)]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
        start = time.time() + 0.3
        for p in procs:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        lines = [p.stdout.readline() for p in procs]
        for p in procs:
            p.stdin.write("done\n")
            p.stdin.flush()
        errors = [p.communicate(timeout=30)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    crashed = [err for p, err in zip(procs, errors) if p.returncode != 0]
    assert not crashed, crashed[0]
    return [json.loads(line) for line in lines]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", ["fresh", "stale"])
def test_race_exactly_one_wins(url, start):
    """``fresh``: the database (and table) does not exist yet; ``stale``: all race to take over a dead row."""
    if start == "stale":
        setup = LeaseStore(url)
        put_row(setup, "race", "u", f"{OTHER_HOST}:1:deadbeef", time.time() - 3600)
        setup.close()
    results = race(url, "race", "u")
    winners = [r["owner"] for r in results if r["won"]]
    assert len(results) == RACERS and len(winners) == 1, results
    retries = sum(r["create_retries"] for r in results)
    print(f"race url={url.split(':')[0]} start={start} create_retries={retries}")
    check = LeaseStore(url)
    try:
        assert check.holders("race") == []  # the winner released on exit
    finally:
        check.close()


def test_heartbeat_survives_transient_errors(stores, caplog):
    holder = stores(heartbeat_interval=0.1, grace_period=5)
    lease = holder.acquire("fold", "4")
    with holder.engine.begin() as conn:  # the table vanishes for a while: every heartbeat fails
        conn.execute(text("ALTER TABLE pipelines_leases RENAME TO pipelines_leases_away"))
    assert wait_until(lambda: "lease heartbeat failed" in caplog.text, timeout=3)
    with holder.engine.begin() as conn:
        conn.execute(text("ALTER TABLE pipelines_leases_away RENAME TO pipelines_leases"))
    since = time.time()
    assert wait_until(lambda: holder.holders("fold")[0].heartbeat > since, timeout=3)  # beating again
    assert not lease.lost and lease._thread.is_alive()
    lease.check()
