"""Assets, accounts, balances, statements and the audit log through the API."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask.testing import FlaskClient

from tests.api.conftest import Chart, assert_problem, audit_rows, bearer, snapshot


def test_create_and_list_assets(
    client: FlaskClient, api_keys: dict[str, str], unique: str, app_engine: sa.Engine
) -> None:
    code = ("Z" + unique[1:9]).upper()
    fin = bearer(api_keys["finance"], **{"X-Request-ID": f"asset-{unique}"})
    created = client.post("/assets", json={"code": code, "scale": 18}, headers=fin)
    assert created.status_code == 201
    assert created.get_json() == {"code": code, "scale": 18}
    again = client.post("/assets", json={"code": code, "scale": 18}, headers=fin)
    assert again.status_code == 200
    before = snapshot(app_engine)
    assert_problem(
        client.post("/assets", json={"code": code, "scale": 6}, headers=fin), 409, "asset_conflict"
    )
    for bad in (
        {"code": "lower", "scale": 1},
        {"code": code, "scale": 37},
        {"code": code, "scale": "6"},
        {"code": code},
        {"code": code, "scale": 6, "extra": 1},
        {"code": code, "scale": 6.0},
    ):
        assert_problem(client.post("/assets", json=bad, headers=fin), 400, "invalid_input")
    assert snapshot(app_engine) == before
    listed = client.get("/assets", headers=bearer(api_keys["operator"])).get_json()["items"]
    assert {"code": code, "scale": 18} in listed
    rows = audit_rows(app_engine, f"asset:{code}")
    assert [(r["action"], r["role"], r["request_id"]) for r in rows] == [
        ("asset.create", "finance", f"asset-{unique}")
    ]
    assert rows[0]["after"] == {"code": code, "scale": 18} and rows[0]["before"] is None


def test_create_get_and_list_accounts(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, unique: str, app_engine: sa.Engine
) -> None:
    admin = bearer(api_keys["admin"])
    codes = [f"{unique}/acct/{i}" for i in range(5)]
    for code in codes:
        body = {
            "code": code,
            "asset": chart.asset,
            "kind": "liability",
            "flags": ["debits_must_not_exceed_credits"],
            "metadata": {"owner": code},
        }
        response = client.post("/accounts", json=body, headers=admin)
        assert response.status_code == 201, response.get_data(as_text=True)
        assert response.get_json() == {
            "code": code,
            "asset": chart.asset,
            "kind": "liability",
            "flags": ["debits_must_not_exceed_credits"],
            "balance": "0",
            "debits_posted": "0",
            "credits_posted": "0",
            "debits_pending": "0",
            "credits_pending": "0",
            "metadata": {"owner": code},
        }
    repeat = client.post(
        "/accounts",
        json={
            "code": codes[0],
            "asset": chart.asset,
            "kind": "liability",
            "flags": ["debits_must_not_exceed_credits"],
        },
        headers=admin,
    )
    assert repeat.status_code == 200
    assert len(audit_rows(app_engine, f"account:{codes[0]}")) == 1

    # Codes may hold slashes: the account, its balance and statement routes still tell apart.
    got = client.get(f"/accounts/{codes[3]}", headers=bearer(api_keys["auditor"]))
    assert got.status_code == 200 and got.get_json()["code"] == codes[3]
    balance = client.get(f"/accounts/{codes[3]}/balance", headers=bearer(api_keys["auditor"]))
    assert balance.get_json()["code"] == codes[3] and balance.get_json()["balance"] == "0"
    statement = client.get(f"/accounts/{codes[3]}/statement", headers=bearer(api_keys["auditor"]))
    assert statement.get_json()["code"] == codes[3] and statement.get_json()["lines"] == []
    assert_problem(client.get(f"/accounts/{unique}/none", headers=admin), 404, "unknown_account")

    seen: list[str] = []
    after: str | None = None
    for _ in range(10):
        query: dict[str, Any] = {"prefix": f"{unique}/acct/", "limit": 2, "asset": chart.asset}
        if after:
            query["after"] = after
        page = client.get("/accounts", query_string=query, headers=admin).get_json()
        seen.extend(a["code"] for a in page["items"])
        after = page["next"]
        if after is None:
            break
    assert seen == codes
    other = client.get(
        "/accounts", query_string={"prefix": f"{unique}/acct/", "asset": chart.other_asset}, headers=admin
    )
    assert other.get_json() == {"items": [], "next": None}


def test_bad_accounts_are_refused_and_write_nothing(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, unique: str, app_engine: sa.Engine
) -> None:
    admin = bearer(api_keys["admin"])
    good = {"code": f"{unique}:new", "asset": chart.asset, "kind": "asset"}
    before = snapshot(app_engine, chart.codes())
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**good, "asset": "NOSUCH"}, 404, "unknown_asset"),
        ({**good, "code": chart.alice}, 409, "account_conflict"),
        ({**good, "kind": "cash"}, 400, "invalid_input"),
        ({**good, "code": "has space"}, 400, "invalid_input"),
        ({**good, "flags": ["sometimes"]}, 400, "invalid_input"),
        ({**good, "flags": "closed"}, 400, "invalid_input"),
        (
            {**good, "flags": ["debits_must_not_exceed_credits", "credits_must_not_exceed_debits"]},
            400,
            "invalid_input",
        ),
        ({**good, "metadata": {"x": 0.5}}, 400, "invalid_input"),
        ({**good, "colour": "red"}, 400, "invalid_input"),
        ({"code": good["code"]}, 400, "invalid_input"),
    ]
    for body, status, code in cases:
        assert_problem(client.post("/accounts", json=body, headers=admin), status, code)
    assert snapshot(app_engine, chart.codes()) == before
    assert audit_rows(app_engine, f"account:{unique}:new") == []


def test_close_and_reopen(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    fin = bearer(api_keys["finance"], **{"X-Request-ID": "close-1"})
    closed = client.post(f"/accounts/{chart.bob}/close", json={"reason": "dormant"}, headers=fin)
    assert closed.status_code == 200
    assert "closed" in closed.get_json()["flags"]
    again = client.post(f"/accounts/{chart.bob}/close", headers=fin)
    assert again.status_code == 200 and "closed" in again.get_json()["flags"]
    reopened = client.post(f"/accounts/{chart.bob}/reopen", headers=bearer(api_keys["admin"]))
    assert reopened.status_code == 200 and "closed" not in reopened.get_json()["flags"]
    rows = audit_rows(app_engine, f"account:{chart.bob}")
    # The account was made by the fixture without an actor: only the two changes are audited.
    assert [r["action"] for r in rows] == ["account.close", "account.reopen"]
    assert rows[0]["request_id"] == "close-1" and rows[0]["role"] == "finance"
    assert "closed" not in rows[0]["before"]["flags"] and "closed" in rows[0]["after"]["flags"]
    assert rows[0]["after"]["reason"] == "dormant"
    assert_problem(client.post("/accounts/no-such-acct/close", headers=fin), 404, "unknown_account")
    assert_problem(
        client.post(f"/accounts/{chart.bob}/close", json={"why": "x"}, headers=fin), 400, "invalid_input"
    )


def test_close_with_open_holds_is_409(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    admin = api_keys["admin"]
    hold = {"transfers": [{"debit": chart.source, "credit": chart.alice, "amount": "9", "pending": True}]}
    assert (
        client.post(
            "/entries", json=hold, headers=bearer(admin, **{"Idempotency-Key": f"{chart.alice}:h"})
        ).status_code
        == 201
    )
    before = snapshot(app_engine, chart.codes())
    assert_problem(client.post(f"/accounts/{chart.alice}/close", headers=bearer(admin)), 409, "open_holds")
    assert snapshot(app_engine, chart.codes()) == before
    assert audit_rows(app_engine, f"account:{chart.alice}") == []


def test_balance_now_and_as_of(client: FlaskClient, api_keys: dict[str, str], chart: Chart) -> None:
    admin = api_keys["admin"]
    reader = bearer(api_keys["operator"])
    url = f"/accounts/{chart.alice}/balance"
    first = client.post(
        "/entries",
        json={"transfers": [{"debit": chart.source, "credit": chart.alice, "amount": "40"}]},
        headers=bearer(admin, **{"Idempotency-Key": f"{chart.alice}:b1"}),
    ).get_json()
    client.post(
        "/entries",
        json={"transfers": [{"debit": chart.source, "credit": chart.alice, "amount": "2"}]},
        headers=bearer(admin, **{"Idempotency-Key": f"{chart.alice}:b2"}),
    )
    now = client.get(url, headers=reader).get_json()
    assert now == {
        "code": chart.alice,
        "asset": chart.asset,
        "balance": "42",
        "debits_posted": "0",
        "credits_posted": "42",
        "debits_pending": "0",
        "credits_pending": "0",
    }
    as_of = client.get(url, query_string={"as_of": first["posted_at"]}, headers=reader).get_json()
    assert as_of["balance"] == "40" and as_of["as_of"]
    early = client.get(url, query_string={"as_of": "2000-01-01T00:00:00+00:00"}, headers=reader).get_json()
    assert early["balance"] == "0"
    for query in (
        {"as_of": "2026-01-01T00:00:00"},
        {"as_of": "soon"},
        {"at_block": -1},
        {"as_of": "2026-01-01T00:00:00Z", "at_block": 1},
        {"asof": "2026-01-01T00:00:00Z"},
    ):
        assert_problem(client.get(url, query_string=query, headers=reader), 400, "invalid_input")
    assert_problem(
        client.get(f"/accounts/{chart.alice}-none/balance", headers=reader), 404, "unknown_account"
    )


def test_statement_pages(client: FlaskClient, api_keys: dict[str, str], chart: Chart) -> None:
    admin = api_keys["admin"]
    for i in range(5):
        client.post(
            "/entries",
            json={"transfers": [{"debit": chart.source, "credit": chart.bob, "amount": str(10 + i)}]},
            headers=bearer(admin, **{"Idempotency-Key": f"{chart.bob}:s{i}"}),
        )
    url = f"/accounts/{chart.bob}/statement"
    reader = bearer(api_keys["auditor"])
    lines: list[dict[str, Any]] = []
    after: int | None = None
    for _ in range(10):
        query: dict[str, Any] = {"limit": 2}
        if after is not None:
            query["after"] = after
        page = client.get(url, query_string=query, headers=reader).get_json()
        lines.extend(page["lines"])
        after = page["next"]
        if after is None:
            break
    assert [line["amount"] for line in lines] == ["10", "11", "12", "13", "14"]
    assert [line["balance_after"] for line in lines] == ["10", "21", "33", "46", "60"]
    assert all(line["side"] == "credit" and line["counterparty"] == chart.source for line in lines)
    window = client.get(
        url, query_string={"from": "2000-01-01T00:00:00Z", "to": "2001-01-01T00:00:00Z"}, headers=reader
    ).get_json()
    assert window["lines"] == [] and window["opening_balance"] == "0"
    assert_problem(client.get(url, query_string={"limit": 1001}, headers=reader), 400, "invalid_input")
    assert_problem(client.get(url, query_string={"from": "2000-01-01"}, headers=reader), 400, "invalid_input")


def test_audit_log_filters_and_pages(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, unique: str
) -> None:
    fin = api_keys["finance"]
    actor = f"apikey:{fin.split('_')[1]}"
    for i in range(3):
        body = {"code": f"{unique}:aud{i}", "asset": chart.asset, "kind": "asset"}
        assert (
            client.post(
                "/accounts", json=body, headers=bearer(fin, **{"X-Request-ID": f"{unique}-{i}"})
            ).status_code
            == 201
        )
    auditor = bearer(api_keys["auditor"])
    one = client.get("/audit", query_string={"target": f"account:{unique}:aud1"}, headers=auditor).get_json()
    assert [(r["actor"], r["role"], r["action"], r["request_id"]) for r in one["items"]] == [
        (actor, "finance", "account.create", f"{unique}-1")
    ]
    assert one["items"][0]["after"]["code"] == f"{unique}:aud1" and one["items"][0]["ip"] == "127.0.0.1"
    mine: list[str] = []
    after: int | None = None
    for _ in range(1000):
        query: dict[str, Any] = {"actor": actor, "action": "account.create", "limit": 2}
        if after is not None:
            query["after"] = after
        page = client.get("/audit", query_string=query, headers=auditor).get_json()
        mine.extend(r["target"] for r in page["items"])
        after = page["next"]
        if after is None:
            break
    assert [t for t in mine if t.startswith(f"account:{unique}:aud")] == [
        f"account:{unique}:aud{i}" for i in range(3)
    ]
    assert_problem(client.get("/audit", query_string={"who": "x"}, headers=auditor), 400, "invalid_input")
