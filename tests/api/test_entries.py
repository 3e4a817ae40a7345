"""Entries and holds through the API: booking, idempotency, reading, and every kind of bad input."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from tests.api.conftest import Chart, assert_problem, audit_rows, bearer, snapshot

UINT256 = 2**256


def post_entry(client: FlaskClient, key: str | None, body: Any, role_key: str, **extra: str) -> Any:
    headers = bearer(role_key, **extra)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/entries", json=body, headers=headers)


def transfer(debit: str, credit: str, amount: Any = "100", **extra: Any) -> dict[str, Any]:
    return {"debit": debit, "credit": credit, "amount": amount, **extra}


@pytest.fixture
def funded(client: FlaskClient, api_keys: dict[str, str], chart: Chart) -> Chart:
    """The chart with 1000 base units on alice."""
    response = post_entry(
        client,
        f"{chart.alice}:fund",
        {"transfers": [transfer(chart.source, chart.alice, "1000")]},
        api_keys["admin"],
    )
    assert response.status_code == 201
    return chart


def test_post_entry_then_repeat_then_conflict(
    client: FlaskClient, api_keys: dict[str, str], funded: Chart, app_engine: sa.Engine
) -> None:
    c = funded
    key = f"{c.alice}:pay-1"
    body = {
        "kind": "payment",
        "transfers": [transfer(c.alice, c.bob, "250", asset=c.asset)],
        "metadata": {"invoice": "INV-1", "lines": [1, 2]},
        "effective_at": "2026-01-02T03:04:05+00:00",
    }
    created = post_entry(client, key, body, api_keys["finance"], **{"X-Request-ID": "pay-req-1"})
    assert created.status_code == 201, created.get_data(as_text=True)
    entry = created.get_json()
    assert entry["key"] == key and entry["kind"] == "payment"
    assert entry["metadata"] == {"invoice": "INV-1", "lines": [1, 2]}
    assert entry["effective_at"].startswith("2026-01-02T03:04:05")
    assert entry["chain"] is None and entry["reverses"] is None
    [t] = entry["transfers"]
    assert (t["kind"], t["debit"], t["credit"], t["asset"], t["amount"]) == (
        "posted",
        c.alice,
        c.bob,
        c.asset,
        "250",
    )

    before_repeat = snapshot(app_engine, c.codes())
    repeat = post_entry(client, key, body, api_keys["operator"])
    assert repeat.status_code == 200
    assert repeat.get_json() == entry
    assert snapshot(app_engine, c.codes()) == before_repeat

    changed = {**body, "transfers": [transfer(c.alice, c.bob, "251")]}
    conflict = post_entry(client, key, changed, api_keys["finance"])
    assert_problem(conflict, 409, "idempotency_conflict")
    assert snapshot(app_engine, c.codes()) == before_repeat

    balances = snapshot(app_engine, c.codes())["balances"]
    assert balances[c.alice][:2] == (250, 1000)
    assert balances[c.bob][:2] == (0, 250)

    # One audit row: for the creation, none for the repeat or the conflict.
    rows = audit_rows(app_engine, f"entry:{key}")
    assert len(rows) == 1
    row = rows[0]
    assert row["actor"] == f"apikey:{api_keys['finance'].split('_')[1]}"
    assert (row["role"], row["action"], row["request_id"]) == ("finance", "entry.payment", "pay-req-1")
    assert row["after"]["status"] == "created" and row["after"]["entry_id"] == entry["id"]


def test_get_entry_and_list_entries(client: FlaskClient, api_keys: dict[str, str], funded: Chart) -> None:
    c = funded
    reader = api_keys["auditor"]
    keys = [f"{c.alice}:list-{i}" for i in range(5)]
    for i, key in enumerate(keys):
        kind = "even" if i % 2 == 0 else "odd"
        body = {"kind": kind, "transfers": [transfer(c.alice, c.bob, str(i + 1))]}
        assert post_entry(client, key, body, api_keys["operator"]).status_code == 201

    got = client.get(f"/entries/{keys[2]}", headers=bearer(reader))
    assert got.status_code == 200
    assert got.get_json()["transfers"][0]["amount"] == "3"
    assert_problem(client.get(f"/entries/{c.alice}:never", headers=bearer(reader)), 404, "unknown_entry")

    seen: list[str] = []
    after: int | None = None
    for _ in range(10):
        query: dict[str, Any] = {"account": c.bob, "limit": 2}
        if after is not None:
            query["after"] = after
        page = client.get("/entries", query_string=query, headers=bearer(reader)).get_json()
        seen.extend(e["key"] for e in page["items"])
        assert len(page["items"]) <= 2
        after = page["next"]
        if after is None:
            break
    assert seen == keys

    odd = client.get("/entries", query_string={"account": c.bob, "kind": "odd"}, headers=bearer(reader))
    assert [e["key"] for e in odd.get_json()["items"]] == [keys[1], keys[3]]
    future = client.get(
        "/entries", query_string={"account": c.bob, "since": "2999-01-01T00:00:00Z"}, headers=bearer(reader)
    )
    assert future.get_json() == {"items": [], "next": None}
    past = client.get(
        "/entries", query_string={"account": c.bob, "until": "2000-01-01T00:00:00Z"}, headers=bearer(reader)
    )
    assert past.get_json()["items"] == []
    assert_problem(
        client.get("/entries", query_string={"account": f"{c.bob}-none"}, headers=bearer(reader)),
        404,
        "unknown_account",
    )


def test_entry_with_chain_reference(client: FlaskClient, api_keys: dict[str, str], chart: Chart) -> None:
    chain = {
        "chain_id": 31337,
        "tx_hash": "0x" + "ab" * 32,
        "log_index": 3,
        "block_number": 120,
        "block_hash": "0x" + "cd" * 32,
    }
    body = {"kind": "deposit", "transfers": [transfer(chart.source, chart.alice, "7")], "chain": chain}
    response = post_entry(client, f"{chart.alice}:chain", body, api_keys["operator"])
    assert response.status_code == 201
    assert response.get_json()["chain"] == chain
    at_block = client.get(
        f"/accounts/{chart.alice}/balance",
        query_string={"at_block": 120},
        headers=bearer(api_keys["auditor"]),
    )
    assert at_block.get_json()["balance"] == "7"
    before = client.get(
        f"/accounts/{chart.alice}/balance",
        query_string={"at_block": 119},
        headers=bearer(api_keys["auditor"]),
    )
    assert before.get_json()["balance"] == "0"


def test_hold_post_partially_then_twice(
    client: FlaskClient, api_keys: dict[str, str], funded: Chart, app_engine: sa.Engine
) -> None:
    c = funded
    op = api_keys["operator"]
    hold_key = f"{c.alice}:hold"
    hold = post_entry(client, hold_key, {"transfers": [transfer(c.alice, c.bob, "300", pending=True)]}, op)
    assert hold.status_code == 201
    assert hold.get_json()["transfers"][0]["kind"] == "pending"
    assert snapshot(app_engine, [c.alice])["balances"][c.alice][:4] == (0, 1000, 300, 0)

    # Posting more than held, or a hold that does not exist: refused, nothing written.
    before = snapshot(app_engine, c.codes())
    too_much = client.post(
        f"/holds/{hold_key}/post",
        json={"amount": "301"},
        headers=bearer(op, **{"Idempotency-Key": f"{hold_key}:p0"}),
    )
    assert_problem(too_much, 422, "exceeds_pending_amount")
    missing = client.post(
        f"/holds/{hold_key}-nope/post", headers=bearer(op, **{"Idempotency-Key": f"{hold_key}:p00"})
    )
    assert_problem(missing, 422, "unknown_pending")
    assert snapshot(app_engine, c.codes()) == before

    posted = client.post(
        f"/holds/{hold_key}/post",
        json={"amount": "120"},
        headers=bearer(op, **{"Idempotency-Key": f"{hold_key}:p1"}),
    )
    assert posted.status_code == 201
    [t] = posted.get_json()["transfers"]
    assert (t["kind"], t["amount"], t["pending_key"]) == ("post_pending", "120", hold_key)
    balances = snapshot(app_engine, [c.alice, c.bob])["balances"]
    assert balances[c.alice][:4] == (120, 1000, 0, 0)
    assert balances[c.bob][:4] == (0, 120, 0, 0)

    # The same request again is an idempotent repeat; a second post is refused.
    again = client.post(
        f"/holds/{hold_key}/post",
        json={"amount": "120"},
        headers=bearer(op, **{"Idempotency-Key": f"{hold_key}:p1"}),
    )
    assert again.status_code == 200 and again.get_json()["id"] == posted.get_json()["id"]
    before = snapshot(app_engine, c.codes())
    twice = client.post(
        f"/holds/{hold_key}/post", headers=bearer(op, **{"Idempotency-Key": f"{hold_key}:p2"})
    )
    assert_problem(twice, 422, "pending_already_resolved")
    void_after = client.post(
        f"/holds/{hold_key}/void", headers=bearer(op, **{"Idempotency-Key": f"{hold_key}:v"})
    )
    assert_problem(void_after, 422, "pending_already_resolved")
    assert snapshot(app_engine, c.codes()) == before
    assert [r["action"] for r in audit_rows(app_engine, f"entry:{hold_key}:p1")] == ["entry.post_pending"]
    assert audit_rows(app_engine, f"entry:{hold_key}:p2") == []


def test_hold_void(
    client: FlaskClient, api_keys: dict[str, str], funded: Chart, app_engine: sa.Engine
) -> None:
    c = funded
    fin = api_keys["finance"]
    hold_key = f"{c.alice}:vhold"
    assert (
        post_entry(
            client, hold_key, {"transfers": [transfer(c.alice, c.bob, "40", pending=True)]}, fin
        ).status_code
        == 201
    )
    voided = client.post(
        f"/holds/{hold_key}/void",
        json={"metadata": {"why": "cancelled"}},
        headers=bearer(fin, **{"Idempotency-Key": f"{hold_key}:v"}),
    )
    assert voided.status_code == 201
    assert voided.get_json()["kind"] == "void_pending"
    assert voided.get_json()["metadata"] == {"why": "cancelled"}
    assert snapshot(app_engine, [c.alice])["balances"][c.alice][:4] == (0, 1000, 0, 0)
    assert [r["action"] for r in audit_rows(app_engine, f"entry:{hold_key}:v")] == ["entry.void_pending"]


def test_expiry_sweep(
    client: FlaskClient, api_keys: dict[str, str], funded: Chart, app_engine: sa.Engine
) -> None:
    c = funded
    op = api_keys["operator"]
    hold_key = f"{c.alice}:timed"
    body = {"transfers": [transfer(c.alice, c.bob, "10", pending=True, timeout_s=1)]}
    created = post_entry(client, hold_key, body, op)
    assert created.status_code == 201
    assert created.get_json()["transfers"][0]["timeout_at"] is not None
    time.sleep(1.2)
    late = client.post(
        f"/holds/{hold_key}/post", headers=bearer(op, **{"Idempotency-Key": f"{hold_key}:late"})
    )
    assert_problem(late, 422, "pending_expired")
    swept = client.post("/holds/expire", json={}, headers=bearer(op, **{"X-Request-ID": "sweep-1"}))
    assert swept.status_code == 200
    counts = swept.get_json()
    assert counts["created"] >= 1 and counts["rejected"] == 0
    assert snapshot(app_engine, [c.alice])["balances"][c.alice][:4] == (0, 1000, 0, 0)
    with app_engine.connect() as conn:
        expired_by = conn.execute(
            sa.text(
                "SELECT r.idempotency_key FROM ledger_entries h JOIN ledger_transfers p ON p.entry_id = h.id"
                " JOIN ledger_transfers t ON t.pending_id = p.id JOIN ledger_entries r ON r.id = t.entry_id"
                " WHERE h.idempotency_key = :k"
            ),
            {"k": hold_key},
        ).scalar_one()
    # The expiry entry is audited in its own transaction, under the operator who ran the sweep.
    sweeps = audit_rows(app_engine, f"entry:{expired_by}")
    assert len(sweeps) == 1
    assert sweeps[0]["action"] == "entry.expire" and sweeps[0]["role"] == "operator"
    assert sweeps[0]["request_id"] == "sweep-1" and sweeps[0]["after"]["status"] == "created"
    # Nothing left to expire: the next sweep moves nothing and audits nothing.
    audit_count = snapshot(app_engine)["counts"][4]
    assert client.post("/holds/expire", headers=bearer(op)).get_json()["created"] == 0
    assert snapshot(app_engine)["counts"][4] == audit_count


def test_missing_idempotency_key(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    before = snapshot(app_engine, chart.codes())
    response = post_entry(
        client, None, {"transfers": [transfer(chart.source, chart.alice)]}, api_keys["admin"]
    )
    body = assert_problem(response, 400, "invalid_input")
    assert "Idempotency-Key" in body["errors"]["headers"]
    hold = client.post("/holds/anything/void", headers=bearer(api_keys["admin"]))
    assert "Idempotency-Key" in assert_problem(hold, 400, "invalid_input")["errors"]["headers"]
    assert snapshot(app_engine, chart.codes()) == before


BAD_AMOUNTS = ["0", "-5", "1.5", str(UINT256), "1e3", " 5", "", "0x10", "9" * 79]


@pytest.mark.parametrize("amount", [*BAD_AMOUNTS, 5, 5.0, None, True, [], {}])
def test_bad_amounts_are_400_and_write_nothing(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine, amount: Any
) -> None:
    before = snapshot(app_engine, chart.codes())
    body = {"transfers": [transfer(chart.source, chart.alice, amount)]}
    response = post_entry(client, f"{chart.alice}:bad-amount", body, api_keys["admin"])
    problem = assert_problem(response, 400, "invalid_input")
    assert "amount" in problem["errors"]["json"]["transfers"]["0"]
    assert snapshot(app_engine, chart.codes()) == before


def test_largest_amount_is_accepted(client: FlaskClient, api_keys: dict[str, str], chart: Chart) -> None:
    body = {"transfers": [transfer(chart.source, chart.bob, str(UINT256 - 1))]}
    response = post_entry(client, f"{chart.bob}:max", body, api_keys["admin"])
    assert response.status_code == 201
    assert response.get_json()["transfers"][0]["amount"] == str(UINT256 - 1)


def _bad_bodies(c: Chart) -> list[tuple[str, Any, int, str]]:
    """(name, JSON body, status, code) of requests the API must refuse without writing."""
    ok = transfer(c.source, c.alice, "5")
    return [
        ("self transfer", {"transfers": [transfer(c.alice, c.alice, "5")]}, 400, "invalid_input"),
        ("unknown account", {"transfers": [transfer(c.source, c.alice + "-x", "5")]}, 422, "unknown_account"),
        ("asset mismatch", {"transfers": [transfer(c.source, c.foreign, "5")]}, 422, "asset_mismatch"),
        ("wrong asset named", {"transfers": [{**ok, "asset": c.other_asset}]}, 422, "asset_mismatch"),
        ("unknown asset named", {"transfers": [{**ok, "asset": "NOSUCH"}]}, 422, "unknown_asset"),
        ("exceeds credits", {"transfers": [transfer(c.bob, c.alice, "5")]}, 422, "exceeds_credits"),
        ("unknown top-level field", {"transfers": [ok], "memo": "x"}, 400, "invalid_input"),
        ("unknown transfer field", {"transfers": [{**ok, "fee": "1"}]}, 400, "invalid_input"),
        ("no transfers", {"transfers": []}, 400, "invalid_input"),
        ("transfers missing", {"kind": "transfer"}, 400, "invalid_input"),
        ("too many transfers", {"transfers": [ok] * 65}, 400, "invalid_input"),
        ("two legs with a hold", {"transfers": [{**ok, "pending": True}, ok]}, 400, "invalid_input"),
        ("pending as a number", {"transfers": [{**ok, "pending": 1}]}, 400, "invalid_input"),
        ("timeout without hold", {"transfers": [{**ok, "timeout_s": 5}]}, 400, "invalid_input"),
        (
            "timeout as a string",
            {"transfers": [{**ok, "pending": True, "timeout_s": "5"}]},
            400,
            "invalid_input",
        ),
        ("bad kind", {"kind": "Not A Kind", "transfers": [ok]}, 400, "invalid_input"),
        (
            "naive effective_at",
            {"transfers": [ok], "effective_at": "2026-01-01T00:00:00"},
            400,
            "invalid_input",
        ),
        ("float in metadata", {"transfers": [ok], "metadata": {"rate": 1.5}}, 400, "invalid_input"),
        ("metadata not an object", {"transfers": [ok], "metadata": [1]}, 400, "invalid_input"),
        ("chain incomplete", {"transfers": [ok], "chain": {"chain_id": 1}}, 400, "invalid_input"),
        (
            "chain hash malformed",
            {
                "transfers": [ok],
                "chain": {
                    "chain_id": 1,
                    "tx_hash": "0x12",
                    "log_index": 0,
                    "block_number": 1,
                    "block_hash": "0x34",
                },
            },
            400,
            "invalid_input",
        ),
        ("body is a list", [ok], 400, "invalid_input"),
        ("body is null", None, 400, "invalid_input"),
    ]


def test_bad_bodies_are_refused_and_write_nothing(
    client: FlaskClient, api_keys: dict[str, str], funded: Chart, app_engine: sa.Engine
) -> None:
    c = funded
    for i, (name, body, status, code) in enumerate(_bad_bodies(c)):
        before = snapshot(app_engine, c.codes())
        key = f"{c.alice}:bad-{i}"
        if body is None:
            response = client.post(
                "/entries",
                data="null",
                content_type="application/json",
                headers=bearer(api_keys["admin"], **{"Idempotency-Key": key}),
            )
        else:
            response = post_entry(client, key, body, api_keys["admin"])
        problem = assert_problem(response, status, code)
        if status == 400:
            assert problem["errors"]["json"], name
        assert snapshot(app_engine, c.codes()) == before, name
        assert audit_rows(app_engine, f"entry:{key}") == [], name


def test_closed_account_refuses_entries(
    client: FlaskClient, api_keys: dict[str, str], funded: Chart, app_engine: sa.Engine
) -> None:
    c = funded
    admin = api_keys["admin"]
    assert client.post(f"/accounts/{c.bob}/close", headers=bearer(admin)).status_code == 200
    before = snapshot(app_engine, c.codes())
    response = post_entry(
        client, f"{c.alice}:to-closed", {"transfers": [transfer(c.alice, c.bob, "5")]}, admin
    )
    assert_problem(response, 422, "account_closed")
    assert snapshot(app_engine, c.codes()) == before


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("{bad json", "application/json"),
        ('{"transfers": [}', "application/json"),
        (b"\xff\xfe", "application/json"),
        ('{"a": NaN}', "application/json"),
        ('{"a": ' + "1" * 5000 + "}", "application/json"),
        ("[" * 100_000, "application/json"),
        ("transfers=1", "application/x-www-form-urlencoded"),
        ("hello", "text/plain"),
    ],
)
def test_bodies_that_are_not_json_are_400(
    client: FlaskClient,
    api_keys: dict[str, str],
    chart: Chart,
    app_engine: sa.Engine,
    data: str | bytes,
    content_type: str,
) -> None:
    before = snapshot(app_engine, chart.codes())
    for url in ("/entries", "/holds/some-hold/void", f"/accounts/{chart.alice}/close"):
        response = client.post(
            url,
            data=data,
            content_type=content_type,
            headers=bearer(api_keys["admin"], **{"Idempotency-Key": f"{chart.alice}:nj"}),
        )
        assert_problem(response, 400, "invalid_input")
    assert snapshot(app_engine, chart.codes()) == before


def test_unknown_query_parameters_are_refused(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart
) -> None:
    response = client.get(
        "/entries", query_string={"acount": chart.alice}, headers=bearer(api_keys["auditor"])
    )
    problem = assert_problem(response, 400, "invalid_input")
    assert "acount" in problem["errors"]["query"]
    for query in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"after": -1}, {"since": "yesterday"}):
        assert_problem(
            client.get("/entries", query_string=query, headers=bearer(api_keys["auditor"])),
            400,
            "invalid_input",
        )


def test_keys_reserved_for_the_ledger_are_refused(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    # The expiry sweep books under sys:expire:<id>; a caller taking such a key first would
    # keep that hold from ever expiring.
    before = snapshot(app_engine)
    response = post_entry(
        client, "sys:expire:1", {"transfers": [transfer(chart.alice, chart.bob, "1")]}, api_keys["operator"]
    )
    assert_problem(response, 400, "invalid_input")
    assert snapshot(app_engine) == before
