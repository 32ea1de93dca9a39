"""Unit leases in an SQL database, so that workers never run the same unit at the same time.

Several worker processes, possibly on several machines, share one database (SQLite for one machine,
PostgreSQL for several).  Before working on a unit (a fold, a shard, ...) a worker takes its lease:
one row of the table ``pipelines_leases`` keyed by ``(scope, unit)`` and naming its ``owner``
(``host:pid:random``) and the epoch time of its last ``heartbeat``.

* Taking a free unit is a single ``INSERT``; the primary key lets only one of several concurrent
  inserts succeed (the others get an ``IntegrityError``).
* Taking over a row whose owner is dead is a single compare-and-set
  ``UPDATE ... WHERE owner = :seen_owner AND heartbeat = :seen_heartbeat``: of several workers that
  read the same dead row, only the first update matches a row (``rowcount == 1``), so at most one wins.
* While a lease is held a daemon thread updates its heartbeat every ``heartbeat_interval`` seconds
  with ``UPDATE ... WHERE owner = me``.  Should that match no row, the lease was taken over: the
  lease is marked ``lost`` and :meth:`Lease.check` raises :class:`LeaseLost`; call it before
  committing results.  Database errors in the heartbeat are logged and retried.
* A row is dead when its heartbeat is older than ``grace_period`` seconds, or at once when its owner
  is a process of this host that no longer exists (``os.kill(pid, 0)``).  Keep ``grace_period``
  several times ``heartbeat_interval``.

Heartbeats are the workers' own ``time.time()`` and are judged by the reader's clock, so the
workers' clocks must be in sync (NTP); a skew eats into ``grace_period``.  The same-host shortcut
assumes host names are unique per process namespace (two containers with one host name and separate
PID namespaces would see each other's workers as dead): give each container its own host name.
An owner id belongs to one :class:`LeaseStore`; threads sharing a store share its leases.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

from sqlalchemy import Column, Double, MetaData, String, Table, and_, create_engine, delete, insert, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

TABLE = "pipelines_leases"
CREATE_TIMEOUT = 60.0  # seconds spent retrying the creation of the table before giving up
TAKEOVER_ATTEMPTS = 5  # insert / compare-and-set rounds in one acquire before reporting the unit busy
CREATE_RACES = ("already exists", "pg_type_typname_nsp_index", "duplicate key value", "database is locked",
                 "deadlock detected", "tuple concurrently updated")

_metadata = MetaData()
_leases = Table(
    TABLE, _metadata,
    Column("scope", String(255), primary_key=True),
    Column("unit", String(255), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("heartbeat", Double, nullable=False),
)


class LeaseLost(RuntimeError):
    """Another owner took the lease over (our heartbeat stopped matching the row)."""


@dataclass(frozen=True)
class LeaseInfo:
    """One row of the lease table, with ``alive`` computed by the store when it was read."""

    scope: str
    unit: str
    owner: str
    heartbeat: float
    alive: bool


def new_owner() -> str:
    """A fresh owner id: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:8]}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process of ``owner`` exists: True/False on this host, None for another host."""
    try:
        host, pid_text, _ = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname() or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    return True


def _is_alive(owner: str, heartbeat: float, now: float, grace_period: float) -> bool:
    return now - heartbeat <= grace_period and owner_alive(owner) is not False


def _key(scope: str, unit: str) -> ColumnElement[bool]:
    return and_(_leases.c.scope == scope, _leases.c.unit == unit)


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ValueError(f"leases need a database file shared by all workers, not url={url!r}")
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url, connect_args={"timeout": 30}, pool_pre_ping=True)


def create_table(engine: Engine, table: Table = _leases) -> None:
    """Create ``table`` if missing, surviving other processes creating it at the same instant."""
    deadline = time.monotonic() + CREATE_TIMEOUT
    attempt = 0
    while True:
        try:
            table.create(engine, checkfirst=True)
            return
        except DBAPIError as exc:
            message = str(exc.orig if exc.orig is not None else exc)
            if not any(race in message for race in CREATE_RACES) or time.monotonic() > deadline:
                raise
            attempt += 1
            pause = random.uniform(0.05, 0.25) * min(attempt, 4)
            logger.info("table creation raced, retrying table=%s attempt=%d pause=%.2f error=%s",
                        table.name, attempt, pause, message.strip().splitlines()[0])
            time.sleep(pause)


class Lease:
    """A held lease; heartbeats in a daemon thread until released (also on leaving a ``with`` block)."""

    def __init__(self, store: LeaseStore, scope: str, unit: str, owner: str) -> None:
        self.scope = scope
        self.unit = unit
        self.owner = owner
        self.lost = False
        self._store = store
        self._stop = threading.Event()
        self._released = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{scope}/{unit}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Lease(scope={self.scope!r}, unit={self.unit!r}, owner={self.owner!r}, lost={self.lost})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Neither released nor lost."""
        return not self._released and not self.lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another owner took the lease over."""
        if self.lost:
            raise LeaseLost(f"lease taken over scope={self.scope} unit={self.unit} owner={self.owner}")

    def _beat(self) -> None:
        while not self._stop.wait(self._store.heartbeat_interval):
            try:
                matched = self._store._touch(self.scope, self.unit, self.owner)
            except SQLAlchemyError as exc:  # transient (network, locks, restarts): keep beating, never die
                logger.warning("lease heartbeat failed, will retry scope=%s unit=%s owner=%s error=%s: %s",
                               self.scope, self.unit, self.owner, type(exc).__name__,
                               (str(exc).splitlines() or [""])[0])
                continue
            if not matched and not self._stop.is_set():
                self.lost = True
                logger.error("lease lost: another owner took it over scope=%s unit=%s owner=%s",
                             self.scope, self.unit, self.owner)
                return

    def _abandon(self) -> None:
        """Mark lost and stop heartbeating, keeping the row, which a newer Lease of this store now holds."""
        with self._lock:
            self._released = True
        self.lost = True
        self._stop.set()

    def release(self) -> None:
        """Stop heartbeating and delete our row (idempotent; a failed delete expires after the grace period)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._store._forget(self)
        try:
            self._store._delete(self.scope, self.unit, self.owner)
        except SQLAlchemyError as exc:
            logger.warning("lease release failed, row expires after the grace period scope=%s unit=%s "
                           "owner=%s error=%s", self.scope, self.unit, self.owner, str(exc).splitlines()[0])
            return
        logger.debug("lease released scope=%s unit=%s owner=%s", self.scope, self.unit, self.owner)


class LeaseStore:
    """Leases of units kept in the table ``pipelines_leases`` of the database at ``url``."""

    def __init__(self, url: str, heartbeat_interval: float = 10.0, grace_period: float = 30.0) -> None:
        if heartbeat_interval <= 0 or grace_period <= heartbeat_interval:
            raise ValueError(f"need 0 < heartbeat_interval < grace_period, got "
                             f"heartbeat_interval={heartbeat_interval} grace_period={grace_period}")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.owner = new_owner()
        self.engine = make_engine(url)
        self._held: dict[tuple[str, str], Lease] = {}
        self._lock = threading.Lock()
        create_table(self.engine)

    def __repr__(self) -> str:
        return f"LeaseStore(url={self.engine.url!r}, owner={self.owner!r})"

    def acquire(self, scope: str, unit: str) -> Lease | None:
        """Take the lease if free, dead or already ours; None while a live owner holds it."""
        with self._lock:
            held = self._held.get((scope, unit))
        if held is not None and held.held and self._touch(scope, unit, self.owner):
            return held
        for _ in range(TAKEOVER_ATTEMPTS):
            if self._insert(scope, unit):
                return self._start(scope, unit, previous=None)
            row = self._read(scope, unit)
            if row is None:  # released between our insert and our read: try the insert again
                continue
            if row.alive and row.owner != self.owner:
                return None
            if self._compare_and_set(scope, unit, row.owner, row.heartbeat):
                return self._start(scope, unit, previous=row)
        logger.info("lease contended, giving up for now scope=%s unit=%s owner=%s", scope, unit, self.owner)
        return None

    def holders(self, scope: str) -> list[LeaseInfo]:
        """Every lease row of ``scope``, with liveness computed now."""
        query = select(_leases).where(_leases.c.scope == scope).order_by(_leases.c.unit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        now = time.time()
        return [self._info(row, now) for row in rows]

    def live(self, scope: str) -> list[LeaseInfo]:
        """The leases of ``scope`` whose owner is alive."""
        return [info for info in self.holders(scope) if info.alive]

    def wait_for(self, scope: str, unit: str, timeout: float | None = None, poll: float = 1.0) -> Lease:
        """Acquire, polling every ``poll`` seconds; TimeoutError after ``timeout`` seconds (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            lease = self.acquire(scope, unit)
            if lease is not None:
                return lease
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"lease still held after {timeout}s scope={scope} unit={unit}")
                time.sleep(min(poll, left))
            else:
                time.sleep(poll)

    def close(self) -> None:
        """Release the leases this store still holds and dispose of the engine."""
        with self._lock:
            leases = list(self._held.values())
        for lease in leases:
            lease.release()
        self.engine.dispose()

    def _info(self, row, now: float) -> LeaseInfo:
        alive = _is_alive(row.owner, row.heartbeat, now, self.grace_period)
        return LeaseInfo(row.scope, row.unit, row.owner, row.heartbeat, alive)

    def _start(self, scope: str, unit: str, previous: LeaseInfo | None) -> Lease:
        lease = Lease(self, scope, unit, self.owner)
        with self._lock:
            stale = self._held.get((scope, unit))
            self._held[(scope, unit)] = lease
        if stale is not None:
            stale._abandon()
        if previous is None:
            logger.debug("lease acquired scope=%s unit=%s owner=%s", scope, unit, self.owner)
        else:
            logger.warning("lease taken over scope=%s unit=%s owner=%s previous_owner=%s age=%.1fs",
                           scope, unit, self.owner, previous.owner, time.time() - previous.heartbeat)
        return lease

    def _forget(self, lease: Lease) -> None:
        with self._lock:
            if self._held.get((lease.scope, lease.unit)) is lease:
                del self._held[(lease.scope, lease.unit)]

    def _insert(self, scope: str, unit: str) -> bool:
        row = {"scope": scope, "unit": unit, "owner": self.owner, "heartbeat": time.time()}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(_leases).values(**row))
        except IntegrityError:
            return False
        return True

    def _read(self, scope: str, unit: str) -> LeaseInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(_leases).where(_key(scope, unit))).first()
        return None if row is None else self._info(row, time.time())

    def _compare_and_set(self, scope: str, unit: str, seen_owner: str, seen_heartbeat: float) -> bool:
        query = (update(_leases)
                 .where(_key(scope, unit), _leases.c.owner == seen_owner, _leases.c.heartbeat == seen_heartbeat)
                 .values(owner=self.owner, heartbeat=time.time()))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def _touch(self, scope: str, unit: str, owner: str) -> bool:
        query = update(_leases).where(_key(scope, unit), _leases.c.owner == owner).values(heartbeat=time.time())
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def _delete(self, scope: str, unit: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(_leases).where(_key(scope, unit), _leases.c.owner == owner))
