"""Posting commands: one transaction a batch, retries, and the coalescing posting queue.

:class:`Poster` books a batch in one transaction, retrying deadlocks and serialization
failures and, if PostgreSQL refuses a whole batch, isolating the offender by booking the
commands one by one. :class:`PostingQueue` lets many threads submit small requests that one
drainer books together, so a hot account is locked once per batch instead of once per request.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from psycopg import errors as pg_errors
from sqlalchemy.exc import DBAPIError

from ledger.audit import Actor
from ledger.commands import Command, EntryResult
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
            except DBAPIError as exc:
                if isinstance(exc.orig, _RETRYABLE) and attempt + 1 < RETRY_LIMIT:
                    # A concurrent batch took the same key or lock order raced: read again.
                    time.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311 - jitter only
                    continue
                if (
                    exc.connection_invalidated
                    or not isinstance(exc.orig, pg_errors.Error)
                    or (isinstance(exc.orig, pg_errors.OperationalError))
                ):
                    raise
                if len(commands) == 1:
                    log.warning("ledger.batch_refused", key=commands[0].key, error=str(exc.orig))
                    return [
                        EntryResult(
                            commands[0].key,
                            "rejected",
                            None,
                            "refused_by_database",
                            _first_line(str(exc.orig)),
                        )
                    ]
                log.warning("ledger.batch_split", size=len(commands), error=_first_line(str(exc.orig)))
                return [
                    r
                    for i, c in enumerate(commands)
                    for r in self.post([c], None if actors is None else [actors[i]])
                ]
        raise RuntimeError("unreachable: retry loop ended without a result")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "refused"


@dataclass(slots=True)
class _Request:
    commands: Sequence[Command]
    actor: Actor | None
    future: Future[list[EntryResult]]


class PostingQueue:
    """Coalesces concurrent submissions into engine batches.

    ``submit`` blocks until its commands are booked and returns their results. Drainer threads
    take up to ``batch_max`` commands (waiting at most ``linger_ms`` for more once one request
    is in) and book them as one batch. The queue is bounded: submitters wait when it is full.
    """

    def __init__(
        self,
        poster: Poster,
        *,
        batch_max: int = 2000,
        linger_ms: float = 1.0,
        drainers: int = 1,
        queue_max: int = 10_000,
    ) -> None:
        if batch_max < 1 or drainers < 1 or queue_max < 1:
            raise ValueError("batch_max, drainers and queue_max must be positive")
        self.poster = poster
        self.batch_max = batch_max
        self.linger_s = linger_ms / 1000.0
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=queue_max)
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
        if self._closed:
            raise RuntimeError("the posting queue is closed")
        if not commands:
            return []
        future: Future[list[EntryResult]] = Future()
        self._queue.put(_Request(commands, actor, future), timeout=timeout_s)
        return future.result(timeout=timeout_s)

    def close(self) -> None:
        """Finish what was submitted, then stop the drainers."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def _drain(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first.commands)
            deadline = time.monotonic() + self.linger_s
            stop = False
            while size < self.batch_max:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                size += len(nxt.commands)
            self._book(batch)
            if stop:
                return

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
