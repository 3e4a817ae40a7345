"""The exceptions-queue routes: the queue with filters and paging, assign, notes, manual match,
write-offs with four eyes; problem+json for every refusal, nothing written; every write audited."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from admin_api.app import close_app, create_app
from admin_api.auth import create_api_key
from ledger import db
from ledger.accounts import create_account, create_asset
from ledger.commands import Leg, NewEntry
from ledger.engine import post_batch
from ledger.exceptions_queue import open_exception
from tests.api.conftest import assert_problem, audit_rows, bearer
from tests.conftest import APP_ROLE, Databases


@dataclass
class Api:
    client: FlaskClient
    engine: sa.Engine
    keys: dict[str, str]

    def post(self, url: str, body: Any = None, who: str = "finance") -> Any:
        return self.client.post(url, json=body if body is not None else {}, headers=bearer(self.keys[who]))

    def get(self, url: str, who: str = "auditor") -> Any:
        return self.client.get(url, headers=bearer(self.keys[who]))

    def rows(self) -> tuple[Any, ...]:
        with self.engine.connect() as conn:
            return tuple(
                conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1")).all()
                for t in (
                    "finance_exceptions",
                    "finance_exception_notes",
                    "finance_writeoffs",
                    "ledger_entries",
                )
            )


@pytest.fixture
def api(databases: Databases, template_db: str) -> Iterator[Api]:
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    with engine.begin() as conn:
        create_asset(conn, "TRACE", 18)
        create_account(conn, "suspense:chain:1", "TRACE", "liability")
        create_account(conn, "chain:1:custody", "TRACE", "asset")
        create_account(conn, "revenue:unclaimed", "TRACE", "revenue")
        post_batch(conn, [NewEntry("in", (Leg("chain:1:custody", "suspense:chain:1", 900),))])
        for n in range(3):
            open_exception(conn, f"unexplained:{n}", "unexplained_transfer", {"amount": "300"})
        keys = {
            "finance": create_api_key(conn, "finance", "f1"),
            "finance2": create_api_key(conn, "finance", "f2"),
            "auditor": create_api_key(conn, "auditor", "a"),
            "operator": create_api_key(conn, "operator", "o"),
        }
    app = create_app(engine=engine)
    yield Api(app.test_client(), engine, keys)
    close_app(app)
    engine.dispose()
    databases.drop(name)


def test_the_queue_pages_and_filters(api: Api) -> None:
    first = api.get("/exceptions?limit=2").get_json()
    assert [e["id"] for e in first["items"]] == [1, 2]
    assert first["items"][0]["age_s"] >= 0
    rest = api.get(f"/exceptions?limit=2&after={first['next']}").get_json()
    assert ([e["id"] for e in rest["items"]], rest["next"]) == ([3], None)
    api.post("/exceptions/2/assign", {"assignee": "dana"})
    assert [e["id"] for e in api.get("/exceptions?assignee=dana", who="operator").get_json()["items"]] == [2]
    assert api.get("/exceptions?status=resolved").get_json()["items"] == []


def test_assign_note_match_are_audited(api: Api) -> None:
    assert api.post("/exceptions/1/assign", {"assignee": "dana"}).status_code == 200
    noted = api.post("/exceptions/1/notes", {"note": "looked at the tx"})
    assert noted.status_code == 201
    matched = api.post("/exceptions/1/match", {"note": "booked against escrow 9 by hand"})
    assert matched.status_code == 200
    body = matched.get_json()
    assert (body["status"], body["resolution"], body["assignee"]) == ("resolved", "manual_match", "dana")
    assert [n["note"] for n in body["notes"]] == ["looked at the tx"]
    actions = [r["action"] for r in audit_rows(api.engine, "exception:1")]
    assert actions == ["exception.assign", "exception.note", "exception.match"]
    assert_problem(api.post("/exceptions/1/assign", {"assignee": "eve"}), 409, "exception_resolved")


def test_a_write_off_takes_two_people(api: Api) -> None:
    proposal = api.post(
        "/exceptions/2/writeoffs",
        {"debit": "suspense:chain:1", "credit": "revenue:unclaimed", "amount": "300", "reason": "unclaimed"},
    )
    assert proposal.status_code == 201, proposal.get_json()
    wid = proposal.get_json()["id"]
    before = api.rows()
    assert_problem(api.post(f"/writeoffs/{wid}/approve"), 409, "four_eyes")
    assert_problem(api.post(f"/writeoffs/{wid}/approve", who="auditor"), 403, "forbidden")
    assert api.rows() == before
    approved = api.post(f"/writeoffs/{wid}/approve", who="finance2")
    assert approved.status_code == 200
    assert approved.get_json()["entry_key"] == f"writeoff:{wid}"
    exception = api.get("/exceptions/2").get_json()
    assert (exception["status"], exception["resolution"]) == ("resolved", "write_off")
    assert [w["status"] for w in exception["writeoffs"]] == ["approved"]
    assert [r["action"] for r in audit_rows(api.engine, f"writeoff:{wid}")] == [
        "writeoff.propose",
        "writeoff.approve",
    ]
    assert_problem(api.post(f"/writeoffs/{wid}/reject", who="finance2"), 409, "writeoff_decided")


@pytest.mark.parametrize(
    ("url", "body", "status", "code"),
    [
        ("/exceptions/99/assign", {"assignee": "x"}, 404, "unknown_exception"),
        ("/exceptions/1/assign", {"assignee": ""}, 400, "invalid_input"),
        ("/exceptions/1/assign", {"assignee": "x", "extra": 1}, 400, "invalid_input"),
        ("/exceptions/1/notes", {}, 400, "invalid_input"),
        ("/exceptions/1/match", {"note": "x" * 4001}, 400, "invalid_input"),
        (
            "/exceptions/1/writeoffs",
            {"debit": "a", "credit": "b", "amount": 5, "reason": "r"},
            400,
            "invalid_input",
        ),
        (
            "/exceptions/1/writeoffs",
            {"debit": "a", "credit": "b", "amount": "-5", "reason": "r"},
            400,
            "invalid_input",
        ),
        (
            "/exceptions/1/writeoffs",
            {"debit": "a", "credit": "b", "amount": str(2**256), "reason": "r"},
            400,
            "invalid_input",
        ),
        (
            "/exceptions/1/writeoffs",
            {"debit": "nope", "credit": "revenue:unclaimed", "amount": "5", "reason": "r"},
            404,
            "unknown_account",
        ),
        ("/writeoffs/77/approve", None, 404, "unknown_writeoff"),
    ],
)
def test_bad_requests_write_nothing(api: Api, url: str, body: Any, status: int, code: str) -> None:
    before = api.rows()
    assert_problem(api.post(url, body), status, code)
    assert api.rows() == before


def test_readers_cannot_write(api: Api) -> None:
    for who in ("auditor", "operator"):
        assert_problem(api.post("/exceptions/1/notes", {"note": "n"}, who=who), 403, "forbidden")
    assert api.get("/exceptions/1", who="operator").status_code == 200
