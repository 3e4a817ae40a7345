"""Escrows: creation (by staff, or by the buyer's signed request), funding instructions,
attestations, releases, disputes and their split resolutions, history.

Staff routes take an API key and are audited. Party routes take no key: the wallet's EIP-712
signature over the request (nonce and expiry included) is the authority, and a nonce is used
once. Attestations take no key either: the BLS signature of a registered attestor over the
escrow's delivery message is the authority, and an invalid one writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import marshmallow as ma
import sqlalchemy as sa
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from admin_api.auth import MANAGE_ROLES, POSTING_ROLES, READ_ROLES, current_actor, require_roles
from admin_api.errors import documents_problems
from admin_api.resources import (
    BaseUnits,
    Blueprint,
    StrictBoolean,
    StrictSchema,
    ledger_state,
    page_limit,
    signed_int,
)
from ledger import audit, custody
from ledger.audit import Actor, AuditRecord
from ledger.errors import InvalidInput
from ledger.escrow import attestation, disputes, party, service
from ledger.escrow.states import STATUSES
from ledger.money import UINT256_LIMIT
from workers import escrow_saga

blp = Blueprint("escrows", __name__, description="Escrows: create, fund, attest, release, dispute, resolve")

_APPROVE = keccak(text="approve(address,uint256)")[:4]
_FUND = keccak(text="fund(bytes32,address,uint256,uint64)")[:4]


class Hex(ma.fields.String):
    """Bytes as 0x-prefixed hex of an exact length."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        digits = text[2:] if text[:2] in ("0x", "0X") else text
        try:
            raw = bytes.fromhex(digits)
        except ValueError as exc:
            raise ma.ValidationError("must be hex") from exc
        if len(raw) != self.size:
            raise ma.ValidationError(f"must be {self.size} bytes")
        return raw


class Units(ma.fields.String):
    """Base units as a string of digits, 0 allowed (a part of a split), below 2^256."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not text.isascii() or not text.isdigit() or len(text) > 78:
            raise ma.ValidationError("must be a string of base-unit digits")
        amount = int(text)
        if amount >= UINT256_LIMIT:
            raise ma.ValidationError("must be below 2^256")
        return amount


def _seconds(value: datetime) -> None:
    if value.microsecond:
        raise ma.ValidationError("must be a whole second (the chain keeps seconds)")


class AttestorInSchema(StrictSchema):
    name = ma.fields.String(required=True, validate=ma.validate.Length(1, 100))
    pubkey = Hex(48, required=True, metadata={"description": "BLS12-381 public key (48 bytes, hex)"})
    proof_of_possession = Hex(96, required=True, metadata={"description": "PoP signature (96 bytes, hex)"})


class AttestorSchema(ma.Schema):
    id = ma.fields.Integer()
    name = ma.fields.String()
    pubkey = ma.fields.String()
    revoked = ma.fields.Boolean()


class EscrowInSchema(StrictSchema):
    key = ma.fields.String(required=True, validate=ma.validate.Length(1, 200))
    buyer = ma.fields.String(required=True)
    seller = ma.fields.String(required=True)
    amount = BaseUnits(required=True)
    fee_bps = ma.fields.Integer(strict=True, required=True, validate=ma.validate.Range(0, 10_000))
    deadline = ma.fields.AwareDateTime(required=True, validate=_seconds)
    delivery_ref = ma.fields.String(required=True, validate=ma.validate.Length(1, 256))
    attestors = ma.fields.List(
        ma.fields.Integer(strict=True), required=True, validate=ma.validate.Length(1, service.MAX_ATTESTORS)
    )
    threshold = ma.fields.Integer(strict=True, required=True)
    auto_release = StrictBoolean(load_default=True)


class EscrowSchema(ma.Schema):
    id = ma.fields.String()
    chain_id = ma.fields.Integer()
    contract = ma.fields.String()
    buyer = ma.fields.String()
    seller = ma.fields.String()
    amount = ma.fields.String()
    fee_bps = ma.fields.Integer()
    deadline = ma.fields.String()
    delivery_ref = ma.fields.String()
    threshold = ma.fields.Integer()
    attestor_ids = ma.fields.List(ma.fields.Integer())
    status = ma.fields.String()
    funded_amount = ma.fields.String()
    released_amount = ma.fields.String()
    fee_amount = ma.fields.String()
    refunded_amount = ma.fields.String()
    remaining = ma.fields.String()
    has_release_proof = ma.fields.Boolean()
    auto_release = ma.fields.Boolean()


class CallSchema(ma.Schema):
    to = ma.fields.String()
    function = ma.fields.String()
    args = ma.fields.List(ma.fields.Raw())
    data = ma.fields.String(metadata={"description": "The calldata, hex"})


class CreatedEscrowSchema(ma.Schema):
    escrow = ma.fields.Nested(EscrowSchema)
    funding = ma.fields.Dict(
        metadata={"description": "What the buyer sends to fund it: `approve` on the token, then `fund`"}
    )


class EscrowQuerySchema(StrictSchema):
    limit = page_limit()
    after = ma.fields.String(metadata={"description": "Continue after this escrow id"})
    status = ma.fields.String(validate=ma.validate.OneOf(STATUSES))
    party = ma.fields.String(metadata={"description": "Buyer or seller address"})
    deadline_before = ma.fields.AwareDateTime()
    deadline_after = ma.fields.AwareDateTime()


class EscrowPageSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(EscrowSchema))
    next = ma.fields.String(allow_none=True)


class AttestationInSchema(StrictSchema):
    attestor_id = ma.fields.Integer(strict=True, required=True, validate=ma.validate.Range(1, 2**63 - 1))
    signature = Hex(96, required=True, metadata={"description": "BLS signature of the delivery message"})


class AttestationSchema(ma.Schema):
    status = ma.fields.String(metadata={"description": "created, or exists for the same attestation again"})
    escrow_status = ma.fields.String()
    attestations = ma.fields.Integer()
    threshold = ma.fields.Integer()


class ReleaseInSchema(StrictSchema):
    amount = BaseUnits(metadata={"description": "Gross amount of this milestone (default: all that remains)"})


class ChainTxSchema(ma.Schema):
    key = ma.fields.String()
    status = ma.fields.String()


class DisputeInSchema(StrictSchema):
    reason = ma.fields.String(required=True, validate=ma.validate.Length(1, disputes.REASON_MAX_CHARS))


class DisputeSchema(ma.Schema):
    id = ma.fields.Integer()
    escrow_id = ma.fields.String()
    party = ma.fields.String()
    opened_by = ma.fields.String()
    reason = ma.fields.String()
    opened_at = ma.fields.String()
    closed_at = ma.fields.String(allow_none=True)


class SplitInSchema(StrictSchema):
    seller_amount = Units(required=True)
    buyer_amount = Units(required=True)
    fee = Units(required=True)


class ResolutionSchema(ma.Schema):
    id = ma.fields.Integer()
    escrow_id = ma.fields.String()
    dispute_id = ma.fields.Integer()
    seller_amount = ma.fields.String()
    buyer_amount = ma.fields.String()
    fee = ma.fields.String()
    decided_by = ma.fields.String()
    needs_approval = ma.fields.Boolean()
    approved_by = ma.fields.String(allow_none=True)
    status = ma.fields.String()


class SignedCreateSchema(StrictSchema):
    buyer = ma.fields.String(required=True, metadata={"description": "The buyer's address: the signer"})
    request = ma.fields.Dict(
        required=True,
        metadata={
            "description": "The CreateEscrow fields: key, seller, amount, feeBps, deadline, deliveryRef,"
            " attestors, threshold, autoRelease, nonce, expiry (integers as JSON numbers or strings)"
        },
    )
    signature = ma.fields.String(required=True, metadata={"description": "EIP-712 signature of the buyer"})


class SignedDisputeSchema(StrictSchema):
    request = ma.fields.Dict(
        required=True, metadata={"description": "The OpenDispute fields: escrowId, reason, nonce, expiry"}
    )
    signature = ma.fields.String(required=True, metadata={"description": "EIP-712 signature of a party"})


# -- helpers ---------------------------------------------------------------------------------


def _audit(conn: sa.Connection, actor: Actor, action: str, target: str, before: Any, after: Any) -> None:
    audit.record(conn, [AuditRecord(actor, action, target, before, after)])


def funding_calls(escrow: service.Escrow, token: str) -> dict[str, Any]:
    """The two calls the buyer makes to fund ``escrow``: approve the escrow contract on the token,
    then fund (the escrow id, seller, amount and deadline exactly as agreed)."""
    deadline = int(escrow.deadline.timestamp())
    approve = _APPROVE + encode(["address", "uint256"], [escrow.contract, escrow.amount])
    fund = _FUND + encode(
        ["bytes32", "address", "uint256", "uint64"],
        [bytes.fromhex(escrow.id[2:]), escrow.seller, escrow.amount, deadline],
    )
    return {
        "token": token,
        "approve": {
            "to": token,
            "function": "approve(address,uint256)",
            "args": [escrow.contract, str(escrow.amount)],
            "data": "0x" + approve.hex(),
        },
        "fund": {
            "to": escrow.contract,
            "function": "fund(bytes32,address,uint256,uint64)",
            "args": [escrow.id, escrow.seller, str(escrow.amount), deadline],
            "data": "0x" + fund.hex(),
        },
    }


def _created(escrow: service.Escrow, status: str) -> tuple[dict[str, Any], int]:
    token = ledger_state().deployment().token
    body = {"escrow": escrow.as_dict(), "funding": funding_calls(escrow, token)}
    return body, 201 if status == "created" else 200


def _fields(request: Mapping[str, Any], names: tuple[str, ...]) -> None:
    unknown = sorted(set(request) - set(names))
    missing = sorted(set(names) - set(request))
    if unknown or missing:
        raise InvalidInput(f"request fields: missing {missing}, unknown {unknown}")


_CREATE_FIELDS = (
    "key",
    "seller",
    "amount",
    "feeBps",
    "deadline",
    "deliveryRef",
    "attestors",
    "threshold",
    "autoRelease",
    "nonce",
    "expiry",
)


# -- attestors ----------------------------------------------------------------------------------


@blp.route("/attestors", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(409)
@blp.arguments(AttestorInSchema)
@blp.response(201, AttestorSchema, description="Registered")
@blp.alt_response(200, schema=AttestorSchema, description="The same attestor was registered already")
def register_attestor(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Register an attestor's BLS key; its proof of possession must verify (against rogue keys).

    400 for a key or proof that is not a valid point or does not verify; 409 `attestor_conflict`
    when the name or the key belongs to another attestor.
    """
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        attestor_id, status = service.register_attestor(
            conn, body["name"], body["pubkey"], body["proof_of_possession"]
        )
        out = {
            "id": attestor_id,
            "name": body["name"],
            "pubkey": "0x" + body["pubkey"].hex(),
            "revoked": False,
        }
        if status == "created":
            _audit(conn, actor, "attestor.register", f"attestor:{attestor_id}", None, out)
    return out, 201 if status == "created" else 200


@blp.route("/attestors", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.response(200, AttestorSchema(many=True))
def list_attestors() -> list[dict[str, Any]]:
    """Every registered attestor, revoked ones included."""
    with ledger_state().engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, name, pubkey, revoked_at IS NOT NULL AS revoked FROM escrow_attestors ORDER BY id"
            )
        ).all()
    return [
        {"id": r.id, "name": r.name, "pubkey": "0x" + bytes(r.pubkey).hex(), "revoked": r.revoked}
        for r in rows
    ]


@blp.route("/attestors/<int:attestor_id>/revoke", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404)
@blp.response(200, AttestorSchema)
def revoke_attestor(attestor_id: int) -> dict[str, Any]:
    """Revoke an attestor: its attestations stop counting towards thresholds not yet met."""
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        service.revoke_attestor(conn, attestor_id)
        row = conn.execute(
            sa.text("SELECT id, name, pubkey FROM escrow_attestors WHERE id = :id"), {"id": attestor_id}
        ).one()
        out = {"id": row.id, "name": row.name, "pubkey": "0x" + bytes(row.pubkey).hex(), "revoked": True}
        _audit(conn, actor, "attestor.revoke", f"attestor:{attestor_id}", None, out)
    return out


# -- escrows ------------------------------------------------------------------------------------


@blp.route("/escrows", methods=["POST"])
@require_roles(*POSTING_ROLES)
@documents_problems(404, 409, 503)
@blp.arguments(EscrowInSchema)
@blp.response(201, CreatedEscrowSchema, description="Created: the escrow and how the buyer funds it")
@blp.alt_response(200, schema=CreatedEscrowSchema, description="Created earlier under the same key")
def create_escrow(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Create an escrow on the platform's escrow contract; the escrow id derives from `key`.

    The same request again answers 200 with the same escrow; another request under the same key
    is 409 `idempotency_conflict`. Unknown or revoked attestors, a past deadline, a threshold
    above the number of attestors: 400.
    """
    actor = current_actor()
    state = ledger_state()
    deployment = state.deployment()
    new = service.NewEscrow(
        key=body["key"],
        chain_id=deployment.chain_id,
        contract=deployment.escrow,
        buyer=body["buyer"],
        seller=body["seller"],
        amount=body["amount"],
        fee_bps=body["fee_bps"],
        deadline=body["deadline"],
        delivery_ref=body["delivery_ref"],
        attestor_ids=tuple(body["attestors"]),
        threshold=body["threshold"],
        auto_release=body["auto_release"],
    )
    with state.engine.begin() as conn:
        escrow, status = service.create_escrow(conn, new, actor.actor)
        if status == "created":
            _audit(conn, actor, "escrow.create", f"escrow:{escrow.id}", None, escrow.as_dict())
    return _created(escrow, status)


@blp.route("/party/escrows", methods=["POST"])
@documents_problems(404, 409, 503)
@blp.arguments(SignedCreateSchema)
@blp.response(201, CreatedEscrowSchema, description="Created: the escrow and how the buyer funds it")
@blp.alt_response(200, schema=CreatedEscrowSchema, description="The same signed request again")
def create_escrow_signed(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A buyer creates an escrow with an EIP-712 `CreateEscrow` signature of their wallet (no API
    key); `buyer` names the wallet, and a signature by any other key (or over other terms) is
    400. The fee must be the platform's (`TRACE_ESCROW_FEE_BPS`). The same signed request again
    answers 200 with the same escrow; its nonce with any other request is 409 `nonce_replayed`;
    an expired request, a bad signature or bad fields are 400.
    """
    state = ledger_state()
    deployment = state.deployment()
    raw = body["request"]
    _fields(raw, _CREATE_FIELDS)
    attestors = raw["attestors"]
    if not isinstance(attestors, list):
        raise InvalidInput("request.attestors must be a list of attestor ids")
    request = party.CreateEscrowRequest(
        key=raw["key"],
        seller=raw["seller"],
        amount=signed_int(raw, "amount"),
        fee_bps=signed_int(raw, "feeBps"),
        deadline=signed_int(raw, "deadline"),
        delivery_ref=raw["deliveryRef"],
        attestors=tuple(signed_int({"a": a}, "a") for a in attestors),
        threshold=signed_int(raw, "threshold"),
        auto_release=raw["autoRelease"],
        nonce=signed_int(raw, "nonce"),
        expiry=signed_int(raw, "expiry"),
    )
    if request.fee_bps != state.settings.escrow_fee_bps:
        raise InvalidInput(f"feeBps must be the platform's fee, {state.settings.escrow_fee_bps}")
    now = datetime.now(UTC)
    buyer = party.require_signer(
        request,
        body["signature"],
        deployment.chain_id,
        deployment.escrow,
        custody.check_address(body["buyer"]),
        now,
    )
    new = service.NewEscrow(
        key=f"party:{buyer}:{request.key}",
        chain_id=deployment.chain_id,
        contract=deployment.escrow,
        buyer=buyer,
        seller=request.seller,
        amount=request.amount,
        fee_bps=request.fee_bps,
        deadline=service.deadline_from_unix(request.deadline),
        delivery_ref=request.delivery_ref,
        attestor_ids=request.attestors,
        threshold=request.threshold,
        auto_release=request.auto_release,
    )
    digest = request.digest(deployment.chain_id, deployment.escrow)
    with state.engine.begin() as conn:
        earlier = party.use_nonce(conn, buyer, request.nonce, "escrow.create", digest, new.escrow_id)
        if earlier is not None:
            return _created(service.get_escrow(conn, earlier), "exists")
        escrow, status = service.create_escrow(conn, new, f"party:{buyer}")
    return _created(escrow, status)


@blp.route("/escrows", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.arguments(EscrowQuerySchema, location="query")
@blp.response(200, EscrowPageSchema)
def list_escrows(query: dict[str, Any]) -> dict[str, Any]:
    """Escrows by id, filtered by status, party (buyer or seller) and deadline range; pass `next`
    back as `after` for the next page."""
    limit: int = query["limit"]
    with ledger_state().engine.connect() as conn:
        found = service.list_escrows(
            conn,
            status=query.get("status"),
            party=query.get("party"),
            deadline_before=query.get("deadline_before"),
            deadline_after=query.get("deadline_after"),
            after_id=query.get("after"),
            limit=limit + 1,
        )
    page = found[:limit]
    return {"items": [e.as_dict() for e in page], "next": page[-1].id if len(found) > limit else None}


def _escrow_id(escrow_id: str) -> str:
    lowered = escrow_id.lower()
    if (
        len(lowered) != 66
        or not lowered.startswith("0x")
        or any(c not in "0123456789abcdef" for c in lowered[2:])
    ):
        raise InvalidInput("an escrow id is 0x and 64 hex digits")
    return lowered


@blp.route("/escrows/<escrow_id>", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200, EscrowSchema)
def get_escrow(escrow_id: str) -> dict[str, Any]:
    """One escrow: its terms, status and the amounts funded, released, charged and refunded."""
    with ledger_state().engine.connect() as conn:
        return service.get_escrow(conn, _escrow_id(escrow_id)).as_dict()


@blp.route("/escrows/<escrow_id>/history", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200)
def escrow_history(escrow_id: str) -> dict[str, Any]:
    """Everything that happened to the escrow: moves, attestations, disputes, resolutions, the
    chain transactions sent for it and the ledger lines of its account."""
    with ledger_state().engine.connect() as conn:
        return disputes.full_history(conn, _escrow_id(escrow_id))


@blp.route("/escrows/<escrow_id>/attestations", methods=["POST"])
@documents_problems(404, 409)
@blp.arguments(AttestationInSchema)
@blp.response(201, AttestationSchema, description="Recorded")
@blp.alt_response(200, schema=AttestationSchema, description="The same attestation again")
def attest(body: dict[str, Any], escrow_id: str) -> tuple[dict[str, Any], int]:
    """An attestor's BLS signature of the escrow's delivery message (no API key: the signature of
    a registered attestor of the escrow's policy is the authority). When the threshold is met the
    aggregate is verified and stored; an escrow that releases by itself starts releasing.

    400 for a signature that does not verify, an attestor outside the policy or revoked; 409
    `escrow_not_attestable` when the escrow takes no attestations now.
    """
    state = ledger_state()
    deployment = state.deployment()
    verifier = attestation.verifier(state.settings.bls_verifier)
    with state.engine.begin() as conn:
        outcome = escrow_saga.attest(
            conn,
            deployment,
            _escrow_id(escrow_id),
            body["attestor_id"],
            body["signature"],
            verifier,
            f"attestor:{body['attestor_id']}",
        )
    out = {
        "status": outcome.status,
        "escrow_status": outcome.escrow_status,
        "attestations": outcome.attestations,
        "threshold": outcome.threshold,
    }
    return out, 201 if outcome.status == "created" else 200


@blp.route("/escrows/<escrow_id>/releases", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404, 409)
@blp.arguments(ReleaseInSchema, required=False)
@blp.response(202, ChainTxSchema, description="The release is on its way to the chain")
def release(body: dict[str, Any], escrow_id: str) -> tuple[dict[str, Any], int]:
    """Release a delivery-confirmed escrow: `amount` for a milestone, or all that remains. The
    fee is charged on it; the escrow returns to `delivery_confirmed` while funds remain.

    409 `escrow_transition_refused` unless delivery is confirmed; 400 for an amount above what
    the escrow holds or too small to pay the seller after the fee.
    """
    actor = current_actor()
    state = ledger_state()
    escrow_id = _escrow_id(escrow_id)
    with state.engine.begin() as conn:
        row = escrow_saga.enqueue_release(
            conn, state.deployment(), escrow_id, actor.actor, body.get("amount")
        )
        _audit(conn, actor, "escrow.release", f"escrow:{escrow_id}", None, {"outbox": row.key})
    return {"key": row.key, "status": row.status}, 202


@blp.route("/escrows/<escrow_id>/dispute", methods=["POST"])
@require_roles(*POSTING_ROLES)
@documents_problems(404, 409)
@blp.arguments(DisputeInSchema)
@blp.response(201, DisputeSchema, description="Opened: the escrow is frozen")
@blp.alt_response(200, schema=DisputeSchema, description="A dispute is open already")
def open_dispute(body: dict[str, Any], escrow_id: str) -> tuple[dict[str, Any], int]:
    """Staff open a dispute before the release. The escrow freezes: the deadline sweep leaves it,
    and the arbiter extends its deadline on chain by `TRACE_ESCROW_DISPUTE_EXTENSION_S`."""
    actor = current_actor()
    return _dispute(_escrow_id(escrow_id), "staff", body["reason"], actor.actor, actor)


def _dispute(
    escrow_id: str, who: str, reason: str, actor_name: str, actor: Actor | None
) -> tuple[dict[str, Any], int]:
    state = ledger_state()
    with state.engine.begin() as conn:
        dispute, status = _open(conn, escrow_id, who, reason, actor_name)
        if actor is not None and status == "created":
            _audit(conn, actor, "escrow.dispute", f"escrow:{escrow_id}", None, dispute.as_dict())
    return dispute.as_dict(), 201 if status == "created" else 200


def _open(
    conn: sa.Connection, escrow_id: str, who: str, reason: str, actor_name: str
) -> tuple[disputes.Dispute, str]:
    state = ledger_state()
    return escrow_saga.open_dispute(
        conn,
        state.deployment(),
        escrow_id,
        who,
        reason,
        actor_name,
        state.settings.escrow_dispute_extension_s,
    )


@blp.route("/party/escrows/<escrow_id>/dispute", methods=["POST"])
@documents_problems(404, 409)
@blp.arguments(SignedDisputeSchema)
@blp.response(201, DisputeSchema, description="Opened: the escrow is frozen")
@blp.alt_response(200, schema=DisputeSchema, description="The same signed request again, or already open")
def open_dispute_signed(body: dict[str, Any], escrow_id: str) -> tuple[dict[str, Any], int]:
    """The buyer or the seller opens a dispute with an EIP-712 `OpenDispute` signature (no API
    key). A signature by anyone else, or for another escrow, is 400; a replayed nonce 409."""
    state = ledger_state()
    deployment = state.deployment()
    escrow_id = _escrow_id(escrow_id)
    raw = body["request"]
    _fields(raw, ("escrowId", "reason", "nonce", "expiry"))
    request = party.OpenDisputeRequest(
        escrow_id=raw["escrowId"],
        reason=raw["reason"],
        nonce=signed_int(raw, "nonce"),
        expiry=signed_int(raw, "expiry"),
    )
    if request.escrow_id != escrow_id:
        raise InvalidInput("the signed request names another escrow")
    signer = party.recover_signer(
        request, body["signature"], deployment.chain_id, deployment.escrow, datetime.now(UTC)
    )
    digest = request.digest(deployment.chain_id, deployment.escrow)
    with state.engine.begin() as conn:
        escrow = service.get_escrow(conn, escrow_id)
        roles = {escrow.buyer: "buyer", escrow.seller: "seller"}
        if signer not in roles:
            raise InvalidInput("the request is not signed by the escrow's buyer or seller")
        earlier = party.use_nonce(conn, signer, request.nonce, "escrow.dispute", digest, escrow_id)
        if earlier is not None:
            # The same signed request again: the dispute it opened (with the nonce, in one commit).
            return disputes.disputes_of(conn, escrow_id)[-1].as_dict(), 200
        dispute, status = _open(conn, escrow_id, roles[signer], request.reason, f"party:{signer}")
    return dispute.as_dict(), 201 if status == "created" else 200


@blp.route("/escrows/<escrow_id>/resolution", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404, 409)
@blp.arguments(SplitInSchema)
@blp.response(201, ResolutionSchema, description="Decided (carried out at once or awaiting approval)")
@blp.alt_response(200, schema=ResolutionSchema, description="The same decision again")
def resolve(body: dict[str, Any], escrow_id: str) -> tuple[dict[str, Any], int]:
    """Finance splits a disputed escrow: seller, buyer and fee parts adding up to all it holds.
    A split above `TRACE_ESCROW_APPROVAL_ABOVE` waits (`awaiting_approval`) for another finance
    user; otherwise the chain carries it out at once by a release and a refund.
    """
    actor = current_actor()
    state = ledger_state()
    escrow_id = _escrow_id(escrow_id)
    with state.engine.begin() as conn:
        resolution, status = escrow_saga.decide_split(
            conn,
            state.deployment(),
            escrow_id,
            body["seller_amount"],
            body["buyer_amount"],
            body["fee"],
            actor.actor,
            state.settings.escrow_approval_above,
        )
        if status == "created":
            _audit(conn, actor, "escrow.resolve", f"escrow:{escrow_id}", None, resolution.as_dict())
    return resolution.as_dict(), 201 if status == "created" else 200


@blp.route("/resolutions/<int:resolution_id>/approve", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404, 409)
@blp.response(200, ResolutionSchema)
def approve(resolution_id: int) -> dict[str, Any]:
    """A second finance user approves a split awaiting approval; the chain then carries it out.
    409 `four_eyes` for the user who decided it."""
    actor = current_actor()
    state = ledger_state()
    with state.engine.begin() as conn:
        before = disputes.get_resolution(conn, resolution_id).as_dict()
        resolution, status = escrow_saga.approve_split(conn, state.deployment(), resolution_id, actor.actor)
        if status == "created":
            _audit(conn, actor, "escrow.approve", f"resolution:{resolution_id}", before, resolution.as_dict())
    return resolution.as_dict()
