"""The escrow routes of the admin API without a chain: a deployment record with made-up addresses,
a database of this module's own, fundings booked the way the indexer books them.

Every refusal asserts the status, the problem code and that nothing was written: the row counts
of the escrow tables, the outbox, the nonces, the audit log and the ledger, and the state of
every escrow, dispute, resolution and attestor are the same before and after.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from eth_account.signers.local import LocalAccount
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from admin_api.app import close_app, create_app
from admin_api.auth import create_api_key, key_prefix
from contracts.deployment import Deployment
from ledger import custody, db
from ledger.commands import ChainRef
from ledger.engine import post_batch
from ledger.escrow import attestation, party, service
from ledger.settings import Settings, load_settings
from tests.api.conftest import assert_problem, audit_rows, bearer, names
from tests.conftest import APP_ROLE, Databases

CHAIN_ID = 31337
DEPLOYMENT = Deployment(
    chain_id=CHAIN_ID,
    start_block=0,
    token="0x" + "70" * 20,
    escrow="0x" + "e5" * 20,
    vault="0x" + "7a" * 20,
    treasury="0x" + "73" * 20,
    fee_wallet="0x" + "fe" * 20,
)
# Splits of more than this wait for a second finance user.
APPROVAL_ABOVE = 1_000
FEE_BPS = 250
ZERO = "0x" + "0" * 40
UNKNOWN_ESCROW = "0x" + "ab" * 32
MALFORMED_ESCROW_IDS = ("no-such-escrow", "0x" + "g" * 64, "0x" + "ab" * 31, "0x" + "ab" * 33, "ab" * 33)
DEADLINE = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
# (secret key, public key, proof of possession) of each attestor; "pilot" is registered by a test.
ATTESTORS = {
    name: attestation.generate_attestor(f"api-escrows-{name}".encode().ljust(32, b"*"))
    for name in ("carrier", "customs", "port", "retired", "pilot")
}
BUYER: LocalAccount = Account.from_key("0x" + "b1" * 32)
SELLER: LocalAccount = Account.from_key("0x" + "5e" * 32)
STRANGER: LocalAccount = Account.from_key("0x" + "57" * 32)
DROP = object()  # a field left out of a body

_STATE_SQL = {
    "counts": "SELECT (SELECT count(*) FROM escrows), (SELECT count(*) FROM escrow_history),"
    " (SELECT count(*) FROM escrow_attestors), (SELECT count(*) FROM escrow_policy),"
    " (SELECT count(*) FROM escrow_attestations), (SELECT count(*) FROM escrow_disputes),"
    " (SELECT count(*) FROM escrow_resolutions), (SELECT count(*) FROM party_nonces),"
    " (SELECT count(*) FROM chain_outbox), (SELECT count(*) FROM audit_log),"
    " (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM ledger_accounts)",
    "escrows": "SELECT id, status, funded_amount, released_amount, fee_amount, refunded_amount, deadline,"
    " release_proof FROM escrows ORDER BY id",
    "disputes": "SELECT id, closed_at FROM escrow_disputes ORDER BY id",
    "resolutions": "SELECT id, status, approved_by FROM escrow_resolutions ORDER BY id",
    "attestors": "SELECT id, revoked_at FROM escrow_attestors ORDER BY id",
    "pending": "SELECT code, debits_pending, credits_pending FROM ledger_accounts ORDER BY id",
}


def address(tag: str) -> str:
    """A made-up address of its own for ``tag`` (list filters see only this test's escrows)."""
    return "0x" + hashlib.sha256(tag.encode()).hexdigest()[:40]


@dataclass
class Api:
    """The app on this module's database, its staff keys and the registered attestors."""

    client: FlaskClient
    engine: sa.Engine
    keys: dict[str, str]
    attestors: dict[str, int]

    def actor(self, role: str) -> str:
        return f"apikey:{key_prefix(self.keys[role])}"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        role: str | None = "finance",
        raw: str | None = None,
    ) -> TestResponse:
        headers = bearer(self.keys[role]) if role else {}
        if raw is not None:
            return self.client.open(
                path, method=method, data=raw, content_type="application/json", headers=headers
            )
        return self.client.open(path, method=method, json=body, headers=headers)

    def ok(self, path: str, body: Any = None, *, role: str | None = "finance", expect: int = 201) -> Any:
        """POST ``body``; the status must be ``expect``; the JSON answer."""
        response = self.call("POST", path, body, role=role)
        assert response.status_code == expect, response.get_data(as_text=True)
        return response.get_json()

    def get(self, path: str, *, role: str = "auditor") -> Any:
        response = self.call("GET", path, role=role)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        """What a refused request must leave as it was."""
        with self.engine.connect() as conn:
            return {name: [tuple(r) for r in conn.execute(sa.text(sql))] for name, sql in _STATE_SQL.items()}

    def refused(
        self,
        status: int,
        code: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        role: str | None = "finance",
        raw: str | None = None,
    ) -> dict[str, Any]:
        """The request is refused with ``status`` and ``code`` and writes nothing at all."""
        before = self.state()
        problem = assert_problem(self.call(method, path, body, role=role, raw=raw), status, code)
        assert self.state() == before, f"{method} {path} wrote something although it was refused"
        return problem

    def escrow_body(self, key: str, /, **changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "key": key,
            "buyer": BUYER.address,
            "seller": SELLER.address,
            "amount": "1000000",
            "fee_bps": FEE_BPS,
            "deadline": DEADLINE.isoformat(),
            "delivery_ref": f"BOL-{key}",
            "attestors": [self.attestors["carrier"], self.attestors["customs"]],
            "threshold": 2,
            "auto_release": False,
        }
        for name, value in changes.items():
            if value is DROP:
                del body[name]
            else:
                body[name] = value
        return body

    def create(self, key: str, /, **changes: Any) -> dict[str, Any]:
        """A new escrow (by an operator); the escrow as the API shows it."""
        escrow: dict[str, Any] = self.ok("/escrows", self.escrow_body(key, **changes), role="operator")[
            "escrow"
        ]
        return escrow

    def fund(self, escrow_id: str) -> None:
        """Book the escrow's funding as the indexer does for a confirmed ``Funded`` event: the
        custody mirror against the escrow's account, and the escrow moves to ``funded``."""
        with self.engine.begin() as conn:
            escrow = service.get_escrow(conn, escrow_id)
            tx_hash = "0x" + hashlib.sha256(escrow_id.encode()).hexdigest()
            chain = ChainRef(CHAIN_ID, tx_hash, 0, 100, "0x" + "b0" * 32)
            custody.ensure_chart(conn, CHAIN_ID, DEPLOYMENT.custody)
            transfer = custody.TokenTransfer(chain, escrow.buyer, DEPLOYMENT.escrow, escrow.amount)
            booking = custody.book_custody_transfer(
                transfer, DEPLOYMENT.custody, service.escrow_account(escrow_id)
            )
            assert booking is not None
            [booked] = post_batch(conn, [booking.entry])
            assert booked.status == "created", booked
            funding = service.Funding(
                chain,
                DEPLOYMENT.escrow,
                escrow_id,
                escrow.buyer,
                escrow.seller,
                escrow.amount,
                escrow.deadline,
            )
            assert service.record_funding(conn, funding) == "funded"

    def funded(self, key: str, /, **changes: Any) -> dict[str, Any]:
        escrow = self.create(key, **changes)
        self.fund(escrow["id"])
        return escrow

    def disputed(self, key: str, /, **changes: Any) -> dict[str, Any]:
        escrow = self.funded(key, **changes)
        self.ok(f"/escrows/{escrow['id']}/dispute", {"reason": "the goods arrived damaged"}, role="operator")
        return escrow

    def confirmed(self, key: str, /, **changes: Any) -> dict[str, Any]:
        """Funded and attested by both of its attestors: delivery confirmed (no auto release)."""
        escrow = self.funded(key, **changes)
        for name in ("carrier", "customs"):
            self.ok(f"/escrows/{escrow['id']}/attestations", attestation_body(self, escrow, name), role=None)
        assert self.escrow(escrow["id"])["status"] == "delivery_confirmed"
        return escrow

    def escrow(self, escrow_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.get(f"/escrows/{escrow_id}")
        return found

    def audit(self, target: str) -> list[tuple[str, str, str]]:
        """(actor, role, action) of the audit rows of ``target``, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT actor, role, action FROM audit_log WHERE target = :t ORDER BY id"),
                {"t": target},
            )
            return [tuple(r) for r in rows]

    def outbox(self, escrow_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT key, action, status, hold_keys, metadata FROM chain_outbox"
                    " WHERE metadata->>'escrow_id' = :e ORDER BY id"
                ),
                {"e": escrow_id},
            ).mappings()
            return [dict(r) for r in rows]

    def pending_out_of(self, escrow_id: str) -> int:
        """What holds reserve out of the escrow's ledger account."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT debits_pending FROM ledger_accounts WHERE code = :c"),
                    {"c": service.escrow_account(escrow_id)},
                ).scalar_one()
            )


def delivery_message(escrow: dict[str, Any]) -> bytes:
    return attestation.delivery_message(
        escrow["chain_id"], escrow["contract"], escrow["id"], escrow["delivery_ref"], int(escrow["amount"])
    )


def attestation_body(
    api: Api, escrow: dict[str, Any], name: str, *, signer: str | None = None
) -> dict[str, Any]:
    """Attestor ``name``'s attestation of ``escrow``, signed by ``signer``'s key (its own by default)."""
    secret = ATTESTORS[signer or name][0]
    signature = attestation.sign_delivery(secret, delivery_message(escrow))
    return {"attestor_id": api.attestors[name], "signature": "0x" + signature.hex()}


def signed_create(
    key: str, nonce: int, *, signer: LocalAccount = BUYER, attestors: tuple[int, ...] = (1, 2), **changes: Any
) -> dict[str, Any]:
    """A buyer's signed CreateEscrow request as a wallet sends it (attestors 1 and 2 are the first
    registered in this module's database)."""
    fields: dict[str, Any] = {
        "key": key,
        "seller": SELLER.address,
        "amount": 5_000,
        "fee_bps": FEE_BPS,
        "deadline": int(DEADLINE.timestamp()),
        "delivery_ref": f"PO-{key}",
        "attestors": attestors,
        "threshold": 1,
        "auto_release": False,
        "nonce": nonce,
        "expiry": int(time.time()) + 600,
        **changes,
    }
    request = party.CreateEscrowRequest(**fields)
    signature = party.sign(request, signer.key, CHAIN_ID, DEPLOYMENT.escrow)
    message = request.typed_data(CHAIN_ID, DEPLOYMENT.escrow)["message"]
    return {
        "buyer": signer.address,
        "request": {**message, "amount": str(request.amount)},
        "signature": signature,
    }


def signed_dispute(
    escrow_id: str,
    nonce: int,
    *,
    signer: LocalAccount = SELLER,
    reason: str = "never arrived",
    **changes: Any,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "escrow_id": escrow_id,
        "reason": reason,
        "nonce": nonce,
        "expiry": int(time.time()) + 600,
        **changes,
    }
    request = party.OpenDisputeRequest(**fields)
    signature = party.sign(request, signer.key, CHAIN_ID, DEPLOYMENT.escrow)
    return {"request": request.typed_data(CHAIN_ID, DEPLOYMENT.escrow)["message"], "signature": signature}


def _settings(tmp: Path, deployment_file: Path) -> Settings:
    return load_settings(
        {
            "TRACE_DATA_DIR": str(tmp),
            "TRACE_DEPLOYMENT_FILE": str(deployment_file),
            "TRACE_ESCROW_APPROVAL_ABOVE": str(APPROVAL_ABOVE),
            "TRACE_LOG_LEVEL": "WARNING",
        }
    )


@pytest.fixture(scope="module")
def engine(databases: Databases, template_db: str) -> Iterator[sa.Engine]:
    """A database of this module's own: escrow rows of other files never meet these."""
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    yield engine
    engine.dispose()
    databases.drop(name)


@pytest.fixture(scope="module")
def api(engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    work = tmp_path_factory.mktemp("escrow-api")
    DEPLOYMENT.save(work / "deployment.json")
    app = create_app(_settings(work, work / "deployment.json"), engine=engine)
    with engine.begin() as conn:
        keys = {
            role: create_api_key(conn, role, f"escrow tests {role}")
            for role in ("admin", "auditor", "operator")
        }
        keys["finance"] = create_api_key(conn, "finance", "escrow tests finance")
        keys["finance2"] = create_api_key(conn, "finance", "escrow tests second finance")
        ids = {
            name: service.register_attestor(conn, name, pubkey, pop)[0]
            for name, (_, pubkey, pop) in ATTESTORS.items()
            if name != "pilot"
        }
        service.revoke_attestor(conn, ids["retired"])
    try:
        yield Api(app.test_client(), engine, keys, ids)
    finally:
        close_app(app)


# --- the deployment record -------------------------------------------------------------------


@pytest.mark.parametrize("record", [None, "{not json", '{"chain_id": 31337}'])
def test_without_a_usable_deployment_record_the_chain_routes_answer_503(
    api: Api, tmp_path: Path, record: str | None
) -> None:
    deployment_file = tmp_path / "deployment.json"
    if record is not None:
        deployment_file.write_text(record)
    app = create_app(_settings(tmp_path, deployment_file), engine=api.engine)
    try:
        bare = Api(app.test_client(), api.engine, api.keys, api.attestors)
        escrow = api.funded(f"no-deployment-{len(record or '')}")
        path = f"/escrows/{escrow['id']}"
        calls: list[tuple[str, Any, str | None]] = [
            ("/escrows", api.escrow_body("no-deployment-new"), "operator"),
            ("/party/escrows", signed_create("no-deployment", 1), None),
            (f"{path}/attestations", attestation_body(api, escrow, "carrier"), None),
            (f"{path}/releases", {}, "finance"),
            (f"{path}/dispute", {"reason": "late"}, "operator"),
            (f"/party{path}/dispute", signed_dispute(escrow["id"], 1), None),
            (f"{path}/resolution", {"seller_amount": "1", "buyer_amount": "0", "fee": "0"}, "finance"),
        ]
        for route, body, role in calls:
            problem = bare.refused(503, "chain_not_deployed", "POST", route, body, role=role)
            assert str(deployment_file) in problem["detail"]
        # Reading needs no chain.
        assert bare.get(path)["status"] == "funded"
        assert bare.get(f"/escrows?party={BUYER.address}")["items"]
    finally:
        close_app(app)


# --- creating escrows (staff) ----------------------------------------------------------------


def test_create_then_the_same_again_then_other_terms_under_the_key(api: Api) -> None:
    body = api.escrow_body("order-1")
    before = api.state()
    created = api.ok("/escrows", body, role="operator")
    escrow = created["escrow"]
    assert escrow["id"] == service.escrow_id_for("order-1")
    assert (escrow["status"], escrow["buyer"], escrow["seller"]) == (
        "awaiting_funding",
        BUYER.address.lower(),
        SELLER.address.lower(),
    )
    assert (escrow["amount"], escrow["remaining"], escrow["contract"]) == ("1000000", "0", DEPLOYMENT.escrow)
    assert datetime.fromisoformat(escrow["deadline"]) == DEADLINE
    funding = created["funding"]
    assert funding["token"] == funding["approve"]["to"] == DEPLOYMENT.token
    assert funding["approve"]["args"] == [DEPLOYMENT.escrow, "1000000"]
    assert funding["fund"]["to"] == DEPLOYMENT.escrow
    assert funding["fund"]["args"] == [
        escrow["id"],
        SELLER.address.lower(),
        "1000000",
        int(DEADLINE.timestamp()),
    ]
    assert funding["fund"]["data"].startswith("0x") and escrow["id"][2:] in funding["fund"]["data"]
    after = api.state()
    assert after["counts"] != before["counts"]
    assert api.audit(f"escrow:{escrow['id']}") == [(api.actor("operator"), "operator", "escrow.create")]
    # The same request again (the deadline in another offset is the same instant): the same escrow.
    again_body = {**body, "deadline": DEADLINE.astimezone(timezone(timedelta(hours=-5))).isoformat()}
    assert again_body["deadline"] != body["deadline"]
    response = api.call("POST", "/escrows", again_body, role="finance")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["escrow"] == escrow
    assert api.state() == after
    # Other terms under the same key: a conflict, nothing written.
    for changes in (
        {"amount": "1000001"},
        {"seller": STRANGER.address},
        {"threshold": 1},
        {"auto_release": True},
    ):
        api.refused(409, "idempotency_conflict", "POST", "/escrows", {**body, **changes}, role="operator")
    assert api.audit(f"escrow:{escrow['id']}") == [(api.actor("operator"), "operator", "escrow.create")]


_BAD_CREATE: list[tuple[str, Any]] = [
    ("extra", 1),
    *((name, DROP) for name in ("key", "buyer", "seller", "amount", "fee_bps", "deadline", "delivery_ref")),
    ("attestors", DROP),
    ("threshold", DROP),
    ("key", ""),
    ("key", "k" * 201),
    ("key", "bad\nkey"),
    ("amount", "-1"),
    ("amount", "0"),
    ("amount", "12a"),
    ("amount", "1.5"),
    ("amount", ""),
    ("amount", " 1"),
    ("amount", "\uff11"),  # a full-width digit
    ("amount", str(2**256)),
    ("amount", "1" + "0" * 78),
    ("amount", 1000),
    ("amount", 1e3),
    ("amount", None),
    ("fee_bps", -1),
    ("fee_bps", 10_001),
    ("fee_bps", True),
    ("fee_bps", "250"),
    ("fee_bps", 2.5),
    ("deadline", "2030-01-01T00:00:00"),
    ("deadline", DEADLINE.replace(microsecond=500_000).isoformat()),
    ("deadline", "2001-01-01T00:00:00+00:00"),
    ("deadline", "tomorrow"),
    ("deadline", 1_900_000_000),
    ("buyer", "0x1234"),
    ("buyer", "not an address"),
    ("buyer", "0x" + "g" * 40),
    ("buyer", 42),
    ("buyer", ZERO),
    ("seller", ZERO),
    ("seller", BUYER.address),
    ("seller", BUYER.address.lower()),
    ("seller", "0x" + BUYER.address[2:].upper()),
    ("delivery_ref", ""),
    ("delivery_ref", "r" * 257),
    ("delivery_ref", "bad\x00ref"),
    ("attestors", []),
    ("attestors", "carrier"),
    ("attestors", [999_999]),
    ("attestors", ["1"]),
    ("attestors", [True]),
    ("attestors", list(range(1, 34))),
    ("threshold", 0),
    ("threshold", -1),
    ("threshold", 3),
    ("threshold", True),
    ("threshold", "2"),
    ("auto_release", "yes"),
    ("auto_release", 1),
    ("auto_release", None),
]


# Ids by position: a value made from the clock would differ between the test processes.
@pytest.mark.parametrize(
    ("field", "value"), _BAD_CREATE, ids=[f"{field}-{n}" for n, (field, _) in enumerate(_BAD_CREATE)]
)
def test_create_refuses_bad_input_and_writes_nothing(api: Api, field: str, value: Any) -> None:
    body = api.escrow_body(f"bad-{field}", **{field: value})
    problem = api.refused(400, "invalid_input", "POST", "/escrows", body, role="operator")
    # The problem names the field: a field message of the schema, or the domain's own words
    # (an address check says only what is wrong with the value).
    named = field in json.dumps(problem.get("errors", {})) or field in problem["detail"]
    assert named or (field in ("buyer", "seller") and "not an address" in problem["detail"]), problem


@pytest.mark.parametrize(
    "attestors",
    [
        ("carrier", "retired"),
        ("retired",),
        ("carrier", "carrier"),
        ("carrier", "unknown"),
    ],
)
def test_create_refuses_unknown_revoked_or_repeated_attestors(api: Api, attestors: tuple[str, ...]) -> None:
    ids = [api.attestors.get(name, 999_999) for name in attestors]
    body = api.escrow_body("bad-policy", attestors=ids, threshold=1)
    problem = api.refused(400, "invalid_input", "POST", "/escrows", body, role="operator")
    assert "attestor" in problem["detail"], problem


@pytest.mark.parametrize("deadline", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_create_refuses_a_deadline_outside_the_calendar(api: Api, deadline: str) -> None:
    body = api.escrow_body("edge-deadline", deadline=deadline)
    problem = api.refused(400, "invalid_input", "POST", "/escrows", body, role="operator")
    assert "outside the calendar" in problem["detail"], problem


# --- bodies that are not JSON objects, on every route that takes one ---------------------------


def _body_routes(api: Api, escrow_id: str) -> list[tuple[str, str]]:
    return [
        ("/escrows", "operator"),
        ("/attestors", "finance"),
        ("/party/escrows", ""),
        (f"/escrows/{escrow_id}/attestations", ""),
        (f"/escrows/{escrow_id}/releases", "finance"),
        (f"/escrows/{escrow_id}/dispute", "operator"),
        (f"/party/escrows/{escrow_id}/dispute", ""),
        (f"/escrows/{escrow_id}/resolution", "finance"),
    ]


@pytest.mark.parametrize("raw", ['{"key": ', "{'key': 1}", "[]", '"text"', "null", "NaN", '{"a": NaN}', "1"])
def test_a_body_that_is_not_a_json_object_is_refused_everywhere(api: Api, raw: str) -> None:
    escrow = api.funded(f"raw-{hashlib.sha256(raw.encode()).hexdigest()[:8]}")
    for path, role in _body_routes(api, escrow["id"]):
        if path.endswith("/releases") and raw == "null":
            continue  # the release body is optional; null is "no body"
        problem = api.refused(400, "invalid_input", "POST", path, role=role or None, raw=raw)
        assert problem["detail"], (path, problem)


def test_a_body_that_is_not_json_is_refused_everywhere(api: Api) -> None:
    escrow = api.funded("form-body")
    for path, role in _body_routes(api, escrow["id"]):
        headers = bearer(api.keys[role]) if role else {}
        before = api.state()
        response = api.client.post(path, data={"key": "x"}, headers=headers)
        assert_problem(response, 400, "invalid_input")
        assert api.state() == before


# --- who may call the staff routes -------------------------------------------------------------


def test_every_staff_write_refuses_other_roles_and_anonymous_callers(api: Api) -> None:
    disputed = api.disputed("roles-disputed")
    resolution = api.ok(
        f"/escrows/{disputed['id']}/resolution",
        {"seller_amount": "600000", "buyer_amount": "400000", "fee": "0"},
    )
    assert resolution["status"] == "awaiting_approval"
    confirmed = api.confirmed("roles-confirmed")
    funded = api.funded("roles-funded")
    pubkey, pop = ATTESTORS["pilot"][1:]
    writes: list[tuple[str, Any, tuple[str, ...]]] = [
        ("/escrows", api.escrow_body("roles-new"), ("auditor",)),
        (
            "/attestors",
            {"name": "pilot", "pubkey": "0x" + pubkey.hex(), "proof_of_possession": "0x" + pop.hex()},
            ("auditor", "operator"),
        ),
        (f"/attestors/{api.attestors['carrier']}/revoke", None, ("auditor", "operator")),
        (f"/escrows/{confirmed['id']}/releases", {}, ("auditor", "operator")),
        (f"/escrows/{funded['id']}/dispute", {"reason": "late"}, ("auditor",)),
        (
            f"/escrows/{disputed['id']}/resolution",
            {"seller_amount": "500000", "buyer_amount": "500000", "fee": "0"},
            ("auditor", "operator"),
        ),
        (f"/resolutions/{resolution['id']}/approve", None, ("auditor", "operator")),
    ]
    for path, body, forbidden in writes:
        for role in forbidden:
            api.refused(403, "forbidden", "POST", path, body, role=role)
        problem = api.refused(401, "unauthenticated", "POST", path, body, role=None)
        assert problem["detail"]
    for path in ("/escrows", f"/escrows/{funded['id']}", f"/escrows/{funded['id']}/history", "/attestors"):
        api.refused(401, "unauthenticated", "GET", path, role=None)
        before = api.state()
        for role in ("admin", "finance", "auditor", "operator"):
            assert api.call("GET", path, role=role).status_code == 200
        assert api.state() == before
    # A key that is no key at all is the same as none.
    before = api.state()
    response = api.client.post(
        "/escrows", json=api.escrow_body("roles-new"), headers={"Authorization": "Bearer tc_00000000_nope"}
    )
    assert_problem(response, 401, "unauthenticated")
    assert api.state() == before


# --- escrow ids in paths ------------------------------------------------------------------------


def _id_routes(api: Api, funded: dict[str, Any]) -> list[tuple[str, str, Callable[[str], Any], str | None]]:
    """(method, path template, body for an escrow id, role) of every route naming an escrow."""
    carrier = attestation_body(api, funded, "carrier")
    return [
        ("GET", "/escrows/{}", lambda _: None, "auditor"),
        ("GET", "/escrows/{}/history", lambda _: None, "auditor"),
        ("POST", "/escrows/{}/attestations", lambda _: carrier, None),
        ("POST", "/escrows/{}/releases", lambda _: {}, "finance"),
        ("POST", "/escrows/{}/dispute", lambda _: {"reason": "late"}, "operator"),
        (
            "POST",
            "/escrows/{}/resolution",
            lambda _: {"seller_amount": "1", "buyer_amount": "0", "fee": "0"},
            "finance",
        ),
        ("POST", "/party/escrows/{}/dispute", lambda escrow_id: signed_dispute(escrow_id, 9), None),
    ]


def test_a_malformed_escrow_id_is_400_and_an_unknown_one_404_on_every_route(api: Api) -> None:
    funded = api.funded("ids")
    for method, template, body, role in _id_routes(api, funded):
        for malformed in MALFORMED_ESCROW_IDS:
            path = template.format(malformed)
            # A party's request must name the escrow it is for; here it names the real one.
            api.refused(400, "invalid_input", method, path, body(funded["id"]), role=role)
        problem = api.refused(
            404, "escrow_not_found", method, template.format(UNKNOWN_ESCROW), body(UNKNOWN_ESCROW), role=role
        )
        assert UNKNOWN_ESCROW in problem["detail"]
    # Upper-case hex names the same escrow.
    assert api.escrow("0x" + funded["id"][2:].upper())["id"] == funded["id"]


# --- reading escrows ----------------------------------------------------------------------------


def test_get_and_the_history_of_a_fresh_escrow(api: Api) -> None:
    escrow = api.create("fresh")
    assert api.escrow(escrow["id"]) == escrow
    history = api.get(f"/escrows/{escrow['id']}/history")
    assert history["escrow"] == escrow
    assert [(m["from_status"], m["to_status"], m["actor"]) for m in history["moves"]] == [
        (None, "awaiting_funding", api.actor("operator"))
    ]
    assert history["moves"][0]["details"] == {"key": "fresh"}
    assert (history["attestations"], history["disputes"], history["resolutions"], history["chain_txs"]) == (
        [],
        [],
        [],
        [],
    )
    assert history["ledger"]["lines"] == []


def test_list_filters_and_pages(api: Api) -> None:
    buyer, seller = address("list-buyer"), address("list-seller")
    soon = DEADLINE - timedelta(days=3)
    made = [
        api.create("list-1", buyer=buyer, seller=seller, deadline=soon.isoformat()),
        api.create("list-2", buyer=buyer, seller=seller),
        api.funded("list-3", buyer=seller, seller=buyer),
        api.create("list-4", buyer=seller, seller=address("list-other")),
    ]
    api.create("list-elsewhere", buyer=address("list-x"), seller=address("list-y"))
    ids = sorted(e["id"] for e in made)

    def listed(query: str) -> list[str]:
        return [e["id"] for e in api.get(f"/escrows?{query}")["items"]]

    assert listed(f"party={buyer}") == sorted(e["id"] for e in made[:3])
    assert listed(f"party={seller.upper().replace('0X', '0x')}") == ids
    assert listed(f"party={seller}&status=funded") == [made[2]["id"]]
    assert listed(f"party={seller}&status=awaiting_funding") == sorted(
        e["id"] for e in made if e is not made[2]
    )
    cut = (soon + timedelta(days=1)).isoformat().replace("+", "%2B")
    assert listed(f"party={buyer}&deadline_before={cut}") == [made[0]["id"]]
    assert listed(f"party={seller}&deadline_after={cut}") == sorted(e["id"] for e in made[1:])
    # Pages: pass next back as after; together they are the whole list, once each.
    pages: list[str] = []
    after = ""
    for _ in range(len(ids)):
        page = api.get(f"/escrows?party={seller}&limit=3{after}")
        pages += [e["id"] for e in page["items"]]
        if page["next"] is None:
            break
        assert page["next"] == page["items"][-1]["id"]
        after = f"&after={page['next']}"
    assert pages == ids
    assert api.get(f"/escrows?party={seller}&limit=4")["next"] is None


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "status=",
        "party=0x1234",
        "party=someone",
        "deadline_before=2030-01-01T00:00:00",
        "deadline_after=yesterday",
        "limit=0",
        "limit=501",
        "limit=ten",
        "colour=red",
    ],
)
def test_list_refuses_bad_filters(api: Api, query: str) -> None:
    problem = api.refused(400, "invalid_input", "GET", f"/escrows?{query}", role="auditor")
    # The problem names the parameter it refused.
    assert query.split("=", 1)[0] in json.dumps(problem), problem


# --- attestors ----------------------------------------------------------------------------------


def _attestor_body(name: str, key_of: str, pop_of: str | None = None) -> dict[str, Any]:
    pubkey = ATTESTORS[key_of][1]
    pop = ATTESTORS[pop_of or key_of][2]
    return {"name": name, "pubkey": "0x" + pubkey.hex(), "proof_of_possession": "0x" + pop.hex()}


_PILOT = _attestor_body("pilot", "pilot")
_INFINITY = "0x" + ("c0" + "00" * 47)
_BAD_ATTESTORS: list[dict[str, Any]] = [
    {**_PILOT, "extra": 1},
    {k: v for k, v in _PILOT.items() if k != "name"},
    {k: v for k, v in _PILOT.items() if k != "pubkey"},
    {k: v for k, v in _PILOT.items() if k != "proof_of_possession"},
    {**_PILOT, "name": ""},
    {**_PILOT, "name": "n" * 101},
    {**_PILOT, "name": "bad\x07name"},
    {**_PILOT, "pubkey": "0xzz"},
    {**_PILOT, "pubkey": _PILOT["pubkey"][:-2]},
    {**_PILOT, "pubkey": _PILOT["pubkey"] + "00"},
    {**_PILOT, "pubkey": 12},
    {**_PILOT, "pubkey": _INFINITY},
    {**_PILOT, "pubkey": "0x" + "ff" * 48},
    {**_PILOT, "proof_of_possession": _PILOT["proof_of_possession"][:-2]},
    {**_PILOT, "proof_of_possession": "0x" + "zz" * 96},
    # Real keys, proofs swapped: a proof of possession must be the key's own.
    _attestor_body("pilot", "pilot", pop_of="port"),
    _attestor_body("pilot", "port", pop_of="pilot"),
]


@pytest.mark.parametrize("body", _BAD_ATTESTORS)
def test_register_refuses_bad_keys_and_proofs(api: Api, body: dict[str, Any]) -> None:
    problem = api.refused(400, "invalid_input", "POST", "/attestors", body)
    assert problem["detail"], problem


def test_an_attestor_registered_then_again_then_conflicting_then_revoked(api: Api) -> None:
    registered = api.ok("/attestors", _PILOT)
    assert (registered["name"], registered["pubkey"], registered["revoked"]) == (
        "pilot",
        _PILOT["pubkey"],
        False,
    )
    pilot = registered["id"]
    target = f"attestor:{pilot}"
    assert api.audit(target) == [(api.actor("finance"), "finance", "attestor.register")]
    before = api.state()
    assert api.ok("/attestors", _PILOT, role="admin", expect=200) == registered
    assert api.state() == before
    api.refused(409, "attestor_conflict", "POST", "/attestors", _attestor_body("pilot", "port"))
    api.refused(409, "attestor_conflict", "POST", "/attestors", _attestor_body("copilot", "pilot"))
    # While it serves an escrow, it can be revoked: its attestations then stop counting.
    escrow = api.funded("pilot-escrow", attestors=[api.attestors["carrier"], pilot], threshold=1)
    revoked = api.ok(f"/attestors/{pilot}/revoke", expect=200)
    assert revoked == {**registered, "revoked": True}
    assert api.audit(target)[-1] == (api.actor("finance"), "finance", "attestor.revoke")
    assert {a["id"]: a["revoked"] for a in api.get("/attestors")}[pilot] is True
    signature = attestation.sign_delivery(ATTESTORS["pilot"][0], delivery_message(escrow))
    body = {"attestor_id": pilot, "signature": "0x" + signature.hex()}
    problem = api.refused(
        400, "invalid_input", "POST", f"/escrows/{escrow['id']}/attestations", body, role=None
    )
    assert "revoked" in problem["detail"]
    new = api.escrow_body("pilot-escrow-2", attestors=[pilot], threshold=1)
    api.refused(400, "invalid_input", "POST", "/escrows", new, role="operator")
    api.refused(404, "attestor_not_found", "POST", "/attestors/999999/revoke")


# --- attestations -----------------------------------------------------------------------------


def test_attestations_refuse_bad_signatures_and_count_good_ones(api: Api) -> None:
    escrow = api.funded("attest-1")
    other = api.funded("attest-2")
    path = f"/escrows/{escrow['id']}/attestations"
    good = attestation_body(api, escrow, "carrier")
    carrier = api.attestors["carrier"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({**good, "extra": 1}, ""),
        ({"attestor_id": carrier}, ""),
        ({"signature": good["signature"]}, ""),
        ({**good, "attestor_id": str(carrier)}, ""),
        ({**good, "attestor_id": 0}, ""),
        ({**good, "attestor_id": True}, ""),
        ({**good, "attestor_id": 2**63}, ""),
        ({**good, "signature": "0x" + "zz" * 96}, ""),
        ({**good, "signature": good["signature"][:-2]}, ""),
        ({**good, "signature": good["signature"] + "00"}, ""),
        ({**good, "signature": 5}, ""),
        ({**good, "signature": "0x" + "11" * 96}, "does not verify"),
        # Another attestor's signature under this one's id.
        (attestation_body(api, escrow, "carrier", signer="customs"), "does not verify"),
        # This attestor's signature of another escrow's delivery.
        (attestation_body(api, other, "carrier"), "does not verify"),
        # A registered attestor outside the escrow's policy, its own valid signature.
        (attestation_body(api, escrow, "port"), "not in the policy"),
        ({**good, "attestor_id": 999_999}, "not in the policy"),
    ]
    for body, detail in bad:
        problem = api.refused(400, "invalid_input", "POST", path, body, role=None)
        assert detail in problem["detail"]
    first = api.ok(path, good, role=None)
    assert first == {"status": "created", "escrow_status": "funded", "attestations": 1, "threshold": 2}
    before = api.state()
    assert api.ok(path, good, role=None, expect=200)["status"] == "exists"
    assert api.state() == before
    second = api.ok(path, attestation_body(api, escrow, "customs"), role=None)
    assert (second["escrow_status"], second["attestations"]) == ("delivery_confirmed", 2)
    stored = api.escrow(escrow["id"])
    assert (stored["status"], stored["has_release_proof"]) == ("delivery_confirmed", True)
    assert api.outbox(escrow["id"]) == []  # no auto release: finance releases it
    history = api.get(f"/escrows/{escrow['id']}/history")
    assert sorted(a["attestor_id"] for a in history["attestations"]) == sorted(
        [carrier, api.attestors["customs"]]
    )


def test_an_unfunded_escrow_takes_no_attestations(api: Api) -> None:
    escrow = api.create("attest-unfunded")
    body = attestation_body(api, escrow, "carrier")
    problem = api.refused(
        409, "escrow_not_attestable", "POST", f"/escrows/{escrow['id']}/attestations", body, role=None
    )
    assert "awaiting_funding" in problem["detail"], problem
    assert api.escrow(escrow["id"])["status"] == "awaiting_funding"


def test_an_escrow_that_releases_by_itself_starts_releasing_at_the_threshold(api: Api) -> None:
    escrow = api.funded("attest-auto", auto_release=True, threshold=1)
    outcome = api.ok(
        f"/escrows/{escrow['id']}/attestations", attestation_body(api, escrow, "customs"), role=None
    )
    assert outcome["escrow_status"] == "releasing"
    [row] = api.outbox(escrow["id"])
    assert (row["key"], row["action"], row["status"]) == (
        f"escrow-release:{escrow['id']}:1",
        "escrow.release",
        "queued",
    )
    # 2.5 % of 1000000 to the fee, the rest to the seller, both reserved by holds.
    assert (row["metadata"]["to_seller"], row["metadata"]["fee"]) == ("975000", "25000")
    assert len(row["hold_keys"]) == 2
    assert api.pending_out_of(escrow["id"]) == 1_000_000


# --- releases ---------------------------------------------------------------------------------


def test_a_release_refuses_bad_amounts_then_goes_out_and_is_audited(api: Api) -> None:
    escrow = api.confirmed("release-1")
    path = f"/escrows/{escrow['id']}/releases"
    for body in (
        {"amount": "0"},
        {"amount": "-1"},
        {"amount": 5},
        {"amount": "abc"},
        {"amount": str(2**256)},
        {"amount": "1000001"},  # more than it holds
        {"amount": "1"},  # the fee (rounded up) leaves nothing for the seller
        {"amount": "100", "to": "me"},
    ):
        api.refused(400, "invalid_input", "POST", path, body)
    unconfirmed = api.funded("release-2")
    api.refused(409, "escrow_transition_refused", "POST", f"/escrows/{unconfirmed['id']}/releases", {})
    sent = api.ok(path, {"amount": "400000"}, expect=202)
    assert sent == {"key": f"escrow-release:{escrow['id']}:1", "status": "queued"}
    assert api.escrow(escrow["id"])["status"] == "releasing"
    [row] = api.outbox(escrow["id"])
    assert (row["metadata"]["to_seller"], row["metadata"]["fee"]) == ("390000", "10000")
    assert api.pending_out_of(escrow["id"]) == 400_000
    assert api.audit(f"escrow:{escrow['id']}")[-1] == (api.actor("finance"), "finance", "escrow.release")
    # One release at a time.
    api.refused(409, "escrow_transition_refused", "POST", path, {}, role="admin")


# --- staff disputes -----------------------------------------------------------------------------


def test_a_staff_dispute_freezes_the_escrow_once(api: Api) -> None:
    escrow = api.funded("dispute-staff")
    path = f"/escrows/{escrow['id']}/dispute"
    for body in (
        {},
        {"reason": ""},
        {"reason": "   "},
        {"reason": "r" * 1001},
        {"reason": "bad\x00reason"},
        {"reason": 5},
        {"reason": "late", "party": "buyer"},
    ):
        api.refused(400, "invalid_input", "POST", path, body, role="operator")
    opened = api.ok(path, {"reason": "the goods arrived damaged"}, role="operator")
    assert (opened["party"], opened["opened_by"], opened["closed_at"]) == (
        "staff",
        api.actor("operator"),
        None,
    )
    assert api.escrow(escrow["id"])["status"] == "disputed"
    [freeze] = api.outbox(escrow["id"])
    assert (freeze["key"], freeze["action"]) == (
        f"escrow-freeze:{escrow['id']}:{opened['id']}",
        "escrow.extend_deadline",
    )
    assert api.audit(f"escrow:{escrow['id']}")[-1] == (api.actor("operator"), "operator", "escrow.dispute")
    before = api.state()
    again = api.ok(path, {"reason": "another reason"}, role="finance", expect=200)
    assert again == opened
    assert api.state() == before
    unfunded = api.create("dispute-unfunded")
    api.refused(
        409, "escrow_transition_refused", "POST", f"/escrows/{unfunded['id']}/dispute", {"reason": "x"}
    )


# --- party requests: a buyer creates, a party disputes ------------------------------------------


def test_a_signed_creation_then_the_same_again_then_a_replayed_nonce(api: Api) -> None:
    body = signed_create("po-1", 1, attestors=(api.attestors["carrier"],))
    created = api.ok("/party/escrows", body, role=None)
    escrow = created["escrow"]
    assert escrow["id"] == service.escrow_id_for(f"party:{BUYER.address.lower()}:po-1")
    assert (escrow["buyer"], escrow["amount"], escrow["fee_bps"]) == (BUYER.address.lower(), "5000", FEE_BPS)
    assert created["funding"]["fund"]["args"][0] == escrow["id"]
    moves = api.get(f"/escrows/{escrow['id']}/history")["moves"]
    assert [m["actor"] for m in moves] == [f"party:{BUYER.address.lower()}"]
    before = api.state()
    again = api.ok("/party/escrows", body, role=None, expect=200)
    assert again["escrow"] == escrow
    assert api.state() == before
    replay = signed_create("po-2", 1, attestors=(api.attestors["carrier"],))
    api.refused(409, "nonce_replayed", "POST", "/party/escrows", replay, role=None)
    # The nonce is the buyer's: another buyer's nonce 1 is its own.
    other = signed_create("po-1", 1, signer=STRANGER, attestors=(api.attestors["carrier"],))
    assert api.ok("/party/escrows", other, role=None)["escrow"]["buyer"] == STRANGER.address.lower()


def _tampered(body: dict[str, Any], **request: Any) -> dict[str, Any]:
    """``body`` with request fields changed (or dropped) after it was signed."""
    changed = {**body["request"]}
    for name, value in request.items():
        if value is DROP:
            del changed[name]
        else:
            changed[name] = value
    return {**body, "request": changed}


def _resigned(body: dict[str, Any], signature: str) -> dict[str, Any]:
    return {**body, "signature": signature}


def _high_s(signature: str) -> str:
    """The same signature with s replaced by n - s (valid for secp256k1, refused by EIP-2)."""
    raw = bytes.fromhex(signature[2:])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = n - int.from_bytes(raw[32:64], "big")
    v = 27 + 28 - raw[64]
    return "0x" + (raw[:32] + s.to_bytes(32, "big") + bytes([v])).hex()


def _bad_signed_creations(api: Api) -> list[tuple[dict[str, Any], str]]:
    carrier = (api.attestors["carrier"],)
    now = int(time.time())
    good = signed_create("po-bad", 20, attestors=carrier)
    signature = good["signature"]
    return [
        ({**good, "extra": 1}, ""),
        ({k: v for k, v in good.items() if k != "signature"}, ""),
        ({k: v for k, v in good.items() if k != "buyer"}, ""),
        ({**good, "request": "key=po-bad"}, ""),
        (_tampered(good, nonce=DROP), "missing"),
        (_tampered(good, colour="red"), "unknown"),
        (_tampered(good, attestors=1), "attestors"),
        (_tampered(good, attestors=["x"]), "integer"),
        (_tampered(good, amount="0"), "amount"),
        (_tampered(good, amount="-1"), "amount"),
        (_tampered(good, amount="abc"), "amount"),
        (_tampered(good, amount=1.5), "amount"),
        (_tampered(good, amount=str(2**256)), "amount"),
        (_tampered(good, amount="1" + "0" * 78), "amount"),
        (_tampered(good, nonce="-1"), "nonce"),
        (_tampered(good, nonce=True), "nonce"),
        (_tampered(good, autoRelease="yes"), "autoRelease"),
        (_tampered(good, seller="0x1234"), "address"),
        (_tampered(good, feeBps=10_001), "feeBps"),
        # Terms other than those signed: the signature recovers someone else.
        (_tampered(good, amount="5001"), "not signed by"),
        (_tampered(good, deliveryRef="PO-other"), "not signed by"),
        ({**good, "buyer": "0x1234"}, "address"),
        # Another wallet claims the buyer's signature, or signs in the buyer's name.
        ({**good, "buyer": STRANGER.address}, "not signed by"),
        (
            signed_create("po-bad", 21, signer=STRANGER, attestors=carrier) | {"buyer": BUYER.address},
            "not signed by",
        ),
        (_resigned(good, "0xzz" + signature[4:]), "hex"),
        (_resigned(good, signature[:-2]), "65 bytes"),
        (_resigned(good, signature + "00"), "65 bytes"),
        (_resigned(good, "0x" + "00" * 65), "canonical"),
        (_resigned(good, _high_s(signature)), "canonical"),
        (_resigned(good, signature[:-2] + "1d"), "v must be"),
        (signed_create("po-bad", 22, attestors=carrier, expiry=now - 1), "expired"),
        (signed_create("po-bad", 23, attestors=carrier, expiry=now + 8 * 86_400), "more than"),
        (signed_create("po-bad", 24, attestors=carrier, fee_bps=300), "platform's fee"),
        (signed_create("po-bad", 25, attestors=carrier, fee_bps=0), "platform's fee"),
        # Signed, but no escrow could take it: the nonce stays unspent.
        (signed_create("po-bad", 26, attestors=(999_999,)), "not registered"),
        (signed_create("po-bad", 27, attestors=(api.attestors["retired"],)), "revoked"),
        (signed_create("po-bad", 28, attestors=carrier, deadline=now - 60), "future"),
        (signed_create("po-bad", 29, attestors=carrier, seller=BUYER.address), "different"),
    ]


def test_a_signed_creation_refuses_bad_requests_and_writes_nothing(api: Api) -> None:
    for body, detail in _bad_signed_creations(api):
        problem = api.refused(400, "invalid_input", "POST", "/party/escrows", body, role=None)
        assert detail in problem["detail"], (problem["detail"], body)
    # None of those nonces was spent: the good request with nonce 20 still goes through.
    created = api.ok(
        "/party/escrows", signed_create("po-bad", 20, attestors=(api.attestors["carrier"],)), role=None
    )
    assert created["escrow"]["status"] == "awaiting_funding"


@pytest.mark.parametrize("deadline", [2**64 - 1, 253_402_300_800])
def test_a_signed_creation_refuses_a_deadline_beyond_the_calendar(api: Api, deadline: int) -> None:
    body = signed_create("po-far", 40, attestors=(api.attestors["carrier"],), deadline=deadline)
    problem = api.refused(400, "invalid_input", "POST", "/party/escrows", body, role=None)
    assert "outside the calendar" in problem["detail"], problem


def test_a_signed_dispute_by_a_party_opens_once_and_refuses_everyone_else(api: Api) -> None:
    escrow = api.funded("party-dispute", buyer=BUYER.address, seller=SELLER.address)
    other = api.funded("party-dispute-other")
    path = f"/party/escrows/{escrow['id']}/dispute"
    now = int(time.time())
    good = signed_dispute(escrow["id"], 1)
    bad: list[tuple[dict[str, Any], str]] = [
        ({**good, "extra": 1}, ""),
        ({"request": good["request"]}, ""),
        (_tampered(good, reason=DROP), "missing"),
        (_tampered(good, colour="red"), "unknown"),
        (_tampered(good, nonce="abc"), "nonce"),
        (_tampered(good, reason="   "), "reason"),
        (_tampered(good, reason="another reason"), "not signed by the escrow's"),
        # Signed for another escrow: refused whoever signed it.
        (signed_dispute(other["id"], 2), "another escrow"),
        (_tampered(good, escrowId=other["id"]), "another escrow"),
        (signed_dispute(escrow["id"], 3, signer=STRANGER), "not signed by the escrow's"),
        (_resigned(good, good["signature"][:-4]), "65 bytes"),
        (_resigned(good, "0x" + "zz" * 65), "hex"),
        (signed_dispute(escrow["id"], 4, expiry=now - 1), "expired"),
        (signed_dispute(escrow["id"], 5, expiry=now + 8 * 86_400), "more than"),
    ]
    for body, detail in bad:
        problem = api.refused(400, "invalid_input", "POST", path, body, role=None)
        assert detail in problem["detail"], (problem["detail"], body)
    opened = api.ok(path, good, role=None)
    assert (opened["party"], opened["opened_by"]) == ("seller", f"party:{SELLER.address.lower()}")
    assert api.escrow(escrow["id"])["status"] == "disputed"
    assert [row["action"] for row in api.outbox(escrow["id"])] == ["escrow.extend_deadline"]
    before = api.state()
    assert api.ok(path, good, role=None, expect=200) == opened
    assert api.state() == before
    replay = signed_dispute(escrow["id"], 1, reason="something else")
    api.refused(409, "nonce_replayed", "POST", path, replay, role=None)
    # The buyer's own request while it is open answers with the open dispute. (The buyer's
    # nonce 1 went to an escrow creation: a wallet's nonces are one sequence for every request.)
    assert (
        api.ok(path, signed_dispute(escrow["id"], 101, signer=BUYER), role=None, expect=200)["id"]
        == opened["id"]
    )


def test_a_signed_dispute_of_an_unfunded_escrow_is_refused_and_spends_no_nonce(api: Api) -> None:
    escrow = api.create("party-dispute-unfunded", buyer=BUYER.address, seller=SELLER.address)
    body = signed_dispute(escrow["id"], 77, signer=BUYER)
    path = f"/party/escrows/{escrow['id']}/dispute"
    problem = api.refused(409, "escrow_transition_refused", "POST", path, body, role=None)
    assert "awaiting_funding" in problem["detail"], problem
    # The nonce was not spent: once the escrow is funded, the same signed request opens the dispute.
    api.fund(escrow["id"])
    opened = api.ok(path, body, role=None)
    assert api.escrow(escrow["id"])["status"] == "disputed", opened


# --- resolutions and their approval -------------------------------------------------------------


def _split(seller: int, buyer: int, fee: int) -> dict[str, str]:
    return {"seller_amount": str(seller), "buyer_amount": str(buyer), "fee": str(fee)}


def test_a_resolution_refuses_bad_splits_and_undisputed_escrows(api: Api) -> None:
    escrow = api.disputed("resolve-bad")
    path = f"/escrows/{escrow['id']}/resolution"
    for body, named in (
        (_split(600_000, 300_000, 0), "must add up to the 1000000"),  # short of what it holds
        (_split(600_000, 500_000, 0), "must add up to the 1000000"),
        (_split(0, 0, 0), "must add up to the 1000000"),
        ({**_split(1_000_000, 0, 0), "seller_amount": "-1"}, "seller_amount"),
        ({**_split(1_000_000, 0, 0), "seller_amount": 1_000_000}, "seller_amount"),
        ({**_split(1_000_000, 0, 0), "buyer_amount": "zero"}, "buyer_amount"),
        ({**_split(1_000_000, 0, 0), "fee": ""}, "fee"),
        ({**_split(1_000_000, 0, 0), "fee": str(2**256)}, "fee"),
        ({"seller_amount": "1000000", "buyer_amount": "0"}, "fee"),
        ({**_split(1_000_000, 0, 0), "note": "x"}, "note"),
    ):
        problem = api.refused(400, "invalid_input", "POST", path, body)
        assert names(problem, named), problem
    funded = api.funded("resolve-undisputed")
    problem = api.refused(
        409,
        "escrow_transition_refused",
        "POST",
        f"/escrows/{funded['id']}/resolution",
        _split(1_000_000, 0, 0),
    )
    assert names(problem, funded["status"]), problem


def test_a_large_split_waits_for_a_second_finance_user(api: Api) -> None:
    escrow = api.disputed("resolve-large")
    path = f"/escrows/{escrow['id']}/resolution"
    first = api.ok(path, _split(600_000, 390_000, 10_000))
    assert (first["status"], first["needs_approval"], first["approved_by"]) == (
        "awaiting_approval",
        True,
        None,
    )
    assert api.audit(f"escrow:{escrow['id']}")[-1] == (api.actor("finance"), "finance", "escrow.resolve")
    before = api.state()
    assert api.ok(path, _split(600_000, 390_000, 10_000), expect=200) == first
    assert api.state() == before
    # Another decision while the first waits replaces it.
    second = api.ok(path, _split(700_000, 290_000, 10_000))
    assert second["id"] != first["id"] and second["status"] == "awaiting_approval"
    statuses = {r["id"]: r["status"] for r in api.get(f"/escrows/{escrow['id']}/history")["resolutions"]}
    assert statuses == {first["id"]: "withdrawn", second["id"]: "awaiting_approval"}
    # Nothing goes to the chain for the split before its approval (only the dispute's freeze).
    assert [row["action"] for row in api.outbox(escrow["id"])] == ["escrow.extend_deadline"]
    approve = f"/resolutions/{second['id']}/approve"
    api.refused(409, "four_eyes", "POST", approve, role="finance")
    for role in ("auditor", "operator"):
        api.refused(403, "forbidden", "POST", approve, role=role)
    api.refused(401, "unauthenticated", "POST", approve, role=None)
    api.refused(
        409,
        "resolution_not_awaiting_approval",
        "POST",
        f"/resolutions/{first['id']}/approve",
        role="finance2",
    )
    api.refused(404, "resolution_not_found", "POST", "/resolutions/999999/approve", role="finance2")
    approved = api.ok(approve, role="finance2", expect=200)
    assert (approved["status"], approved["approved_by"]) == ("executing", api.actor("finance2"))
    assert api.escrow(escrow["id"])["status"] == "resolving"
    split = {row["key"]: row for row in api.outbox(escrow["id"]) if row["action"] != "escrow.extend_deadline"}
    key = f"escrow-split:{escrow['id']}:{second['id']}"
    assert set(split) == {f"{key}:release", f"{key}:refund"}
    release, refund = split[f"{key}:release"], split[f"{key}:refund"]
    assert (release["action"], release["metadata"]["to_seller"], release["metadata"]["fee"]) == (
        "escrow.release",
        "700000",
        "10000",
    )
    assert (refund["action"], refund["metadata"]["amount"]) == ("escrow.refund", "290000")
    assert release["hold_keys"] and refund["hold_keys"]
    assert api.pending_out_of(escrow["id"]) == 1_000_000
    assert api.audit(f"resolution:{second['id']}") == [(api.actor("finance2"), "finance", "escrow.approve")]
    # Approved once: the same approver again changes nothing, anyone else is too late.
    before = api.state()
    assert api.ok(approve, role="finance2", expect=200) == approved
    assert api.state() == before
    api.refused(409, "resolution_not_awaiting_approval", "POST", approve, role="admin")
    api.refused(409, "escrow_transition_refused", "POST", path, _split(1_000_000, 0, 0))


def test_a_split_within_the_approval_limit_is_carried_out_at_once(api: Api) -> None:
    escrow = api.disputed("resolve-small", amount=str(APPROVAL_ABOVE))
    decided = api.ok(f"/escrows/{escrow['id']}/resolution", _split(500, 480, 20))
    assert (decided["status"], decided["needs_approval"]) == ("executing", False)
    assert api.escrow(escrow["id"])["status"] == "resolving"
    actions = sorted(row["action"] for row in api.outbox(escrow["id"]))
    assert actions == ["escrow.extend_deadline", "escrow.refund", "escrow.release"]
    assert api.pending_out_of(escrow["id"]) == APPROVAL_ABOVE
    api.refused(
        409,
        "resolution_not_awaiting_approval",
        "POST",
        f"/resolutions/{decided['id']}/approve",
        role="finance2",
    )


def test_a_split_all_to_one_side_sends_one_transaction(api: Api) -> None:
    escrow = api.disputed("resolve-refund-all", amount="800")
    api.ok(f"/escrows/{escrow['id']}/resolution", _split(0, 800, 0), role="admin")
    assert sorted(row["action"] for row in api.outbox(escrow["id"])) == [
        "escrow.extend_deadline",
        "escrow.refund",
    ]


# --- the audit log --------------------------------------------------------------------------------


def test_a_staff_write_is_audited_with_who_what_and_the_request(api: Api) -> None:
    response = api.client.post(
        "/escrows",
        json=api.escrow_body("audited"),
        headers=bearer(api.keys["operator"], **{"X-Request-ID": "req-audited-1"}),
    )
    assert response.status_code == 201
    escrow = response.get_json()["escrow"]
    [row] = audit_rows(api.engine, f"escrow:{escrow['id']}")
    assert (row["actor"], row["role"], row["action"]) == (api.actor("operator"), "operator", "escrow.create")
    assert (row["before"], row["after"], row["request_id"]) == (None, escrow, "req-audited-1")
    # A decision and its approval record the resolution before and after.
    disputed = api.disputed("audited-dispute")
    decided = api.ok(f"/escrows/{disputed['id']}/resolution", _split(900_000, 100_000, 0))
    approved = api.ok(f"/resolutions/{decided['id']}/approve", role="admin", expect=200)
    [approval] = audit_rows(api.engine, f"resolution:{decided['id']}")
    assert (approval["before"], approval["after"]) == (decided, approved)
    actions = [r["action"] for r in audit_rows(api.engine, f"escrow:{disputed['id']}")]
    assert actions == ["escrow.create", "escrow.dispute", "escrow.resolve"]
