"""The Celery side against real Redis and PostgreSQL: configuration, follow-ups sent only after
commit, and a real worker process running a task."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from ledger import db
from ledger.accounts import create_account, create_asset
from ledger.commands import Leg, NewEntry
from ledger.posting import Poster
from ledger.settings import load_settings
from tests.conftest import APP_ROLE
from workers.app import (
    QUEUE_LEDGER,
    TASK_ESCROW_SWEEP,
    TASK_EXPIRE_HOLDS,
    TASK_INDEX,
    TASK_POINTS_EXPIRE,
    TASK_POINTS_INGEST,
    TASK_RECONCILE,
    TASK_SEND,
    TASK_STAKING_TICK,
    make_celery,
)
from workers.base import unit_of_work

BIN = Path(sys.executable).parent


@pytest.fixture
def broker_url(redis_url: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE_LEDGER)
    yield redis_url
    client.delete(QUEUE_LEDGER)
    client.close()


def _celery(broker_url: str, database_url: str | None = None) -> Celery:
    env = {"TRACE_REDIS_URL": broker_url}
    if database_url:
        env["TRACE_DATABASE_URL"] = database_url
    return make_celery(load_settings(env))


def test_configuration_is_explicit() -> None:
    conf = make_celery(load_settings({"TRACE_REDIS_URL": "redis://127.0.0.1:6379/0"})).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_ignore_result is True
    assert conf.result_backend is None
    assert conf.task_routes[TASK_SEND] == {"queue": "chain-send"}
    assert conf.task_routes[TASK_INDEX] == {"queue": "chain"}
    assert conf.task_routes[TASK_POINTS_INGEST] == {"queue": "ledger"}
    assert {entry["task"] for entry in conf.beat_schedule.values()} == {
        TASK_INDEX,
        TASK_SEND,
        TASK_EXPIRE_HOLDS,
        TASK_ESCROW_SWEEP,
        TASK_POINTS_EXPIRE,
        TASK_STAKING_TICK,
        TASK_RECONCILE,
    }


def test_follow_up_tasks_leave_only_after_the_commit(broker_url: str, fresh_db_url: str) -> None:
    celery = _celery(broker_url)
    queue = redis.Redis.from_url(broker_url)
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=1)
    try:
        with pytest.raises(RuntimeError), unit_of_work(engine) as work:
            create_asset(work.conn, "PTS", 0)
            work.send_after_commit(celery.signature(TASK_EXPIRE_HOLDS))
            assert queue.llen(QUEUE_LEDGER) == 0
            raise RuntimeError("the transaction fails")
        assert queue.llen(QUEUE_LEDGER) == 0  # rolled back: nothing was sent
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ledger_assets")).scalar_one() == 0
        with unit_of_work(engine) as work:
            create_asset(work.conn, "PTS", 0)
            work.send_after_commit(celery.signature(TASK_EXPIRE_HOLDS))
            assert queue.llen(QUEUE_LEDGER) == 0  # not before the commit
        assert queue.llen(QUEUE_LEDGER) == 1
    finally:
        engine.dispose()
        queue.close()


def test_a_real_worker_runs_the_expiry_sweep(broker_url: str, fresh_db_url: str, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=2)
    with engine.begin() as conn:
        create_asset(conn, "PTS", 0)
        create_account(conn, "pts:issued", "PTS", "equity")
        create_account(conn, "pts:alice", "PTS", "liability")
    [result] = Poster(engine).post(
        [NewEntry("hold-1", (Leg("pts:issued", "pts:alice", 5, pending=True, timeout_s=1),))]
    )
    assert result.status == "created"
    time.sleep(1.2)
    env = {
        **os.environ,
        "TRACE_DATABASE_URL": fresh_db_url,
        "TRACE_REDIS_URL": broker_url,
        "TRACE_DATA_DIR": str(tmp_path),
        "TRACE_LOG_LEVEL": "WARNING",
        "TRACE_WORKER_METRICS_PORT": str(metrics_port),
    }
    worker = subprocess.Popen(
        [str(BIN / "tracechain"), "worker", "--concurrency", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _celery(broker_url, fresh_db_url).send_task(TASK_EXPIRE_HOLDS)
        deadline = time.monotonic() + 60
        expired = 0
        while time.monotonic() < deadline and not expired:
            with engine.connect() as conn:
                expired = conn.execute(
                    sa.text("SELECT count(*) FROM ledger_transfers WHERE kind = 'expire'")
                ).scalar_one()
            time.sleep(0.2)
        assert worker.poll() is None, worker.stderr.read().decode() if worker.stderr else ""
        assert expired == 1
        with engine.connect() as conn:
            pending = conn.execute(
                sa.text("SELECT credits_pending FROM ledger_accounts WHERE code = 'pts:alice'")
            ).scalar_one()
        assert pending == 0
        # The worker exports what its tasks did.
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'tracechain_tasks_total{outcome="ok",task="tracechain.ledger.expire_holds"} 1.0' in metrics
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        engine.dispose()
