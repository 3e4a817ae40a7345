"""Shared fixtures: real PostgreSQL and Redis, a migrated database per test worker.

With TRACE_TEST_DATABASE_URL / TRACE_TEST_REDIS_URL set (CI sets them) the tests use those
servers; otherwise they start the embedded PostgreSQL and Redis under a temporary folder.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from ledger import db
from ledger.settings import load_settings

APP_ROLE = "tracechain_app"


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0")


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def pg_server_url(services_dir: Path) -> Iterator[str]:
    """A PostgreSQL server URL (to its maintenance database) that tests may create databases on."""
    settings = load_settings()
    if settings.test_database_url:
        yield db.libpq_url(settings.test_database_url)
        return
    from admin_api.embedded import start_postgres

    service = start_postgres(services_dir / _worker())
    try:
        yield db.libpq_url(service.url)
    finally:
        service.stop()


@pytest.fixture(scope="session")
def redis_url(services_dir: Path) -> Iterator[str]:
    settings = load_settings()
    if settings.test_redis_url:
        yield settings.test_redis_url
        return
    from admin_api.embedded import start_redis

    service = start_redis(services_dir / f"redis-{_worker()}")
    try:
        yield service.url
    finally:
        service.stop()


def _database_url(server_url: str, name: str) -> str:
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


class Databases:
    """Creates and drops databases on the test server."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.created: list[str] = []

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.server_url, autocommit=True)

    def create(self, template: str | None = None) -> str:
        name = f"tc_{_worker()}_{uuid.uuid4().hex[:10]}"
        with self._admin() as conn:
            clause = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{clause}')
            if template:
                # Database-level privileges are not copied from a template; the migration
                # revoked this one on the template, so a clone gets the same.
                conn.execute(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC')
        self.created.append(name)
        return name

    def drop(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, name: str) -> str:
        return _database_url(self.server_url, name)


@pytest.fixture(scope="session")
def databases(pg_server_url: str) -> Iterator[Databases]:
    dbs = Databases(pg_server_url)
    yield dbs
    for name in dbs.created:
        dbs.drop(name)


@pytest.fixture(scope="session")
def template_db(databases: Databases) -> str:
    """A migrated, empty database used as the template of every fresh test database."""
    name = databases.create()
    db.upgrade(databases.url(name), role=APP_ROLE)
    return name


@pytest.fixture(scope="session")
def db_url(databases: Databases, template_db: str) -> str:
    """This test worker's migrated database, shared by its tests (use unique account codes)."""
    return databases.url(databases.create(template=template_db))


@pytest.fixture
def fresh_db_url(databases: Databases, template_db: str) -> Iterator[str]:
    """A migrated database of this test's own, empty, dropped afterwards."""
    name = databases.create(template=template_db)
    yield databases.url(name)
    databases.drop(name)


@pytest.fixture(scope="session")
def app_engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on the worker database acting as the application role."""
    engine = db.make_engine(db_url, role=APP_ROLE)
    yield engine
    engine.dispose()


@pytest.fixture
def conn(app_engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection whose work is rolled back after the test (a transaction per test)."""
    with app_engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()


@pytest.fixture
def unique() -> str:
    """A prefix that makes account codes and keys of this test unique."""
    return f"t{uuid.uuid4().hex[:12]}"
