"""The Celery application of the worker cluster (DESIGN §12).

Redis is the broker and nothing stores results: the state of every piece of work lives in
PostgreSQL, so a task only needs ids and is safe to run twice. ``celery -A workers.app ...``
(or ``tracechain worker|sender|beat``) loads this module.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery
from kombu import Queue

from ledger.settings import Settings, load_settings

# Queues per domain; the chain-send queue is consumed by exactly one sender process per key.
QUEUE_LEDGER = "ledger"
QUEUE_CHAIN = "chain"
QUEUE_CHAIN_SEND = "chain-send"
QUEUES = (QUEUE_LEDGER, QUEUE_CHAIN, QUEUE_CHAIN_SEND)

TASK_INDEX = "tracechain.chain.index"
TASK_SEND = "tracechain.chain.send"
TASK_EXPIRE_HOLDS = "tracechain.ledger.expire_holds"
TASK_ESCROW_SWEEP = "tracechain.escrow.sweep"
TASK_POINTS_INGEST = "tracechain.points.ingest"
TASK_POINTS_EXPIRE = "tracechain.points.expire"
TASK_STAKING_TICK = "tracechain.staking.tick"
TASK_RECONCILE = "tracechain.reconcile.run"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting, explicit (nothing left to Celery's defaults where it matters)."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        # An unacknowledged task goes back to the queue after this long (longer than any task).
        "broker_transport_options": {"visibility_timeout": 3600},
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": 600,
        "task_soft_time_limit": 540,
        "task_default_queue": QUEUE_LEDGER,
        "task_queues": [Queue(name) for name in QUEUES],
        "task_routes": {
            TASK_INDEX: {"queue": QUEUE_CHAIN},
            TASK_SEND: {"queue": QUEUE_CHAIN_SEND},
            TASK_EXPIRE_HOLDS: {"queue": QUEUE_LEDGER},
            TASK_ESCROW_SWEEP: {"queue": QUEUE_LEDGER},
            TASK_POINTS_INGEST: {"queue": QUEUE_LEDGER},
            TASK_POINTS_EXPIRE: {"queue": QUEUE_LEDGER},
            TASK_STAKING_TICK: {"queue": QUEUE_LEDGER},
            TASK_RECONCILE: {"queue": QUEUE_CHAIN},
        },
        "beat_schedule": beat_schedule(settings),
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The sweeps beat starts. Each task takes a lock or is idempotent, so an overlap is harmless;
    expiring each message keeps a stopped worker from finding a pile of stale ticks."""
    return {
        "index-chain": {
            "task": TASK_INDEX,
            "schedule": timedelta(seconds=settings.indexer_interval_s),
            "options": {"expires": max(1.0, settings.indexer_interval_s * 2)},
        },
        "send-outbox": {
            "task": TASK_SEND,
            "schedule": timedelta(seconds=settings.sender_interval_s),
            "options": {"expires": max(1.0, settings.sender_interval_s * 2)},
        },
        "escrow-deadlines": {
            "task": TASK_ESCROW_SWEEP,
            "schedule": timedelta(seconds=settings.escrow_sweep_interval_s),
            "options": {"expires": 30},
        },
        "staking-ticks": {
            "task": TASK_STAKING_TICK,
            "schedule": timedelta(seconds=settings.staking_tick_interval_s),
            "options": {"expires": max(1.0, settings.staking_tick_interval_s)},
        },
        "expire-holds": {
            "task": TASK_EXPIRE_HOLDS,
            "schedule": timedelta(seconds=60),
            "options": {"expires": 60},
        },
        "points-expiry": {
            "task": TASK_POINTS_EXPIRE,
            "schedule": timedelta(seconds=settings.points_expiry_interval_s),
            "options": {"expires": max(1.0, settings.points_expiry_interval_s)},
        },
        "reconcile": {
            "task": TASK_RECONCILE,
            "schedule": timedelta(seconds=settings.reconcile_interval_s),
            "options": {"expires": max(1.0, settings.reconcile_interval_s)},
        },
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``, with our tasks registered."""
    celery = Celery("tracechain", set_as_current=False)
    celery.conf.update(celery_config(settings))
    celery.conf["tracechain_settings"] = settings
    # Imported here: the task module imports this one for the task names.
    from workers.tasks import register

    register(celery)
    return celery


def serve_metrics(celery: Celery) -> None:
    """Export the worker's Prometheus metrics on ``TRACE_WORKER_METRICS_PORT`` once it starts
    (a worker of one process: the threads or solo pool)."""
    from celery.signals import worker_init
    from prometheus_client import start_http_server

    settings: Settings = celery.conf["tracechain_settings"]
    port = settings.worker_metrics_port
    if port is None:
        return

    @worker_init.connect(weak=False)
    def _start(**_kwargs: Any) -> None:
        start_http_server(port, addr=settings.api_host)


app = make_celery(load_settings())
