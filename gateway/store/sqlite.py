"""The `sqlite` state backend, the embedded default: stdlib sqlite3 on one file in WAL mode. Every
operation is one `BEGIN IMMEDIATE` transaction (the database's write lock, taken before anything is
read), so several worker processes on one host stay exact, and the counts survive a restart. All
calls run on one dedicated thread with its own connection, never on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.store import (
    EPSILON,
    Clock,
    Hit,
    StoreUnavailable,
    anchor_ms,
    lease_token,
    now_ms,
    parse_lease,
    parse_reservation,
    reservation_token,
    to_ms,
    window_start,
)
from gateway.store.batch import (
    AcquireAsk,
    Ask,
    Give,
    HitAsk,
    Release,
    ReleaseSlot,
    Settle,
    Taken,
    check,
    fits,
    unapplied,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS hits (key TEXT, window INTEGER, start INTEGER, count REAL,
    PRIMARY KEY (key, window)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spent (scope TEXT, period INTEGER, start INTEGER, total REAL,
    PRIMARY KEY (scope, period)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reserved (token TEXT PRIMARY KEY, amount REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (scope TEXT, ident TEXT, expiry INTEGER, PRIMARY KEY (scope, ident))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT, expiry INTEGER) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expiry);
"""
"""WITHOUT ROWID: each table is its primary key's b-tree, so a change writes one page where a rowid table
and its key's index write two. A commit's cost is mostly the pages it appends to the WAL: this halves it.
(A file made before keeps its rowid tables: the statements are the same for both.)"""

SWEEP = 100
"""Expired values deleted at most by one `put` (found through the expiry index): more than one put adds, so
the table stays near its live values, and no single write pays for a long backlog."""


class SqliteStore:
    def __init__(self, path: str, timeout_s: float, clock: Clock) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-sqlite")

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, timeout=self._timeout_s, isolation_level=None)
            try:
                self._wal(db)
                db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
                db.executescript(SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _wal(self, db: sqlite3.Connection) -> None:
        """Switch the file to WAL. The switch asks for its lock without SQLite's busy handler: on a new file
        that another worker is setting up at that moment it failed at once with `database is locked` (and
        that worker's limits fell back to memory, letting one more request through). So it is retried here
        for up to the busy timeout, on this store's thread."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    async def _run(self, op: Callable[[sqlite3.Connection, int], T]) -> T:
        def transaction() -> T:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = op(db, now_ms(self._clock))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, transaction)
        except (sqlite3.Error, OSError) as e:  # OSError: the database's directory cannot be made
            raise StoreUnavailable(f"sqlite state store: {e}") from e

    async def hit(self, key: str, cost: float, limit: float, window_s: float, anchor_s: float = 0.0) -> Hit:
        return await self._run(lambda db, now: _hit(db, now, key, cost, limit, window_s, anchor_s)[0])

    async def reserve(
        self, scope: str, amount: float, cap: float, period_s: float, anchor_s: float = 0.0
    ) -> str | None:
        return await self._run(lambda db, now: _reserve(db, now, scope, amount, cap, period_s, anchor_s))

    async def settle(self, token: str, actual: float) -> None:
        await self._run(lambda db, now: _settle(db, token, actual))

    async def release(self, token: str) -> None:
        await self._run(lambda db, now: _settle(db, token, 0.0))

    async def spent(self, scope: str, period_s: float, anchor_s: float = 0.0) -> float:
        period, anchor = to_ms(period_s), anchor_ms(anchor_s)
        return await self._run(lambda db, now: _current(db, scope, period, window_start(now, period, anchor)))

    async def acquire(self, scope: str, limit: int, ttl_s: float) -> str | None:
        return await self._run(lambda db, now: _acquire(db, now, scope, limit, ttl_s))

    async def renew(self, lease: str) -> bool:
        ttl, ident, scope = parse_lease(lease)

        def op(db: sqlite3.Connection, now: int) -> bool:
            cursor = db.execute(
                "UPDATE leases SET expiry=? WHERE scope=? AND ident=? AND expiry>?", (now + ttl, scope, ident, now)
            )
            return cursor.rowcount == 1

        return await self._run(op)

    async def release_slot(self, lease: str) -> None:
        await self._run(lambda db, now: _release_slot(db, lease))

    async def take(self, asks: Sequence[Ask]) -> Taken:
        """One transaction: each step as its single operation, in order; rolled back when a required one
        is refused (the write lock is held throughout, so nobody saw it)."""
        check(asks)

        def op(db: sqlite3.Connection, now: int) -> Taken:
            results: list[Hit | str | None] = []
            before: list[float] = []
            for ask in asks:
                if isinstance(ask, HitAsk):
                    hit, count = _hit(db, now, ask.key, ask.cost, ask.limit, ask.window_s, ask.anchor_s)
                    results.append(hit)
                    before.append(count)
                elif isinstance(ask, AcquireAsk):
                    results.append(_acquire(db, now, ask.scope, ask.slots, ask.ttl_s))
                else:
                    results.append(_reserve(db, now, ask.scope, ask.amount, ask.cap, ask.period_s, ask.anchor_s))
            refused = tuple(i for i, (a, r) in enumerate(zip(asks, results, strict=True)) if not fits(a, r))
            if not any(asks[i].required for i in refused):
                return Taken(True, tuple(results), refused)
            counts = iter(before)
            raise _Refused(Taken(False, tuple(unapplied(a, r, counts) for a, r in zip(asks, results, strict=True)),
                                 refused))

        try:
            return await self._run(op)
        except _Refused as refused:
            return refused.taken

    async def give(self, items: Sequence[Give]) -> None:
        def op(db: sqlite3.Connection, now: int) -> None:
            for item in items:
                if isinstance(item, Settle | Release):
                    _settle(db, item.token, item.actual if isinstance(item, Settle) else 0.0)
                elif isinstance(item, ReleaseSlot):
                    _release_slot(db, item.lease)
                else:
                    _hit(db, now, item.key, item.cost, item.limit, item.window_s, item.anchor_s)

        if items:
            await self._run(op)

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        ttl = to_ms(ttl_s)

        def op(db: sqlite3.Connection, now: int) -> None:
            db.execute("DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expiry<=? LIMIT ?)",
                       (now, SWEEP))
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, value, now + ttl))

        await self._run(op)

    async def get(self, key: str) -> str | None:
        def op(db: sqlite3.Connection, now: int) -> str | None:
            row = db.execute("SELECT value FROM kv WHERE key=? AND expiry>?", (key, now)).fetchone()
            return None if row is None else row[0]

        return await self._run(op)

    async def close(self) -> None:
        def shut() -> Any:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._thread, shut)
        self._thread.shutdown(wait=False)


class _Refused(Exception):
    """Rolls a refused batch back (SqliteStore._run rolls back on any exception), carrying its answer."""

    def __init__(self, taken: Taken) -> None:
        self.taken = taken


def _hit(db: sqlite3.Connection, now: int, key: str, cost: float, limit: float, window_s: float,
         anchor_s: float) -> tuple[Hit, float]:
    """The hit, and the count before it."""
    window = to_ms(window_s)
    start = window_start(now, window, anchor_ms(anchor_s))
    row = db.execute("SELECT start, count FROM hits WHERE key=? AND window=?", (key, window)).fetchone()
    count = before = row[1] if row and row[0] == start else 0.0
    reset_s = (start + window - now) / 1000
    if cost < 0:  # a refund: only a count held in this window goes down, to 0 at most
        if count:
            count = max(0.0, count + cost)
            db.execute("UPDATE hits SET count=? WHERE key=? AND window=?", (count, key, window))
        return Hit(True, max(0.0, limit - count), reset_s), before
    allowed = count + cost <= limit + EPSILON
    if allowed:
        count += cost
        db.execute("INSERT OR REPLACE INTO hits VALUES (?, ?, ?, ?)", (key, window, start, count))
    return Hit(allowed, max(0.0, limit - count), reset_s), before


def _current(db: sqlite3.Connection, scope: str, period: int, start: int) -> float:
    row = db.execute("SELECT start, total FROM spent WHERE scope=? AND period=?", (scope, period)).fetchone()
    return row[1] if row and row[0] == start else 0.0


def _reserve(db: sqlite3.Connection, now: int, scope: str, amount: float, cap: float, period_s: float,
             anchor_s: float) -> str | None:
    period = to_ms(period_s)
    start = window_start(now, period, anchor_ms(anchor_s))
    total = _current(db, scope, period, start)
    if total + amount > cap + EPSILON:
        return None
    db.execute("INSERT OR REPLACE INTO spent VALUES (?, ?, ?, ?)", (scope, period, start, total + amount))
    token = reservation_token(period, start, uuid.uuid4().hex, scope)
    db.execute("INSERT INTO reserved VALUES (?, ?)", (token, amount))
    return token


def _settle(db: sqlite3.Connection, token: str, actual: float) -> None:
    period, start, _, scope = parse_reservation(token)
    rows = db.execute("DELETE FROM reserved WHERE token=? RETURNING amount", (token,)).fetchall()
    for (amount,) in rows:  # none, or the one reservation
        db.execute(
            "UPDATE spent SET total = max(0.0, total - ? + ?) WHERE scope=? AND period=? AND start=?",
            (amount, actual, scope, period, start),
        )


def _acquire(db: sqlite3.Connection, now: int, scope: str, limit: int, ttl_s: float) -> str | None:
    ttl = to_ms(ttl_s)
    db.execute("DELETE FROM leases WHERE scope=? AND expiry<=?", (scope, now))
    (held,) = db.execute("SELECT count(*) FROM leases WHERE scope=?", (scope,)).fetchone()
    if held >= limit:
        return None
    ident = uuid.uuid4().hex
    db.execute("INSERT INTO leases VALUES (?, ?, ?)", (scope, ident, now + ttl))
    return lease_token(ttl, ident, scope)


def _release_slot(db: sqlite3.Connection, lease: str) -> None:
    _, ident, scope = parse_lease(lease)
    db.execute("DELETE FROM leases WHERE scope=? AND ident=?", (scope, ident))
