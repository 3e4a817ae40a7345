"""Posting commands: one transaction a batch, retries, and the coalescing posting queue.

:class:`Poster` books a batch in one transaction, retrying deadlocks and serialization
failures and, if PostgreSQL refuses a whole batch, isolating the offender by booking the
commands one by one. :class:`PostingQueue` lets many threads submit small requests that one
drainer books together, so a hot account is locked once per batch instead of once per request.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
import structlog
from psycopg import errors as pg_errors
from sqlalchemy.exc import DBAPIError

from ledger.audit import Actor
from ledger.commands import Command, EntryResult, NewEntry
from ledger.engine import post_batch

log = structlog.get_logger(__name__)

RETRY_LIMIT = 8
_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.UniqueViolation)


class Poster:
    """Books batches of commands through the engine, each batch in its own transaction."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def post(
        self, commands: Sequence[Command], actors: Sequence[Actor | None] | None = None
    ) -> list[EntryResult]:
        """Book ``commands``; returns one result per command, in order.

        ``actors`` (aligned with ``commands``) get an audit record per created entry.
        """
        if not commands:
            return []
        for attempt in range(RETRY_LIMIT):
            try:
                with self.engine.begin() as conn:
                    return post_batch(conn, commands, actors)
            except (DBAPIError, psycopg.Error) as exc:
                # The engine speaks to psycopg directly; SQLAlchemy wraps what goes through it.
                error = exc.orig if isinstance(exc, DBAPIError) else exc
                if isinstance(error, _RETRYABLE) and attempt + 1 < RETRY_LIMIT:
                    # A concurrent batch took the same key or lock order raced: read again.
                    time.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311 - jitter only
                    continue
                if (
                    not isinstance(error, psycopg.Error)
                    or isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
                    or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
                ):
                    raise  # the database is unreachable or unwell: nothing is known to be refused
                return self._isolate(commands, actors, error)
        raise RuntimeError("unreachable: retry loop ended without a result")

    def _isolate(
        self, commands: Sequence[Command], actors: Sequence[Actor | None] | None, error: Exception
    ) -> list[EntryResult]:
        """PostgreSQL refused the whole batch: book the commands one by one to find why."""
        reason = _first_line(str(error))
        if len(commands) == 1:
            log.warning("ledger.batch_refused", key=commands[0].key, error=reason)
            return [EntryResult(commands[0].key, "rejected", None, "refused_by_database", reason)]
        log.warning("ledger.batch_split", size=len(commands), error=reason)
        return [
            r for i, c in enumerate(commands) for r in self.post([c], None if actors is None else [actors[i]])
        ]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "refused"


@dataclass(slots=True)
class _Request:
    """One submit: its commands may be booked in different batches, each atomically."""

    actor: Actor | None
    future: Future[list[EntryResult]]
    results: list[EntryResult | None]
    remaining: int


@dataclass(slots=True)
class _Item:
    request: _Request
    index: int
    command: Command
    # Account codes the command touches; None when they cannot be known before reading the
    # ledger (resolving a hold, reversing an entry): such a command runs with no batch beside it.
    codes: frozenset[str] | None


def _codes_of(command: Command) -> frozenset[str] | None:
    if not isinstance(command, NewEntry):
        return None
    codes: set[str] = set()
    for leg in command.legs:
        codes.add(leg.debit)
        codes.add(leg.credit)
    return frozenset(codes)


class PostingQueue:
    """Coalesces concurrent submissions into engine batches.

    ``submit`` blocks until its commands are booked and returns their results. Drainer threads
    take up to ``batch_max`` commands (waiting at most ``linger_ms`` for more once one is in)
    and book them as one batch. Several drainers book at once only batches that share no
    account, so batches on different accounts proceed side by side (PostgreSQL works on one
    while Python checks the next) instead of queueing behind each other's row locks. Commands
    touching the same account are booked in submission order. The queue is bounded: submitters
    wait while ``queue_max`` commands are waiting.
    """

    def __init__(
        self,
        poster: Poster,
        *,
        batch_max: int = 2000,
        linger_ms: float = 0.0,
        drainers: int = 2,
        queue_max: int = 50_000,
    ) -> None:
        if batch_max < 1 or drainers < 1 or queue_max < 1:
            raise ValueError("batch_max, drainers and queue_max must be positive")
        self.poster = poster
        self.batch_max = batch_max
        self.linger_s = linger_ms / 1000.0
        self.queue_max = queue_max
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._busy_codes: dict[str, int] = {}
        self._batches_in_flight = 0
        self._exclusive_in_flight = False
        self._closed = False
        self._threads = [
            threading.Thread(target=self._drain, name=f"posting-drainer-{i}", daemon=True)
            for i in range(drainers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, commands: Sequence[Command], actor: Actor | None = None, timeout_s: float = 60.0
    ) -> list[EntryResult]:
        """Book ``commands`` (each atomically, in order per account) and wait for the results.

        With ``actor``, every entry created gets an audit record in the same transaction.
        """
        if not commands:
            return []
        request = _Request(actor, Future(), [None] * len(commands), len(commands))
        items = [_Item(request, i, c, _codes_of(c)) for i, c in enumerate(commands)]
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._closed or len(self._pending) < self.queue_max, timeout=timeout_s
            ):
                raise TimeoutError("the posting queue stayed full")
            if self._closed:
                raise RuntimeError("the posting queue is closed")
            self._pending.extend(items)
            self._cond.notify_all()
        return request.future.result(timeout=timeout_s)

    def close(self) -> None:
        """Finish what was submitted, then stop the drainers."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    # --- draining ------------------------------------------------------------------------

    def _drain(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
                codes, exclusive = self._claim(batch)
            try:
                self._book(batch)
            finally:
                with self._cond:
                    self._release(codes, exclusive)
                    self._cond.notify_all()

    def _next_batch(self) -> list[_Item] | None:
        """Wait for a batch this drainer may book now; None once closed and drained."""
        while True:
            if self._pending and not self._exclusive_in_flight:
                if not self._closed and len(self._pending) < self.batch_max and self.linger_s > 0:
                    # Let concurrent submitters join the batch (bounded by the linger time).
                    self._cond.wait(timeout=self.linger_s)
                batch = self._select()
                if batch:
                    return batch
            elif self._closed and not self._pending:
                return None
            self._cond.wait(timeout=0.05)

    def _select(self) -> list[_Item]:
        """Take, in submission order, commands sharing no account with batches in flight.

        A command passed over reserves its accounts, so no later command on the same account
        overtakes it. A command of unknown accounts is taken only with nothing in flight and
        nothing passed over before it; whatever follows it may then join its batch.
        """
        if self._exclusive_in_flight:
            return []  # e.g. claimed by another drainer while this one lingered
        reserved: set[str] = set(self._busy_codes)
        taken: list[_Item] = []
        kept: list[_Item] = []
        exclusive = False
        passed_over = False
        stop = False
        scan_limit = 8 * self.batch_max
        for n, item in enumerate(self._pending):
            if stop or len(taken) >= self.batch_max or n >= scan_limit:
                kept.append(item)
                continue
            if item.codes is None and not exclusive:
                if self._batches_in_flight or passed_over:
                    kept.append(item)
                    stop = True  # nothing after it may pass it
                    continue
                exclusive = True
            elif not exclusive and item.codes is not None and not reserved.isdisjoint(item.codes):
                kept.append(item)
                reserved.update(item.codes)
                passed_over = True
                continue
            taken.append(item)
        self._pending = kept
        return taken

    def _claim(self, batch: list[_Item]) -> tuple[set[str], bool]:
        exclusive = any(item.codes is None for item in batch)
        codes: set[str] = set()
        for item in batch:
            if item.codes is not None:
                codes.update(item.codes)
        for code in codes:
            self._busy_codes[code] = self._busy_codes.get(code, 0) + 1
        self._batches_in_flight += 1
        self._exclusive_in_flight = self._exclusive_in_flight or exclusive
        return codes, exclusive

    def _release(self, codes: set[str], exclusive: bool) -> None:
        for code in codes:
            left = self._busy_codes[code] - 1
            if left:
                self._busy_codes[code] = left
            else:
                del self._busy_codes[code]
        self._batches_in_flight -= 1
        if exclusive:
            self._exclusive_in_flight = False

    def _book(self, batch: list[_Item]) -> None:
        actors = [item.request.actor for item in batch]
        try:
            results = self.poster.post([item.command for item in batch], actors if any(actors) else None)
        except BaseException as exc:  # the submitters must hear about any failure
            with self._cond:
                for item in batch:
                    if not item.request.future.done():
                        item.request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        # A request's commands may be in batches booked by two drainers at once.
        with self._cond:
            for item, result in zip(batch, results, strict=True):
                request = item.request
                request.results[item.index] = result
                request.remaining -= 1
                if request.remaining == 0 and not request.future.done():
                    request.future.set_result([r for r in request.results if r is not None])


def tune_gc(gen0_threshold: int) -> None:
    """Let Python's cycle collector look at the youngest generation after ``gen0_threshold`` net
    allocations instead of 700 (``TRACE_GC_GEN0_THRESHOLD``; the older generations keep their
    ratios). A batch of a few thousand entries allocates tens of thousands of short-lived objects,
    freed by reference counting; at 700 the collector ran dozens of times a batch, older
    generations in tow, and a batch of 4,000 cost 22-25 µs of Python a transfer instead of 16."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
