"""What every task shares: logs bound to the task id, metrics, retries, after-commit follow-ups."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from celery import Task
from celery.canvas import Signature
from prometheus_client import Counter, Histogram

from contracts.client import ProviderError

log = structlog.get_logger(__name__)

TASKS = Counter("tracechain_tasks", "Tasks finished, by task name and outcome", ("task", "outcome"))
TASK_SECONDS = Histogram("tracechain_task_duration_seconds", "Time a task ran, by task name", ("task",))

# Failures worth another try later: the database or the node was unreachable or busy.
TRANSIENT = (ProviderError, sa.exc.OperationalError, sa.exc.InterfaceError, ConnectionError, TimeoutError)


class TraceTask(Task[Any, Any]):
    """Base of every task: bounded retries with exponential backoff and jitter on transient
    failures, the task id bound into every log line, outcome and duration counted."""

    autoretry_for = TRANSIENT
    retry_backoff = 2
    retry_backoff_max = 120
    retry_jitter = True
    max_retries = 8
    acks_late = True
    reject_on_worker_lost = True
    typing = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        structlog.contextvars.bind_contextvars(task_id=self.request.id, task=self.name)
        started = time.perf_counter()
        outcome = "error"
        try:
            result = super().__call__(*args, **kwargs)
            outcome = "ok"
            return result
        finally:
            TASKS.labels(self.name, outcome).inc()
            TASK_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            structlog.contextvars.unbind_contextvars("task_id", "task")


@dataclass
class UnitOfWork:
    """One database transaction and the tasks it makes meaningful."""

    conn: sa.Connection
    follow_ups: list[Signature] = field(default_factory=list)

    def send_after_commit(self, signature: Signature) -> None:
        """Queue ``signature`` to be sent once this transaction has committed (never before,
        so a worker cannot pick up work whose rows it cannot see yet; never if it rolls back)."""
        self.follow_ups.append(signature)


@contextmanager
def unit_of_work(engine: sa.Engine) -> Iterator[UnitOfWork]:
    """``with unit_of_work(engine) as work:`` commits, then sends ``work``'s follow-up tasks."""
    with engine.begin() as conn:
        work = UnitOfWork(conn)
        yield work
    for signature in work.follow_ups:
        signature.apply_async()
