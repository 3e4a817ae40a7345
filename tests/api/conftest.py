"""Fixtures of the admin API tests: an app on the worker database, staff keys, a small chart."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import flask
import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from admin_api.app import close_app, create_app
from admin_api.auth import ROLES, create_api_key
from contracts.deployment import Deployment
from ledger import accounts
from ledger.settings import load_settings


@pytest.fixture(scope="session")
def api_keys(app_engine: sa.Engine) -> dict[str, str]:
    """One staff key per role on the worker database."""
    with app_engine.begin() as conn:
        return {role: create_api_key(conn, role, f"tests {role}") for role in ROLES}


@pytest.fixture
def app(app_engine: sa.Engine) -> Iterator[flask.Flask]:
    application = create_app(engine=app_engine)
    yield application
    close_app(application)


@pytest.fixture
def client(app: flask.Flask) -> FlaskClient:
    return app.test_client()


@contextlib.contextmanager
def deployed_app(
    engine: sa.Engine, work: Path, deployment: Deployment, label: str, roles: Iterable[str], **env: str
) -> Iterator[tuple[FlaskClient, dict[str, str]]]:
    """A test client of an app on ``engine`` that reads ``deployment`` from ``work`` (more settings
    in ``env``), and a staff key for each of ``roles`` labelled ``label``."""
    deployment.save(work / "deployment.json")
    settings = load_settings(
        {
            "TRACE_DATA_DIR": str(work),
            "TRACE_DEPLOYMENT_FILE": str(work / "deployment.json"),
            "TRACE_LOG_LEVEL": "WARNING",
            **env,
        }
    )
    app = create_app(settings, engine=engine)
    with engine.begin() as conn:
        keys = {role: create_api_key(conn, role, f"{label} {role}") for role in roles}
    try:
        yield app.test_client(), keys
    finally:
        close_app(app)


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


@dataclass
class Chart:
    """Accounts of one test: an asset, a funding source and a few accounts to move money between."""

    asset: str
    other_asset: str
    source: str  # equity, no limit: where money comes from
    alice: str  # liability that may not go negative
    bob: str  # liability that may not go negative
    foreign: str  # an account of the other asset

    def codes(self) -> list[str]:
        return [self.source, self.alice, self.bob, self.foreign]


@pytest.fixture
def chart(app_engine: sa.Engine, unique: str) -> Chart:
    asset = ("A" + unique[1:9]).upper()
    other = ("B" + unique[1:9]).upper()
    c = Chart(asset, other, f"{unique}:source", f"{unique}:alice", f"{unique}:bob", f"{unique}:foreign")
    guarded = ["credits_must_not_exceed_debits"]
    with app_engine.begin() as conn:
        accounts.create_asset(conn, asset, 6)
        accounts.create_asset(conn, other, 0)
        accounts.create_account(conn, c.source, asset, "equity")
        accounts.create_account(conn, c.alice, asset, "liability", ["debits_must_not_exceed_credits"])
        accounts.create_account(conn, c.bob, asset, "liability", ["debits_must_not_exceed_credits"])
        accounts.create_account(conn, c.foreign, other, "asset", guarded)
    return c


def snapshot(engine: sa.Engine, codes: list[str] | None = None) -> dict[str, Any]:
    """Row counts of every ledger table, and the balances of ``codes``: what must not change."""
    with engine.connect() as conn:
        counts = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM ledger_assets), (SELECT count(*) FROM ledger_accounts),"
                " (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM ledger_transfers),"
                " (SELECT count(*) FROM audit_log),"
                " (SELECT count(*) FROM ledger_accounts WHERE closed)"
            )
        ).one()
        balances = {
            a.code: (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending, a.flags)
            for a in (accounts.get_account(conn, code) for code in codes or [])
        }
    return {"counts": tuple(counts), "balances": balances}


def audit_rows(engine: sa.Engine, target: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT actor, role, action, target, before, after, request_id, ip FROM audit_log"
                " WHERE target = :t ORDER BY id"
            ),
            {"t": target},
        ).mappings()
        return [dict(r) for r in rows]


def names(problem: dict[str, Any], word: str) -> bool:
    """Whether a problem names ``word`` (a field or a term) in its detail or its field messages."""
    return word in problem["detail"] or word in json.dumps(problem.get("errors", {}))


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is a problem+json of ``status`` and ``code`` with every RFC 9457 member."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = response.get_json(force=True)
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"/problems/{code}"
    assert body["title"] and body["detail"]
    assert body["instance"] == response.request.path
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


@dataclass
class RouteClient:
    """Calls an app's routes as a staff role, and checks that a refused request writes nothing.

    A subclass names its default role and, in ``STATE_SQL``, the queries whose answers a refused
    request must leave as they were.
    """

    client: FlaskClient
    engine: sa.Engine
    keys: dict[str, str]
    DEFAULT_ROLE: ClassVar[str] = "finance"
    STATE_SQL: ClassVar[Mapping[str, str]] = {}

    def call(self, method: str, path: str, body: Any = None, *, role: str | None = "") -> TestResponse:
        role = self.DEFAULT_ROLE if role == "" else role
        headers = bearer(self.keys[role]) if role else {}
        return self.client.open(path, method=method, json=body, headers=headers)

    def ok(
        self, method: str, path: str, body: Any = None, *, role: str | None = "", expect: int = 200
    ) -> Any:
        response = self.call(method, path, body, role=role)
        assert response.status_code == expect, response.get_data(as_text=True)
        return response.get_json()

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        with self.engine.connect() as conn:
            return {
                name: [tuple(r) for r in conn.execute(sa.text(sql))] for name, sql in self.STATE_SQL.items()
            }

    def refused(
        self, status: int, code: str, method: str, path: str, body: Any = None, *, role: str | None = ""
    ) -> dict[str, Any]:
        """The request is refused with ``status`` and ``code`` and writes nothing."""
        before = self.state()
        problem = assert_problem(self.call(method, path, body, role=role), status, code)
        assert self.state() == before, f"{method} {path} wrote something although it was refused"
        return problem
