"""Posting commands: one transaction a batch, retries, and the coalescing posting queue.

:class:`Poster` books a batch in one transaction, retrying deadlocks and serialization
failures and, if PostgreSQL refuses a whole batch, isolating the offender by booking the
commands one by one. :class:`PostingQueue` lets many threads submit small requests that one
drainer books together, so a hot account is locked once per batch instead of once per request.
"""

from __future__ import annotations

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
    commands: Sequence[Command]
    actor: Actor | None
    future: Future[list[EntryResult]]
    # Account codes the commands touch; None when they cannot be known before reading the
    # ledger (posting a hold, reversing an entry): such a request runs with no batch beside it.
    codes: frozenset[str] | None


def _codes_of(commands: Sequence[Command]) -> frozenset[str] | None:
    codes: set[str] = set()
    for command in commands:
        if not isinstance(command, NewEntry):
            return None
        for leg in command.legs:
            codes.add(leg.debit)
            codes.add(leg.credit)
    return frozenset(codes)


class PostingQueue:
    """Coalesces concurrent submissions into engine batches.

    ``submit`` blocks until its commands are booked and returns their results. Drainer threads
    take up to ``batch_max`` commands (waiting at most ``linger_ms`` for more once one request
    is in) and book them as one batch. Several drainers book at once only batches that share
    no account, so one batch's checks in Python overlap another's work in PostgreSQL instead
    of queueing behind its row locks; requests touching the same account keep their order.
    The queue is bounded: submitters wait when ``queue_max`` requests are waiting.
    """

    def __init__(
        self,
        poster: Poster,
        *,
        batch_max: int = 2000,
        linger_ms: float = 0.0,
        drainers: int = 2,
        queue_max: int = 10_000,
    ) -> None:
        if batch_max < 1 or drainers < 1 or queue_max < 1:
            raise ValueError("batch_max, drainers and queue_max must be positive")
        self.poster = poster
        self.batch_max = batch_max
        self.linger_s = linger_ms / 1000.0
        self.queue_max = queue_max
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
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
        """Book ``commands`` (in one batch, atomically per command) and wait for the results.

        With ``actor``, every entry created gets an audit record in the same transaction.
        """
        if not commands:
            return []
        request = _Request(commands, actor, Future(), _codes_of(commands))
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._closed or len(self._pending) < self.queue_max, timeout=timeout_s
            ):
                raise TimeoutError("the posting queue stayed full")
            if self._closed:
                raise RuntimeError("the posting queue is closed")
            self._pending.append(request)
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

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch this drainer may book now; None once closed and drained."""
        while True:
            if self._pending and not self._exclusive_in_flight:
                if not self._closed and self._pending_size() < self.batch_max and self.linger_s > 0:
                    # Let concurrent submitters join the batch (bounded by the linger time).
                    self._cond.wait(timeout=self.linger_s)
                batch = self._select()
                if batch:
                    return batch
            elif self._closed and not self._pending:
                return None
            self._cond.wait(timeout=0.05)

    def _pending_size(self) -> int:
        total = 0
        for request in self._pending:
            total += len(request.commands)
            if total >= self.batch_max:
                break
        return total

    def _select(self) -> list[_Request]:
        """Take, in submission order, requests sharing no account with batches in flight.

        A request passed over reserves its accounts, so no later request on the same account
        overtakes it. A request of unknown accounts is taken only with nothing in flight and
        nothing passed over before it; whatever follows it may then join its batch.
        """
        reserved: set[str] = set(self._busy_codes)
        taken: list[_Request] = []
        kept: list[_Request] = []
        size = 0
        exclusive = False
        passed_over = False
        scanned = 0
        for request in self._pending:
            scanned += 1
            full = size >= self.batch_max or scanned > 8 * self.batch_max
            if full:
                kept.append(request)
                continue
            if request.codes is None and not exclusive:
                if self._batches_in_flight or passed_over:
                    kept.append(request)
                    passed_over = True
                    size = self.batch_max  # nothing after it may pass it
                    continue
                exclusive = True
            elif not exclusive and request.codes is not None and not reserved.isdisjoint(request.codes):
                kept.append(request)
                reserved.update(request.codes)
                passed_over = True
                continue
            taken.append(request)
            size += len(request.commands)
        self._pending = kept
        return taken

    def _claim(self, batch: list[_Request]) -> tuple[set[str], bool]:
        exclusive = any(request.codes is None for request in batch)
        codes: set[str] = set()
        for request in batch:
            if request.codes is not None:
                codes.update(request.codes)
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

    def _book(self, batch: list[_Request]) -> None:
        commands = [c for request in batch for c in request.commands]
        actors = [request.actor for request in batch for _ in request.commands]
        try:
            results = self.poster.post(commands, actors if any(actors) else None)
        except BaseException as exc:  # the submitters must hear about any failure
            for request in batch:
                request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        offset = 0
        for request in batch:
            n = len(request.commands)
            request.future.set_result(results[offset : offset + n])
            offset += n
