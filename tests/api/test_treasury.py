"""The treasury top-up routes on real PostgreSQL (a deployment record with made-up addresses; the
chain side is in tests/chain_node/test_treasury.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger import db, treasury
from tests.api.conftest import RouteClient, deployed_app, names
from tests.api.test_points import DEPLOYMENT
from tests.books import totals
from tests.conftest import APP_ROLE, Databases

TRACE = 10**18
_STATE_SQL = (
    "SELECT (SELECT count(*) FROM chain_outbox), (SELECT count(*) FROM audit_log),"
    " (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM ledger_accounts),"
    " (SELECT COALESCE(sum(debits_pending + credits_pending), 0) FROM ledger_accounts)"
)


@dataclass
class Api(RouteClient):
    DEFAULT_ROLE = "admin"
    STATE_SQL = {"counts": _STATE_SQL}


@pytest.fixture(scope="module")
def api(databases: Databases, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    work: Path = tmp_path_factory.mktemp("treasury-api")
    try:
        with deployed_app(engine, work, DEPLOYMENT, "treasury", ("admin", "finance", "auditor")) as (
            client,
            keys,
        ):
            yield Api(client, engine, keys)
    finally:
        engine.dispose()
        databases.drop(name)


def test_a_top_up_is_held_queued_audited_and_idempotent(api: Api, unique: str) -> None:
    body = {"key": unique, "amount": str(250 * TRACE)}
    created = api.ok("POST", "/treasury/mints", body, expect=201)
    assert (created["status"], created["amount"], created["treasury"]) == (
        "pending",
        str(250 * TRACE),
        DEPLOYMENT.treasury,
    )
    assert api.ok("POST", "/treasury/mints", body, expect=200) == created
    assert api.ok("GET", f"/treasury/mints/{unique}", role="auditor") == created
    issued = totals(api.engine, treasury.issued_code(DEPLOYMENT.chain_id))
    assert issued[3] >= 250 * TRACE  # held until the mint is confirmed
    with api.engine.connect() as conn:
        actions = conn.execute(
            db.sa.text("SELECT action, role FROM audit_log WHERE target = :t"),
            {"t": f"treasury:mint:{unique}"},
        ).all()
    assert [tuple(a) for a in actions] == [("treasury.mint", "admin")]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"amount": "1"}, "key"),
        ({"key": "k", "amount": "-1"}, "amount"),
        ({"key": "k", "amount": "0"}, "amount"),
        ({"key": "k", "amount": str(2**256)}, "amount"),
        ({"key": "k", "amount": "1.5"}, "amount"),
        ({"key": "k", "amount": 10}, "amount"),
        ({"key": "", "amount": "1"}, "key"),
        ({"key": "k", "amount": "1", "asset": "ETH"}, "asset"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(api: Api, body: dict[str, Any], named: str) -> None:
    problem = api.refused(400, "invalid_input", "POST", "/treasury/mints", body)
    assert names(problem, named)


def test_other_roles_and_conflicts_write_nothing(api: Api, unique: str) -> None:
    body = {"key": unique, "amount": str(TRACE)}
    for role in ("finance", "auditor"):
        assert names(api.refused(403, "forbidden", "POST", "/treasury/mints", body, role=role), "admin")
    api.refused(401, "unauthenticated", "POST", "/treasury/mints", body, role=None)
    api.ok("POST", "/treasury/mints", body, expect=201)
    conflict = api.refused(409, "idempotency_conflict", "POST", "/treasury/mints", {**body, "amount": "2"})
    assert names(conflict, "other content")
    assert names(api.refused(404, "unknown_top_up", "GET", f"/treasury/mints/{unique}-none"), unique)
