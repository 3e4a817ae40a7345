"""The points routes of the admin API on real PostgreSQL (a deployment record with made-up
addresses; the chain side of claims is in tests/chain_node/test_points_claims.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account

from admin_api.auth import key_prefix
from contracts.deployment import Deployment
from ledger import db
from ledger.escrow import party
from ledger.points import claims
from tests.api.conftest import RouteClient, deployed_app, names
from tests.conftest import APP_ROLE, Databases

DEPLOYMENT = Deployment(
    chain_id=31337,
    start_block=0,
    token="0x" + "70" * 20,
    escrow="0x" + "e5" * 20,
    vault="0x" + "7a" * 20,
    treasury="0x" + "73" * 20,
    fee_wallet="0x" + "fe" * 20,
)
WALLET_KEY = "0x" + "a7" * 32
WALLET = Account.from_key(WALLET_KEY).address.lower()
STRANGER_KEY = "0x" + "57" * 32
_STATE_SQL = (
    "SELECT (SELECT count(*) FROM points_participants), (SELECT count(*) FROM points_rules),"
    " (SELECT count(*) FROM points_events), (SELECT count(*) FROM points_lots),"
    " (SELECT count(*) FROM points_daily_totals), (SELECT count(*) FROM points_claims),"
    " (SELECT count(*) FROM points_expiries), (SELECT count(*) FROM party_nonces),"
    " (SELECT count(*) FROM chain_outbox), (SELECT count(*) FROM audit_log),"
    " (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM ledger_accounts),"
    " (SELECT COALESCE(sum(debits_pending + credits_posted), 0) FROM ledger_accounts)"
)


@dataclass
class Api(RouteClient):
    DEFAULT_ROLE = "admin"
    STATE_SQL = {"counts": _STATE_SQL}

    def audit(self, target: str) -> list[tuple[str, str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT actor, role, action FROM audit_log WHERE target = :t ORDER BY id"),
                {"t": target},
            )
            return [tuple(r) for r in rows]


@pytest.fixture(scope="module")
def api(databases: Databases, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    work: Path = tmp_path_factory.mktemp("points-api")
    roles = ("admin", "finance", "auditor", "operator")
    try:
        with deployed_app(engine, work, DEPLOYMENT, "points", roles, TRACE_POINTS_PER_TRACE="100") as (
            client,
            keys,
        ):
            yield Api(client, engine, keys)
    finally:
        engine.dispose()
        databases.drop(name)


@dataclass
class World:
    scan: str  # event type: 10 points, gold x2, cap 50 a day
    since: str  # when its rule took effect
    gold: str
    silver: str


@pytest.fixture
def world(api: Api, unique: str) -> World:
    rule = api.ok(
        "POST",
        "/points/rules",
        {
            "event_type": f"{unique}.scan",
            "points": "10",
            "tier_multipliers_bps": {"gold": 20_000},
            "daily_cap": "50",
        },
        role="finance",
        expect=201,
    )
    api.ok(
        "PUT",
        f"/points/participants/{unique}-gold",
        {"tier": "gold", "wallet": WALLET},
        role="operator",
        expect=201,
    )
    api.ok("PUT", f"/points/participants/{unique}-silver", {"tier": "silver"}, role="operator", expect=201)
    return World(f"{unique}.scan", rule["effective_at"], f"{unique}-gold", f"{unique}-silver")


def _events(world: World, ids: range, participant: str, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"source": "dock", "event_id": f"{participant}-{i}", "participant": participant, "type": world.scan,
         "occurred_at": world.since, **extra}
        for i in ids
    ]  # fmt: skip


def test_events_accrue_once_with_reasons_balances_and_audit(api: Api, world: World) -> None:
    batch = _events(world, range(2), world.gold) + _events(world, range(3), world.silver)
    report = api.ok("POST", "/points/events", {"events": batch}, role="operator")
    assert (report["created"], report["points"], report["participants"]) == (5, "70", 2)
    again = api.ok("POST", "/points/events", {"events": batch}, role="operator")
    assert (again["created"], again["exists"], again["points"]) == (0, 5, "0")
    assert {s["status"] for s in again["skipped"]} == {"exists"}
    balance = api.ok("GET", f"/points/participants/{world.gold}/balance", role="auditor")
    assert (balance["posted"], balance["available"], balance["held"], balance["claimable"]) == (
        "40",
        "40",
        "0",
        "40",
    )
    history = api.ok("GET", f"/points/participants/{world.gold}/history?limit=1", role="auditor")
    assert len(history["items"]) == 1 and history["next"] is not None
    assert history["items"][0]["reason"].startswith(f"{world.scan} v1: 10 points x 200% (gold) = 20")
    rest = api.ok("GET", f"/points/participants/{world.gold}/history?after={history['next']}", role="auditor")
    assert len(rest["items"]) == 1 and rest["next"] is None
    assert api.audit(f"points:batch:{report['batch_id']}") == [
        (f"apikey:{key_prefix(api.keys['operator'])}", "operator", "points.ingest")
    ]


def test_the_daily_cap_and_a_conflicting_event(api: Api, world: World) -> None:
    report = api.ok(
        "POST", "/points/events", {"events": _events(world, range(4), world.gold)}, role="operator"
    )
    assert report["points"] == "50"  # 4 x 20 capped at 50
    changed = _events(world, range(1), world.gold, details={"dock": "B"})
    conflict = api.ok("POST", "/points/events", {"events": changed}, role="operator")
    assert (conflict["conflicts"], conflict["skipped"][0]["status"]) == (1, "conflict")


def test_a_rule_change_is_a_new_version_never_in_the_past(api: Api, world: World) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    api.refused(
        400,
        "invalid_input",
        "POST",
        "/points/rules",
        {"event_type": world.scan, "points": "1", "effective_at": past},
    )
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    second = api.ok(
        "POST", "/points/rules", {"event_type": world.scan, "points": "99", "effective_at": later}, expect=201
    )
    assert second["version"] == 2
    api.refused(
        409,
        "rule_conflict",
        "POST",
        "/points/rules",
        {"event_type": world.scan, "points": "1", "effective_at": later},
    )
    listed = api.ok("GET", f"/points/rules?event_type={world.scan}", role="operator")
    assert [r["version"] for r in listed["items"]] == [1, 2]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"event_type": "x.y", "points": 10}, "points"),
        ({"event_type": "x.y", "points": "-1"}, "points"),
        ({"event_type": "x.y", "points": str(2**256)}, "points"),
        ({"event_type": "X Y", "points": "1"}, "event type"),
        ({"event_type": "x.y", "points": "1", "tier_multipliers_bps": {"Gold": 100}}, "tier"),
        ({"event_type": "x.y", "points": "1", "tier_multipliers_bps": {"gold": 1.5}}, "tier_multipliers_bps"),
        ({"event_type": "x.y", "points": "1", "daily_cap": "1.5"}, "daily_cap"),
        ({"event_type": "x.y", "points": "1", "expires_after_s": 0}, "expires_after_s"),
        ({"event_type": "x.y", "points": "1", "effective_at": "2030-01-01T00:00:00"}, "effective_at"),
        ({"event_type": "x.y", "points": "1", "extra": True}, "extra"),
        ({"points": "1"}, "event_type"),
    ],
)
def test_a_malformed_rule_is_400_and_writes_nothing(api: Api, body: dict[str, Any], named: str) -> None:
    problem = api.refused(400, "invalid_input", "POST", "/points/rules", body)
    assert names(problem, named), problem


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"events": "many"}, "Not a valid list"),
        ({"events": []}, "1 to 10000 events"),
        ({"events": [{"source": "s"}]}, "events[1]: missing"),
        ({"events": [{"source": "s", "event_id": "e", "participant": "p", "type": "t",
                      "occurred_at": "now"}]}, "events[1].occurred_at"),
        ({"events": [{"source": "s", "event_id": "e", "participant": "p", "type": "t",
                      "occurred_at": "2030-01-01T00:00:00Z", "details": {"n": 1.5}}]}, "floating-point"),
        ({"evnts": []}, "evnts"),
    ],
)  # fmt: skip
def test_a_malformed_batch_is_400_and_writes_nothing(
    api: Api, world: World, body: dict[str, Any], named: str
) -> None:
    if isinstance(body.get("events"), list) and body["events"]:
        body = {"events": _events(world, range(1), world.gold) + body["events"]}
    problem = api.refused(400, "invalid_input", "POST", "/points/events", body, role="operator")
    assert names(problem, named), problem


def test_participants_bad_input_and_unknown_ids(api: Api, world: World) -> None:
    api.refused(
        400, "invalid_input", "PUT", "/points/participants/has space", {"tier": "gold"}, role="operator"
    )
    api.refused(
        400, "invalid_input", "PUT", f"/points/participants/{world.gold}", {"tier": "GOLD"}, role="operator"
    )
    api.refused(
        400, "invalid_input", "PUT", f"/points/participants/{world.gold}", {"tier": "gold", "wallet": "0x12"}
    )
    api.refused(
        404, "participant_not_found", "GET", "/points/participants/nobody-here/balance", role="auditor"
    )
    api.refused(
        404, "participant_not_found", "GET", "/points/participants/nobody-here/history", role="auditor"
    )
    changed = api.ok("PUT", f"/points/participants/{world.silver}", {"tier": "gold"}, role="operator")
    assert changed["tier"] == "gold"
    assert [a[2] for a in api.audit(f"points:participant:{world.silver}")] == ["points.participant"] * 2


def test_a_staff_claim_holds_and_queues_the_mint(api: Api, world: World) -> None:
    api.ok("POST", "/points/events", {"events": _events(world, range(2), world.gold)}, role="operator")
    body = {"participant": world.gold, "points": "25", "key": f"{world.gold}-c1"}
    claim = api.ok("POST", "/points/claims", body, role="finance", expect=201)
    assert (claim["status"], claim["points"], claim["trace_amount"], claim["wallet"]) == (
        "pending", "25", str(25 * 10**16), WALLET,
    )  # fmt: skip
    assert api.ok("POST", "/points/claims", body, role="operator")["id"] == claim["id"]
    api.refused(
        409, "idempotency_conflict", "POST", "/points/claims", {**body, "points": "26"}, role="finance"
    )
    api.refused(422, "insufficient_points", "POST", "/points/claims", {**body, "key": "k2", "points": "16"})
    api.refused(
        422, "no_wallet", "POST", "/points/claims", {"participant": world.silver, "points": "1", "key": "k3"}
    )
    api.refused(
        404,
        "participant_not_found",
        "POST",
        "/points/claims",
        {"participant": "nobody", "points": "1", "key": "k"},
    )
    for points in ("0", "-1", str(2**256), 5, "1e3"):
        api.refused(400, "invalid_input", "POST", "/points/claims", {**body, "key": "k4", "points": points})
    api.refused(403, "forbidden", "POST", "/points/claims", {**body, "key": "k5"}, role="auditor")
    assert (
        api.ok("GET", f"/points/claims/{claim['id']}", role="auditor")["outbox_key"]
        == f"points:claim:staff:{world.gold}-c1"
    )
    listed = api.ok("GET", f"/points/claims?participant={world.gold}", role="auditor")
    assert [c["id"] for c in listed["items"]] == [claim["id"]]
    api.refused(404, "claim_not_found", "GET", "/points/claims/999999", role="auditor")
    balance = api.ok("GET", f"/points/participants/{world.gold}/balance", role="auditor")
    assert (balance["posted"], balance["held"], balance["available"]) == ("40", "25", "15")
    assert len(api.audit(f"points:claim:{claim['id']}")) == 1


def _signed(
    world: World, points: int, nonce: int, key: str = WALLET_KEY, changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    request = claims.ClaimPointsRequest(world.gold, points, nonce, int(time.time()) + 600)
    signature = party.sign(request, key, DEPLOYMENT.chain_id, DEPLOYMENT.token)  # type: ignore[arg-type]
    raw = {
        "participant": world.gold,
        "points": str(points),
        "nonce": nonce,
        "expiry": request.expiry,
        **(changes or {}),
    }
    return {"request": raw, "signature": signature}


def test_a_participant_claims_with_its_wallet_signature(api: Api, world: World) -> None:
    api.ok("POST", "/points/events", {"events": _events(world, range(2), world.gold)}, role="operator")
    body = _signed(world, 10, 1)
    claim = api.ok("POST", "/party/points/claims", body, role=None, expect=201)
    assert claim["requested_by"] == f"party:{WALLET}" and claim["trace_amount"] == str(10**17)
    assert api.ok("POST", "/party/points/claims", body, role=None)["id"] == claim["id"]
    api.refused(409, "nonce_replayed", "POST", "/party/points/claims", _signed(world, 11, 1), role=None)
    api.refused(
        400, "invalid_input", "POST", "/party/points/claims", _signed(world, 10, 2, STRANGER_KEY), role=None
    )
    tampered = _signed(world, 10, 3, changes={"points": "30"})
    api.refused(400, "invalid_input", "POST", "/party/points/claims", tampered, role=None)
    api.refused(
        400,
        "invalid_input",
        "POST",
        "/party/points/claims",
        _signed(world, 10, 4, changes={"extra": 1}),
        role=None,
    )
    api.refused(
        400,
        "invalid_input",
        "POST",
        "/party/points/claims",
        {**_signed(world, 10, 5), "signature": "0x00"},
        role=None,
    )
    api.refused(422, "insufficient_points", "POST", "/party/points/claims", _signed(world, 31, 6), role=None)


def test_the_expiry_sweep_route(api: Api, unique: str) -> None:
    rule = api.ok(
        "POST",
        "/points/rules",
        {"event_type": f"{unique}.brief", "points": "3", "expires_after_s": 1},
        expect=201,
    )
    api.ok("PUT", f"/points/participants/{unique}-p", {"tier": "gold"}, role="operator", expect=201)
    event = {"source": "s", "event_id": f"{unique}-1", "participant": f"{unique}-p"}
    event |= {"type": f"{unique}.brief", "occurred_at": rule["effective_at"]}
    api.ok("POST", "/points/events", {"events": [event]}, role="operator")
    time.sleep(2.1)  # the lot expires at the end of the second after the event's expiry
    swept = api.ok("POST", "/points/expiry", role="finance")
    assert int(swept["points"]) >= 3
    balance = api.ok("GET", f"/points/participants/{unique}-p/balance", role="auditor")
    assert (balance["posted"], balance["available"]) == ("0", "0")
    api.refused(403, "forbidden", "POST", "/points/expiry", role="auditor")


def test_a_batch_of_ten_thousand_events_fits_one_request(api: Api, world: World) -> None:
    events = _events(world, range(10_000), world.silver)
    report = api.ok("POST", "/points/events", {"events": events}, role="operator")
    assert (report["created"], report["points"]) == (10_000, "50")  # 10 points each, capped at 50 a day
    too_many = _events(world, range(10_001), world.gold)
    api.refused(400, "invalid_input", "POST", "/points/events", {"events": too_many}, role="operator")
