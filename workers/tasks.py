"""The tasks: thin entry points that take ids (or nothing), call the domain, and log the result.

Each is safe to run twice: the indexer and the sender hold an advisory lock and resume from
what PostgreSQL holds; the expiry sweep books each expiry under a unique key.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery

from ledger.expiry import expire_holds
from ledger.posting import Poster
from workers import app as app_module
from workers import escrow_saga
from workers import reconcile as reconcile_module
from workers.base import TraceTask
from workers.runtime import Runtime

log = structlog.get_logger(__name__)

_runtimes: dict[int, Runtime] = {}


def runtime_of(celery: Celery) -> Runtime:
    """The process's runtime for ``celery`` (one per app; tests build several apps)."""
    key = id(celery)
    if key not in _runtimes:
        _runtimes[key] = Runtime(celery.conf["tracechain_settings"])
    return _runtimes[key]


def register(celery: Celery) -> None:
    """Register every task on ``celery`` under its explicit name."""

    @celery.task(name=app_module.TASK_INDEX, base=TraceTask, bind=True, shared=False)
    def index_chain(self: TraceTask) -> dict[str, Any]:
        report = runtime_of(celery).indexer().run_once()
        log.info("task.index_chain", **report.as_dict())
        return report.as_dict()

    @celery.task(name=app_module.TASK_SEND, base=TraceTask, bind=True, shared=False)
    def send_outbox(self: TraceTask) -> dict[str, Any]:
        report = runtime_of(celery).sender().run_once()
        if report.signed or report.confirmed or report.failed or report.bumped:
            log.info("task.send_outbox", **report.as_dict())
        return report.as_dict()

    @celery.task(name=app_module.TASK_EXPIRE_HOLDS, base=TraceTask, bind=True, shared=False)
    def expire_timed_out_holds(self: TraceTask) -> int:
        results = expire_holds(Poster(runtime_of(celery).engine))
        created = sum(1 for r in results if r.status == "created")
        log.info("task.expire_holds", expired=created)
        return created

    @celery.task(name=app_module.TASK_ESCROW_SWEEP, base=TraceTask, bind=True, shared=False)
    def sweep_escrow_deadlines(self: TraceTask) -> dict[str, int]:
        runtime = runtime_of(celery)
        report = escrow_saga.sweep(runtime.engine, runtime.deployment)
        if report.expired or report.returned:
            log.info("task.escrow_sweep", **report.as_dict())
        return report.as_dict()

    @celery.task(name=app_module.TASK_RECONCILE, base=TraceTask, bind=True, shared=False)
    def reconcile(self: TraceTask) -> dict[str, Any] | None:
        runtime = runtime_of(celery)
        report = reconcile_module.scheduled(
            runtime.engine,
            runtime.w3,
            runtime.deployment,
            unseen_within_s=runtime.settings.reconcile_unseen_within_s,
        )
        if report is None:
            return None
        summary = {k: v for k, v in report.as_dict().items() if k not in ("breaks", "balances")}
        (log.info if report.ok else log.warning)("task.reconcile", **summary)
        return summary
