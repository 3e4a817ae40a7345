"""Staff API keys and the role matrix of every route in the OpenAPI document."""

from __future__ import annotations

import hashlib

import flask
import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from admin_api.auth import (
    AUDIT_ROLES,
    MANAGE_ROLES,
    POSTING_ROLES,
    READ_ROLES,
    ROLES,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from ledger.audit import Actor
from ledger.errors import InvalidInput
from tests.api.conftest import Chart, assert_problem, audit_rows, bearer, snapshot

ANONYMOUS = None
EVERYONE = (*ROLES, ANONYMOUS)

# What each route lets through. A route missing here fails the matrix test: new routes must
# be placed in the matrix (and so in the role model) before they pass.
EXPECTED_ROLES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("get", "/healthz"): EVERYONE,
    ("get", "/readyz"): EVERYONE,
    ("get", "/metrics"): EVERYONE,
    ("post", "/assets"): ("admin", "finance"),
    ("get", "/assets"): ("admin", "finance", "auditor", "operator"),
    ("post", "/accounts"): ("admin", "finance"),
    ("get", "/accounts"): ("admin", "finance", "auditor", "operator"),
    ("get", "/accounts/{code}"): ("admin", "finance", "auditor", "operator"),
    ("post", "/accounts/{code}/close"): ("admin", "finance"),
    ("post", "/accounts/{code}/reopen"): ("admin", "finance"),
    ("get", "/accounts/{code}/balance"): ("admin", "finance", "auditor", "operator"),
    ("get", "/accounts/{code}/statement"): ("admin", "finance", "auditor", "operator"),
    ("post", "/entries"): ("admin", "finance", "operator"),
    ("get", "/entries"): ("admin", "finance", "auditor", "operator"),
    ("get", "/entries/{key}"): ("admin", "finance", "auditor", "operator"),
    ("post", "/holds/{pending_key}/post"): ("admin", "finance", "operator"),
    ("post", "/holds/{pending_key}/void"): ("admin", "finance", "operator"),
    ("post", "/holds/expire"): ("admin", "finance", "operator"),
    ("get", "/audit"): ("admin", "auditor"),
    ("get", "/escrows"): ("admin", "finance", "auditor", "operator"),
    ("get", "/escrows/{escrow_id}"): ("admin", "finance", "auditor", "operator"),
    ("get", "/escrows/{escrow_id}/history"): ("admin", "finance", "auditor", "operator"),
    ("get", "/attestors"): ("admin", "finance", "auditor", "operator"),
    ("post", "/escrows"): ("admin", "finance", "operator"),
    ("post", "/escrows/{escrow_id}/dispute"): ("admin", "finance", "operator"),
    ("post", "/escrows/{escrow_id}/releases"): ("admin", "finance"),
    ("post", "/escrows/{escrow_id}/resolution"): ("admin", "finance"),
    ("post", "/resolutions/{resolution_id}/approve"): ("admin", "finance"),
    ("post", "/attestors"): ("admin", "finance"),
    ("post", "/attestors/{attestor_id}/revoke"): ("admin", "finance"),
    # Signed by an attestor's BLS key or a party's wallet: the signature is the authority.
    ("post", "/escrows/{escrow_id}/attestations"): EVERYONE,
    ("post", "/party/escrows"): EVERYONE,
    ("post", "/party/escrows/{escrow_id}/dispute"): EVERYONE,
    ("get", "/points/rules"): ("admin", "finance", "auditor", "operator"),
    ("post", "/points/rules"): ("admin", "finance"),
    ("get", "/points/participants"): ("admin", "finance", "auditor", "operator"),
    ("get", "/points/participants/{participant_id}"): ("admin", "finance", "auditor", "operator"),
    ("put", "/points/participants/{participant_id}"): ("admin", "finance", "operator"),
    ("get", "/points/participants/{participant_id}/balance"): ("admin", "finance", "auditor", "operator"),
    ("get", "/points/participants/{participant_id}/history"): ("admin", "finance", "auditor", "operator"),
    ("post", "/points/events"): ("admin", "operator"),
    ("get", "/points/claims"): ("admin", "finance", "auditor", "operator"),
    ("post", "/points/claims"): ("admin", "finance", "operator"),
    ("get", "/points/claims/{claim_id}"): ("admin", "finance", "auditor", "operator"),
    ("post", "/points/expiry"): ("admin", "finance", "operator"),
    # Signed by the participant's wallet.
    ("post", "/party/points/claims"): EVERYONE,
    ("get", "/staking/pools"): ("admin", "finance", "auditor", "operator"),
    ("get", "/staking/pools/{pool_id}"): ("admin", "finance", "auditor", "operator"),
    ("post", "/staking/pools"): ("admin", "finance"),
    ("patch", "/staking/pools/{pool_id}"): ("admin", "finance"),
    ("post", "/staking/pools/{pool_id}/fund"): ("admin", "finance"),
    ("get", "/staking/liabilities"): ("admin", "finance", "auditor"),
    # A public address's rewards; a claim signed by the staker's wallet.
    ("get", "/stakers/{address}/rewards"): EVERYONE,
    ("post", "/stakers/{address}/claims"): EVERYONE,
    ("post", "/reconciliation/runs"): ("admin", "finance"),
    ("get", "/reconciliation/runs"): ("admin", "finance", "auditor"),
    ("get", "/reconciliation/runs/{run_id}"): ("admin", "finance", "auditor"),
    ("get", "/reconciliation/reserves"): ("admin", "finance", "auditor"),
    ("get", "/exceptions"): ("admin", "finance", "auditor", "operator"),
    ("get", "/exceptions/{exception_id}"): ("admin", "finance", "auditor", "operator"),
    ("post", "/exceptions/{exception_id}/assign"): ("admin", "finance"),
    ("post", "/exceptions/{exception_id}/notes"): ("admin", "finance"),
    ("post", "/exceptions/{exception_id}/match"): ("admin", "finance"),
    ("post", "/exceptions/{exception_id}/writeoffs"): ("admin", "finance"),
    ("post", "/writeoffs/{writeoff_id}/approve"): ("admin", "finance"),
    ("post", "/writeoffs/{writeoff_id}/reject"): ("admin", "finance"),
    # Minting into the treasury is the admin's alone; reading a top-up is for every staff role.
    ("post", "/treasury/mints"): ("admin",),
    ("get", "/treasury/mints/{key}"): ("admin", "finance", "auditor", "operator"),
}
# Routes that read the chain: without a deployment record and a node (as here) they answer 503,
# which says the service is not set up, not that the caller may not ask.
NEEDS_CHAIN = {("post", "/reconciliation/runs"), ("get", "/reconciliation/reserves")}
PATH_VALUES = {
    "code": "no-such-account",
    "key": "no-such-entry",
    "pending_key": "no-such-hold",
    "escrow_id": "no-such-escrow",
    "attestor_id": "999999",
    "resolution_id": "999999",
    "participant_id": "no-such-participant",
    "claim_id": "999999",
    "run_id": "999999",
    "pool_id": "999999",
    "address": "0x" + "ab" * 20,
    "exception_id": "999999",
    "writeoff_id": "999999",
}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def test_role_groups_match_the_brief() -> None:
    assert set(READ_ROLES) == {"admin", "finance", "auditor", "operator"}
    assert set(MANAGE_ROLES) == {"admin", "finance"}
    assert set(POSTING_ROLES) == {"admin", "finance", "operator"}
    assert set(AUDIT_ROLES) == {"admin", "auditor"}


def test_role_matrix_over_every_documented_route(client: FlaskClient, api_keys: dict[str, str]) -> None:
    spec = client.get("/openapi.json").get_json()
    operations = {
        (method, path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    }
    assert set(operations) == set(EXPECTED_ROLES), "routes and the expected role matrix differ"
    checked = 0
    for (method, path), op in operations.items():
        allowed = EXPECTED_ROLES[(method, path)]
        secured = ANONYMOUS not in allowed
        assert ("security" in op) == secured, (method, path)
        if secured:
            assert set(op["x-roles"]) == set(allowed), (method, path)
            assert {"401", "403"} <= set(op["responses"]), (method, path)
        url = path.format(**PATH_VALUES)
        for caller in EVERYONE:
            headers = bearer(api_keys[caller]) if caller else {}
            response = client.open(url, method=method.upper(), headers=headers)
            status = response.status_code
            if caller in allowed:
                assert status not in (401, 403), (method, path, caller, status)
                if (method, path) in NEEDS_CHAIN and status == 503:
                    assert_problem(response, 503, "chain_not_deployed")
                else:
                    assert status < 500, (method, path, caller, response.get_data(as_text=True))
            elif caller is ANONYMOUS:
                assert_problem(response, 401, "unauthenticated")
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            else:
                assert_problem(response, 403, "forbidden")
            checked += 1
    assert checked == len(EXPECTED_ROLES) * len(EVERYONE)


def test_openapi_and_docs_are_anonymous(client: FlaskClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_key_format_and_storage(app_engine: sa.Engine) -> None:
    with app_engine.begin() as conn:
        key = create_api_key(conn, "auditor", "storage test")
        _, prefix, secret = key.split("_", 2)
        assert key.startswith("tc_") and len(prefix) == 8 and int(prefix, 16) >= 0
        assert len(secret) == 43  # 32 random bytes, urlsafe base64 without padding
        row = conn.execute(
            sa.text("SELECT secret_hash, role, label, revoked_at FROM api_keys WHERE prefix = :p"),
            {"p": prefix},
        ).one()
    assert bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
    assert secret.encode() not in bytes(row[0])
    assert (row[1], row[2], row[3]) == ("auditor", "storage test", None)
    with app_engine.connect() as conn:
        listed = {k.prefix: k for k in list_api_keys(conn)}
    assert listed[prefix].role == "auditor"


def test_create_key_refuses_unknown_roles_and_audits_with_an_actor(app_engine: sa.Engine) -> None:
    with app_engine.begin() as conn, pytest.raises(InvalidInput):
        create_api_key(conn, "superuser")
    actor = Actor("cli:test", "admin", "req-key-1")
    with app_engine.begin() as conn:
        key = create_api_key(conn, "operator", "night shift", actor=actor)
    prefix = key.split("_")[1]
    rows = audit_rows(app_engine, f"api_key:{prefix}")
    assert [(r["action"], r["actor"], r["request_id"]) for r in rows] == [
        ("api_key.create", "cli:test", "req-key-1")
    ]
    assert rows[0]["after"] == {"role": "operator", "label": "night shift"}


def test_bad_credentials_are_401(
    client: FlaskClient, app_engine: sa.Engine, api_keys: dict[str, str]
) -> None:
    good = api_keys["admin"]
    prefix = good.split("_")[1]
    wrong_secret = f"tc_{prefix}_{'A' * 43}"
    unknown_prefix = f"tc_ffffffff_{good.split('_', 2)[2]}"
    for header in (
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {good}",
        f"Bearer {good}x",
        f"Bearer {good[:-1]}",
        "Bearer tc_xyz_abc",
        f"Bearer {wrong_secret}",
        f"Bearer {unknown_prefix}",
    ):
        headers = {} if header is None else {"Authorization": header}
        response = client.get("/assets", headers=headers)
        assert_problem(response, 401, "unauthenticated")
    assert client.get("/assets", headers={"Authorization": f"bearer {good}"}).status_code == 200


def test_revoked_key_is_401(client: FlaskClient, app_engine: sa.Engine) -> None:
    with app_engine.begin() as conn:
        key = create_api_key(conn, "finance", "to revoke")
    assert client.get("/assets", headers=bearer(key)).status_code == 200
    with app_engine.begin() as conn:
        assert revoke_api_key(conn, key) is True
        assert revoke_api_key(conn, key.split("_")[1]) is False  # already revoked
    body = assert_problem(client.get("/assets", headers=bearer(key)), 401, "unauthenticated")
    assert "revoked" in body["detail"]


def test_wrong_role_is_403_before_the_body_is_read(client: FlaskClient, api_keys: dict[str, str]) -> None:
    # Garbage body, no Idempotency-Key: the role is refused first, whatever was sent.
    response = client.post(
        "/entries", data="{not json", content_type="application/json", headers=bearer(api_keys["auditor"])
    )
    body = assert_problem(response, 403, "forbidden")
    assert "auditor" in body["detail"]


def test_actor_is_bound_to_the_request(app: flask.Flask, api_keys: dict[str, str]) -> None:
    from admin_api.auth import current_actor, require_roles

    @require_roles("operator")
    def whoami() -> dict[str, str]:
        actor = current_actor()
        return {"actor": actor.actor, "role": actor.role, "request_id": actor.request_id, "ip": actor.ip}

    app.add_url_rule("/whoami", "whoami", whoami)
    key = api_keys["operator"]
    response = app.test_client().get("/whoami", headers=bearer(key, **{"X-Request-ID": "who-1"}))
    assert response.get_json() == {
        "actor": f"apikey:{key.split('_')[1]}",
        "role": "operator",
        "request_id": "who-1",
        "ip": "127.0.0.1",
    }


def test_refused_callers_write_nothing(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    entry = {"transfers": [{"debit": chart.source, "credit": chart.alice, "amount": "5"}]}
    account = {"code": f"{chart.alice}-2", "asset": chart.asset, "kind": "asset"}
    before = snapshot(app_engine, chart.codes())
    attempts = [
        ("/entries", entry, {"Idempotency-Key": f"{chart.alice}:r"}, None, 401),
        ("/entries", entry, {"Idempotency-Key": f"{chart.alice}:r"}, "auditor", 403),
        ("/accounts", account, {}, "operator", 403),
        ("/accounts", account, {}, "auditor", 403),
        (f"/accounts/{chart.alice}/close", {}, {}, "operator", 403),
        ("/holds/expire", {}, {}, "auditor", 403),
    ]
    for url, body, extra, role, status in attempts:
        headers = bearer(api_keys[role], **extra) if role else extra
        response = client.post(url, json=body, headers=headers)
        assert response.status_code == status, (url, role)
    assert snapshot(app_engine, chart.codes()) == before
