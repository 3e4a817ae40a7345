"""The embedded PostgreSQL and Redis servers: start, reuse, persistence across restarts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from admin_api.embedded import (
    EmbeddedService,
    EmbeddedServiceError,
    start_postgres,
    start_redis,
)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class _Services:
    """Started services, all stopped at teardown whatever happens in the test."""

    def __init__(self) -> None:
        self.started: list[EmbeddedService] = []

    def postgres(self, data_dir: Path) -> EmbeddedService:
        service = start_postgres(data_dir)
        self.started.append(service)
        return service

    def redis(self, data_dir: Path) -> EmbeddedService:
        service = start_redis(data_dir)
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for service in reversed(self.started):
            try:
                service.stop()
            except Exception as exc:
                errors.append(exc)
        self.started.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def services() -> Iterator[_Services]:
    started = _Services()
    try:
        yield started
    finally:
        started.stop_all()


def test_services_persist_across_restarts_and_are_reused(tmp_path: Path, services: _Services) -> None:
    data_dir = tmp_path / "data"

    pg = services.postgres(data_dir)
    rd = services.redis(data_dir)
    assert pg.started_here and rd.started_here
    assert pg.url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert pg.url.endswith("/tracechain")
    assert rd.url.startswith("redis://127.0.0.1:") and rd.url.endswith("/0")
    assert (data_dir / "postgres" / "PG_VERSION").exists()
    assert pg.log_path.is_file() and rd.log_path.is_file()

    with psycopg.connect(_libpq(pg.url)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("tracechain",)
        conn.execute("CREATE TABLE marker (id int PRIMARY KEY, note text NOT NULL)")
        conn.execute("INSERT INTO marker VALUES (1, 'kept')")
    with redis.Redis.from_url(rd.url) as client:
        assert client.set("marker", "kept")

    if os.geteuid() == 0:
        # PostgreSQL refuses root: the server must run as an unprivileged account.
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        assert Path(f"/proc/{pid}").stat().st_uid != 0

    # A second start while running reuses the server; stopping that handle is a no-op.
    pg_again = services.postgres(data_dir)
    rd_again = services.redis(data_dir)
    assert not pg_again.started_here and pg_again.url == pg.url
    assert not rd_again.started_here and rd_again.url == rd.url
    pg_again.stop()
    rd_again.stop()
    with psycopg.connect(_libpq(pg.url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with redis.Redis.from_url(rd.url) as client:
        assert client.ping()

    services.stop_all()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_libpq(pg.url), connect_timeout=2).close()
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(rd.url) as client:
        client.ping()

    pg = services.postgres(data_dir)
    rd = services.redis(data_dir)
    assert pg.started_here and rd.started_here
    with psycopg.connect(_libpq(pg.url)) as conn:
        assert conn.execute("SELECT note FROM marker WHERE id = 1").fetchone() == ("kept",)
    with redis.Redis.from_url(rd.url) as client:
        assert client.get("marker") == b"kept"


def test_remembered_port_is_reused_after_restart(tmp_path: Path, services: _Services) -> None:
    first = services.postgres(tmp_path)
    port = (tmp_path / "postgres.port").read_text().strip()
    assert first.url.endswith(f":{port}/tracechain")
    services.stop_all()
    assert services.postgres(tmp_path).url == first.url


def test_start_failure_names_the_log(tmp_path: Path) -> None:
    # A non-empty PGDATA without PG_VERSION makes initdb fail.
    (tmp_path / "postgres").mkdir()
    (tmp_path / "postgres" / "junk").write_text("not a cluster")
    with pytest.raises(EmbeddedServiceError) as excinfo:
        start_postgres(tmp_path)
    assert str(tmp_path / "postgres-initdb.log") in str(excinfo.value)
