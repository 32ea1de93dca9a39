"""Unit leases in an SQL database, so that workers never run the same unit at the same time.

Several worker processes, possibly on several machines, share one database (SQLite for one machine,
PostgreSQL for several).  Before working on a unit (a fold, a shard, an Optuna trial, ...) a worker takes
its lease: one row of the table ``pipelines_leases`` keyed by ``(scope, unit)`` naming its ``owner``
(``host:pid:random``), the time of its last ``heartbeat``, the holder's own ``heartbeat_interval`` and
``grace_period``, and an ``epoch`` (the fencing token).

* Taking a free unit is a single ``INSERT`` (epoch 1); the primary key lets only one of several
  concurrent inserts succeed (the others get an ``IntegrityError``).
* Taking over a row whose owner is dead is a single compare-and-set
  ``UPDATE ... SET epoch = epoch + 1 WHERE owner = :seen AND epoch = :seen AND heartbeat = :seen``: of
  several workers that read the same dead row, only the first update matches a row, so at most one wins.
* While a lease is held a daemon thread renews its heartbeat every ``heartbeat_interval`` seconds with
  ``UPDATE ... WHERE owner = me AND epoch = mine``.  Should that match no row, the lease was taken over.
  Should no renewal succeed for ``grace_period`` seconds (database unreachable, process stalled), the
  lease has expired: others may take it over any moment.  Either way the lease is ``lost`` and
  :meth:`Lease.check` raises :class:`LeaseLost` (call it often: it reads no database).
* Before committing results (a checkpoint's files and manifest, a shard), call :meth:`Lease.fence`: it
  renews the row only while it still carries our owner and epoch, so a worker whose lease was taken over
  can never commit after the takeover, and returns the epoch, which the commit records in its manifest.
  (The artifact store itself cannot check the epoch: a renewal leaves the holder ``grace_period`` seconds.)
* A row is dead when its heartbeat is older than the row's own ``grace_period`` by the *database's*
  clock (``heartbeat`` is written and compared with the database's time, as Optuna's RDB heartbeat
  does; with SQLite, the clock of the one machine sharing the file), or at once when its owner is a
  process of this host that no longer exists (``os.kill(pid, 0)``).  No worker's clock or settings
  judge another worker's lease.  Keep ``grace_period`` several times ``heartbeat_interval``.

A table made by an older version (no ``heartbeat_interval``, ``grace_period``, ``epoch`` columns) gets
them added when a store opens it; its rows (written by that version, with its clock) are judged with
the reading store's ``grace_period``, the only one known for them.
The same-host shortcut assumes host names are unique per process namespace (two containers with one
host name and separate PID namespaces would see each other's workers as dead): give each container its
own host name.  An owner id belongs to one :class:`LeaseStore`; threads sharing a store share its leases.
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

from sqlalchemy import (
    Column,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    cast,
    create_engine,
    delete,
    extract,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
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
    Column("heartbeat", Double, nullable=False),  # epoch seconds by the database's clock
    Column("heartbeat_interval", Double),  # the holder's settings; NULL in a row of an older version
    Column("grace_period", Double),
    Column("epoch", Integer, nullable=False, server_default=text("0")),  # +1 on each takeover: the fencing token
)
ADDED_COLUMNS = {"heartbeat_interval": "", "grace_period": "", "epoch": " NOT NULL DEFAULT 0"}  # since 4 columns


class LeaseLost(RuntimeError):
    """Another owner took the lease over, or it expired (no heartbeat confirmed for ``grace_period``)."""


@dataclass(frozen=True)
class LeaseInfo:
    """One row of the lease table, with ``alive`` and ``age`` computed from the database's clock when read."""

    scope: str
    unit: str
    owner: str
    heartbeat: float
    alive: bool
    epoch: int = 0
    age: float = 0.0  # seconds since the heartbeat, by the database's clock
    grace_period: float | None = None  # the holder's; None for a row of an older version


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


def _key(scope: str, unit: str) -> ColumnElement[bool]:
    return and_(_leases.c.scope == scope, _leases.c.unit == unit)


def db_now(engine: Engine) -> ColumnElement[float]:
    """The database's current time in epoch seconds (milliseconds or better), as an SQL expression."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return (func.julianday("now") - 2440587.5) * 86400.0
    if dialect == "postgresql":
        return cast(extract("epoch", func.clock_timestamp()), Double)
    raise ValueError(f"leases need an SQLite or PostgreSQL database (optuna_storage), not {dialect}: "
                     f"url={engine.url.render_as_string(hide_password=True)}")


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


def upgrade_table(engine: Engine) -> None:
    """Add the columns of this version to a lease table made by an older one (workers racing to do it too)."""
    for name, extra in ADDED_COLUMNS.items():
        if name in _columns(engine):
            continue
        ddl = f"ALTER TABLE {TABLE} ADD COLUMN {name} {_leases.c[name].type.compile(engine.dialect)}{extra}"
        try:
            with engine.begin() as conn:
                conn.execute(text(ddl))
        except DBAPIError as exc:
            if name in _columns(engine):
                continue  # another worker added it first
            raise RuntimeError(f"the lease table {TABLE} at {engine.url.render_as_string(hide_password=True)} was "
                               f"made by an older version and lacks column {name}, which this worker cannot add "
                               f"({str(exc.orig or exc).strip().splitlines()[0]}); add it once as the table's "
                               f"owner: {ddl}") from None
        logger.warning("lease table %s (made by an older version) upgraded: column %s added", TABLE, name)


def _columns(engine: Engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(TABLE)}


class Lease:
    """A held lease; heartbeats in a daemon thread until released (also on leaving a ``with`` block)."""

    def __init__(self, store: LeaseStore, scope: str, unit: str, owner: str, epoch: int, sent: float) -> None:
        self.scope, self.unit, self.owner, self.epoch = scope, unit, owner, epoch
        self.lost = False
        self._why = ""
        self._store = store
        self._deadline = sent + store.grace_period  # monotonic: others may take over after it, unless renewed
        self._stop = threading.Event()
        self._released = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{scope}/{unit}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (f"Lease(scope={self.scope!r}, unit={self.unit!r}, owner={self.owner!r}, epoch={self.epoch}, "
                f"lost={self.lost})")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Neither released nor lost."""
        return not self._released and not self.lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was taken over or has expired (reads no database)."""
        if not self.lost and not self._released and time.monotonic() > self._deadline:
            self._expire()
        if self.lost:
            raise LeaseLost(f"lease lost scope={self.scope} unit={self.unit} owner={self.owner} epoch={self.epoch}: "
                            f"{self._why}")

    def fence(self) -> int:
        """Before a commit: renew the row while it still carries our owner and epoch, else raise
        :class:`LeaseLost`; the epoch, for the commit's manifest. Database errors are retried until expiry."""
        while True:
            self.check()
            try:
                if self._renew():
                    return self.epoch
            except SQLAlchemyError as exc:
                logger.warning("lease renewal before a commit failed, will retry scope=%s unit=%s error=%s",
                               self.scope, self.unit, (str(exc).splitlines() or [""])[0])
                time.sleep(min(self._store.heartbeat_interval, max(self._deadline - time.monotonic(), 0.01)))
                continue
            self.check()
            raise LeaseLost(f"lease released scope={self.scope} unit={self.unit}: nothing may be committed under it")

    def _renew(self) -> bool:
        """One heartbeat; False (and lost, unless released meanwhile) when the row is no longer ours."""
        sent = time.monotonic()
        if self._store._touch(self.scope, self.unit, self.owner, self.epoch):
            with self._lock:
                self._deadline = max(self._deadline, sent + self._store.grace_period)
            return True
        if not self._stop.is_set():
            self._lose("another owner took it over")
        return False

    def _expire(self) -> None:
        self._lose(f"no heartbeat confirmed for grace_period={self._store.grace_period:g}s (database unreachable "
                   "or this process stalled): another worker may take the unit over")

    def _lose(self, why: str) -> None:
        with self._lock:
            if self.lost:
                return
            self.lost, self._why = True, why
        self._stop.set()
        logger.error("lease lost scope=%s unit=%s owner=%s epoch=%d: %s", self.scope, self.unit, self.owner,
                     self.epoch, why)

    def _beat(self) -> None:
        while not self._stop.wait(self._store.heartbeat_interval):
            if time.monotonic() > self._deadline:
                self._expire()
                return
            try:
                if not self._renew():
                    return
            except SQLAlchemyError as exc:  # transient (network, locks, restarts): keep beating until expiry
                logger.warning("lease heartbeat failed, will retry scope=%s unit=%s owner=%s error=%s: %s",
                               self.scope, self.unit, self.owner, type(exc).__name__,
                               (str(exc).splitlines() or [""])[0])

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
            self._store._delete(self.scope, self.unit, self.owner, self.epoch)
        except SQLAlchemyError as exc:
            logger.warning("lease release failed, row expires after the grace period scope=%s unit=%s "
                           "owner=%s error=%s", self.scope, self.unit, self.owner, str(exc).splitlines()[0])
            return
        logger.debug("lease released scope=%s unit=%s owner=%s", self.scope, self.unit, self.owner)


class LeaseStore:
    """Leases of units kept in the table ``pipelines_leases`` of the database at ``url``.

    ``heartbeat_interval`` and ``grace_period`` are this store's: written into the rows it takes, they judge
    only its own leases (and rows of an older version, which carry none).
    """

    def __init__(self, url: str, heartbeat_interval: float = 10.0, grace_period: float = 30.0) -> None:
        if heartbeat_interval <= 0 or grace_period <= heartbeat_interval:
            raise ValueError(f"need 0 < heartbeat_interval < grace_period, got "
                             f"heartbeat_interval={heartbeat_interval} grace_period={grace_period}")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.owner = new_owner()
        self.engine = make_engine(url)
        self._now = db_now(self.engine)
        self._held: dict[tuple[str, str], Lease] = {}
        self._lock = threading.Lock()
        self._legacy_seen = False
        create_table(self.engine)
        upgrade_table(self.engine)

    def __repr__(self) -> str:
        return f"LeaseStore(url={self.engine.url!r}, owner={self.owner!r})"

    def acquire(self, scope: str, unit: str) -> Lease | None:
        """Take the lease if free, dead or already ours; None while a live owner holds it."""
        with self._lock:
            held = self._held.get((scope, unit))
        if held is not None and held.held and held._renew():
            return held
        for _ in range(TAKEOVER_ATTEMPTS):
            sent = time.monotonic()
            if self._insert(scope, unit):
                return self._start(scope, unit, 1, sent, previous=None)
            row = self._read(scope, unit)
            if row is None:  # released between our insert and our read: try the insert again
                continue
            if row.alive and row.owner != self.owner:
                return None
            sent = time.monotonic()
            if self._compare_and_set(scope, unit, row):
                return self._start(scope, unit, row.epoch + 1, sent, previous=row)
        logger.info("lease contended, giving up for now scope=%s unit=%s owner=%s", scope, unit, self.owner)
        return None

    def holders(self, scope: str, legacy_grace: float | None = None) -> list[LeaseInfo]:
        """Every lease row of ``scope``, each judged by its own grace period and the database's clock now
        (rows of an older version, without one, by ``legacy_grace`` or else this store's)."""
        query = self._select().where(_leases.c.scope == scope).order_by(_leases.c.unit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [self._info(row, legacy_grace) for row in rows]

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

    def _select(self):
        return select(_leases, (self._now - _leases.c.heartbeat).label("age"))

    def _info(self, row, legacy_grace: float | None) -> LeaseInfo:
        grace = row.grace_period
        if grace is None:
            grace = legacy_grace or self.grace_period
            if not self._legacy_seen:
                self._legacy_seen = True
                logger.warning("lease rows without a grace period (written by an older version, e.g. scope=%s "
                               "unit=%s) are judged with grace_period=%gs", row.scope, row.unit, grace)
        alive = row.age <= grace and owner_alive(row.owner) is not False
        return LeaseInfo(row.scope, row.unit, row.owner, row.heartbeat, alive, row.epoch, row.age, row.grace_period)

    def _start(self, scope: str, unit: str, epoch: int, sent: float, previous: LeaseInfo | None) -> Lease:
        lease = Lease(self, scope, unit, self.owner, epoch, sent)
        with self._lock:
            stale = self._held.get((scope, unit))
            self._held[(scope, unit)] = lease
        if stale is not None:
            stale._abandon()
        if previous is None:
            logger.debug("lease acquired scope=%s unit=%s owner=%s", scope, unit, self.owner)
        else:
            logger.warning("lease taken over scope=%s unit=%s owner=%s epoch=%d previous_owner=%s age=%.1fs",
                           scope, unit, self.owner, epoch, previous.owner, previous.age)
        return lease

    def _forget(self, lease: Lease) -> None:
        with self._lock:
            if self._held.get((lease.scope, lease.unit)) is lease:
                del self._held[(lease.scope, lease.unit)]

    def _mine(self) -> dict:
        return {"owner": self.owner, "heartbeat": self._now, "heartbeat_interval": self.heartbeat_interval,
                "grace_period": self.grace_period}

    def _insert(self, scope: str, unit: str) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(_leases).values(scope=scope, unit=unit, epoch=1, **self._mine()))
        except IntegrityError:
            return False
        return True

    def _read(self, scope: str, unit: str) -> LeaseInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(self._select().where(_key(scope, unit))).first()
        return None if row is None else self._info(row, None)

    def _compare_and_set(self, scope: str, unit: str, seen: LeaseInfo) -> bool:
        query = (update(_leases)
                 .where(_key(scope, unit), _leases.c.owner == seen.owner, _leases.c.epoch == seen.epoch,
                        _leases.c.heartbeat == seen.heartbeat)
                 .values(epoch=_leases.c.epoch + 1, **self._mine()))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def _touch(self, scope: str, unit: str, owner: str, epoch: int) -> bool:
        query = (update(_leases).where(_key(scope, unit), _leases.c.owner == owner, _leases.c.epoch == epoch)
                 .values(heartbeat=self._now))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    def _delete(self, scope: str, unit: str, owner: str, epoch: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(_leases).where(_key(scope, unit), _leases.c.owner == owner, _leases.c.epoch == epoch))
