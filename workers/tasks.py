"""The tasks: thin entry points that take ids (or nothing), call the domain, and log the result.

Each is safe to run twice: the indexer and the sender hold an advisory lock and resume from
what PostgreSQL holds; the expiry sweep books each expiry under a unique key.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery

from ledger.expiry import expire_holds
from ledger.points import expiry as points_expiry
from ledger.points import ingest as points_ingest
from ledger.posting import Poster
from workers import app as app_module
from workers import escrow_saga, staking_saga
from workers import reconcile as reconcile_module
from workers.base import TRANSIENT, TraceTask
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

    @celery.task(
        name=app_module.TASK_POINTS_INGEST,
        base=TraceTask,
        bind=True,
        shared=False,
        autoretry_for=(*TRANSIENT, points_ingest.IngestRaceLost),
    )
    def ingest_points(self: TraceTask, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Accrue one batch of events (idempotent per event: a redelivered batch adds nothing)."""
        with runtime_of(celery).engine.begin() as conn:
            report = points_ingest.ingest(conn, events)
        summary = report.as_dict(details_max=20)
        log.info("task.points_ingest", **{k: v for k, v in summary.items() if k != "skipped"})
        return summary

    @celery.task(name=app_module.TASK_POINTS_EXPIRE, base=TraceTask, bind=True, shared=False)
    def expire_points(self: TraceTask) -> dict[str, Any]:
        lots, total, after = 0, 0, 0
        for _ in range(100):  # bounded: at most 100 x SWEEP_MAX_LOTS lots a run
            with runtime_of(celery).engine.begin() as conn:
                report = points_expiry.expire_points(conn, after=after)
            lots += report.lots
            total += report.points
            after = report.last_lot
            if report.examined < points_expiry.SWEEP_MAX_LOTS:
                break
        if lots:
            log.info("task.points_expire", lots=lots, points=str(total))
        return {"lots": lots, "points": str(total)}

    @celery.task(name=app_module.TASK_STAKING_TICK, base=TraceTask, bind=True, shared=False)
    def tick_staking_pools(self: TraceTask) -> dict[str, int]:
        run = staking_saga.tick_all(runtime_of(celery).engine)
        if run.entries or run.returned:
            log.info("task.staking_tick", **run.as_dict())
        return run.as_dict()

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
