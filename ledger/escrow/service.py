"""Escrows: creation, funding from the chain, moves through the state machine, history.

Every move goes through :func:`move`, which checks the state machine's table, locks the row and
appends the history in the caller's transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from ledger import accounts, custody, exceptions_queue
from ledger.commands import ChainRef, Leg, NewEntry, check_key
from ledger.errors import Conflict, InvalidInput, NotFound
from ledger.escrow import attestation
from ledger.escrow.states import MOVES, check_move
from ledger.money import check_amount

ESCROW_KINDS = "liability"
MAX_ATTESTORS = 32


def escrow_account(escrow_id: str) -> str:
    """The liability account of what the escrow contract holds for escrow ``escrow_id``."""
    return f"escrow:{escrow_id}"


def escrow_id_for(key: str) -> str:
    """The on-chain id (bytes32) of the escrow created under idempotency ``key``: a retry of the
    same creation names the same escrow."""
    check_key(key)
    return "0x" + hashlib.sha256(f"tracechain-escrow:{key}".encode()).hexdigest()


_OUTSIDE_CALENDAR = "deadline is outside the calendar (years 1 to 9999 in UTC)"


def utc_deadline(deadline: datetime) -> datetime:
    """``deadline`` in UTC; one that leaves the calendar once in UTC (year 1 or 9999 with an
    offset) is bad input, not a crash."""
    try:
        return deadline.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidInput(_OUTSIDE_CALENDAR) from None


def deadline_from_unix(seconds: int) -> datetime:
    """A deadline given in Unix seconds (as the chain keeps it), refused when beyond the calendar."""
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError):
        raise InvalidInput(_OUTSIDE_CALENDAR) from None


@dataclass(frozen=True, slots=True)
class NewEscrow:
    """What the creator asks for; validated when built."""

    key: str
    chain_id: int
    contract: str
    buyer: str
    seller: str
    amount: int
    fee_bps: int
    deadline: datetime
    delivery_ref: str
    attestor_ids: tuple[int, ...]
    threshold: int
    auto_release: bool = True

    def __post_init__(self) -> None:
        check_key(self.key)
        if not isinstance(self.auto_release, bool):
            raise InvalidInput("auto_release must be true or false")
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise InvalidInput("chain_id must be a positive integer")
        for name in ("contract", "buyer", "seller"):
            object.__setattr__(self, name, custody.check_address(getattr(self, name), name))
        if self.buyer == self.seller:
            raise InvalidInput("the buyer and the seller must be different addresses")
        if custody.ZERO_ADDRESS in (self.buyer, self.seller):
            raise InvalidInput("the buyer and the seller must not be the zero address")
        check_amount(self.amount)
        if (
            isinstance(self.fee_bps, bool)
            or not isinstance(self.fee_bps, int)
            or not 0 <= self.fee_bps <= 10_000
        ):
            raise InvalidInput("fee_bps must be an integer from 0 to 10000")
        if not isinstance(self.deadline, datetime) or self.deadline.tzinfo is None:
            raise InvalidInput("deadline must be a timestamp with a time zone")
        if self.deadline.microsecond:
            raise InvalidInput("deadline must be a whole second (the chain keeps seconds)")
        object.__setattr__(self, "deadline", utc_deadline(self.deadline))
        if not isinstance(self.delivery_ref, str) or not 1 <= len(self.delivery_ref) <= 256:
            raise InvalidInput("delivery_ref must be 1 to 256 characters")
        if not self.delivery_ref.isprintable():
            raise InvalidInput("delivery_ref must be printable text")
        ids = self.attestor_ids
        if not isinstance(ids, tuple) or not ids or len(ids) > MAX_ATTESTORS:
            raise InvalidInput(f"an escrow needs 1 to {MAX_ATTESTORS} attestors")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
            raise InvalidInput("attestor ids must be distinct integers")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise InvalidInput("threshold must be an integer")
        if not 1 <= self.threshold <= len(ids):
            raise InvalidInput(f"threshold must be between 1 and the number of attestors ({len(ids)})")

    @property
    def escrow_id(self) -> str:
        return escrow_id_for(self.key)


@dataclass(frozen=True, slots=True)
class Escrow:
    id: str
    chain_id: int
    contract: str
    buyer: str
    seller: str
    amount: int
    fee_bps: int
    deadline: datetime
    delivery_ref: str
    threshold: int
    attestor_ids: tuple[int, ...]
    status: str
    funded_amount: int
    released_amount: int
    fee_amount: int
    refunded_amount: int
    has_release_proof: bool
    auto_release: bool

    @property
    def remaining(self) -> int:
        """What the contract still holds for this escrow."""
        return self.funded_amount - self.released_amount - self.fee_amount - self.refunded_amount

    def fee_for(self, amount: int) -> int:
        """The platform's fee on a release of ``amount``: rounded up (charges favour solvency)."""
        return -(-amount * self.fee_bps // 10_000)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "chain_id": self.chain_id,
            "contract": self.contract,
            "buyer": self.buyer,
            "seller": self.seller,
            "amount": str(self.amount),
            "fee_bps": self.fee_bps,
            "deadline": self.deadline.isoformat(),
            "delivery_ref": self.delivery_ref,
            "threshold": self.threshold,
            "attestor_ids": list(self.attestor_ids),
            "status": self.status,
            "funded_amount": str(self.funded_amount),
            "released_amount": str(self.released_amount),
            "fee_amount": str(self.fee_amount),
            "refunded_amount": str(self.refunded_amount),
            "remaining": str(self.remaining),
            "has_release_proof": self.has_release_proof,
            "auto_release": self.auto_release,
        }


_SELECT = (
    "SELECT e.id, e.chain_id, e.contract, e.buyer, e.seller, e.amount, e.fee_bps, e.deadline,"
    " e.delivery_ref, e.threshold, e.status, e.funded_amount, e.released_amount, e.fee_amount,"
    " e.refunded_amount, e.release_proof IS NOT NULL AS has_proof, e.auto_release,"
    " ARRAY(SELECT p.attestor_id FROM escrow_policy p WHERE p.escrow_id = e.id ORDER BY p.attestor_id)"
    " AS attestor_ids FROM escrows e"
)


def _from_row(r: Any) -> Escrow:
    return Escrow(
        r.id,
        r.chain_id,
        r.contract,
        r.buyer,
        r.seller,
        int(r.amount),
        r.fee_bps,
        r.deadline,
        r.delivery_ref,
        r.threshold,
        tuple(r.attestor_ids),
        r.status,
        int(r.funded_amount),
        int(r.released_amount),
        int(r.fee_amount),
        int(r.refunded_amount),
        bool(r.has_proof),
        bool(r.auto_release),
    )


def get_escrow(conn: sa.Connection, escrow_id: str, *, for_update: bool = False) -> Escrow:
    row = conn.execute(
        sa.text(_SELECT + " WHERE e.id = :id" + (" FOR UPDATE OF e" if for_update else "")), {"id": escrow_id}
    ).first()
    if row is None:
        raise NotFound("escrow_not_found", f"no escrow {escrow_id}")
    return _from_row(row)


def create_escrow(conn: sa.Connection, new: NewEscrow, actor: str) -> tuple[Escrow, accounts.Created]:
    """Create the escrow and its ledger account; the same request again reports ``exists``,
    another request under the same key is an idempotency conflict."""
    escrow_id = new.escrow_id
    known = conn.execute(sa.text("SELECT 1 FROM escrows WHERE id = :id"), {"id": escrow_id}).first()
    if known is not None:
        existing = get_escrow(conn, escrow_id)
        if not _same(existing, new):
            raise Conflict("idempotency_conflict", f"escrow key {new.key!r} was used for another escrow")
        return existing, "exists"
    usable = conn.execute(
        sa.text("SELECT id FROM escrow_attestors WHERE id = ANY(:ids) AND revoked_at IS NULL"),
        {"ids": list(new.attestor_ids)},
    ).scalars()
    missing = sorted(set(new.attestor_ids) - set(usable))
    if missing:
        raise InvalidInput(f"attestors {missing} are not registered or are revoked")
    if new.deadline <= datetime.now(UTC):
        raise InvalidInput("the deadline must be in the future")
    custody.ensure_chart(conn, new.chain_id, ())
    # Never more paid out of the escrow's account than was funded into it, holds included.
    accounts.create_account(
        conn, escrow_account(escrow_id), custody.TOKEN_ASSET, "liability", ["debits_must_not_exceed_credits"]
    )
    accounts.create_account(conn, fees_account(), custody.TOKEN_ASSET, "revenue")
    conn.execute(
        sa.text(
            "INSERT INTO escrows (id, chain_id, contract, buyer, seller, amount, fee_bps, deadline,"
            " delivery_ref, threshold, auto_release, created_by) VALUES (:id, :chain_id, :contract, :buyer,"
            " :seller, :amount, :fee_bps, :deadline, :delivery_ref, :threshold, :auto, :actor)"
        ),
        {
            "id": escrow_id,
            "chain_id": new.chain_id,
            "contract": new.contract,
            "buyer": new.buyer,
            "seller": new.seller,
            "amount": new.amount,
            "fee_bps": new.fee_bps,
            "deadline": new.deadline,
            "delivery_ref": new.delivery_ref,
            "threshold": new.threshold,
            "auto": new.auto_release,
            "actor": actor,
        },
    )
    conn.execute(
        sa.text(
            "INSERT INTO escrow_policy (escrow_id, attestor_id) SELECT :id, unnest(CAST(:ids AS bigint[]))"
        ),
        {"id": escrow_id, "ids": list(new.attestor_ids)},
    )
    _history(conn, escrow_id, None, "awaiting_funding", "created", actor, {"key": new.key})
    return get_escrow(conn, escrow_id), "created"


def _same(existing: Escrow, new: NewEscrow) -> bool:
    return (
        existing.chain_id == new.chain_id
        and existing.contract == new.contract
        and existing.buyer == new.buyer
        and existing.seller == new.seller
        and existing.amount == new.amount
        and existing.fee_bps == new.fee_bps
        and existing.deadline == new.deadline
        and existing.delivery_ref == new.delivery_ref
        and existing.threshold == new.threshold
        and existing.auto_release == new.auto_release
        and existing.attestor_ids == tuple(sorted(new.attestor_ids))
    )


def _history(
    conn: sa.Connection,
    escrow_id: str,
    from_status: str | None,
    to_status: str,
    reason: str,
    actor: str,
    details: Mapping[str, Any],
) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO escrow_history (escrow_id, from_status, to_status, reason, actor, details)"
            " VALUES (:id, :f, :t, :r, :a, CAST(:d AS jsonb))"
        ),
        {
            "id": escrow_id,
            "f": from_status,
            "t": to_status,
            "r": reason,
            "a": actor,
            "d": json.dumps(dict(details), sort_keys=True, default=str),
        },
    )


def move(
    conn: sa.Connection,
    escrow_id: str,
    wanted: str,
    actor: str,
    details: Mapping[str, Any] | None = None,
    **changes: Any,
) -> Escrow:
    """Move the escrow to ``wanted`` if the table allows it from its current status (row locked),
    applying ``changes`` to its columns; the history records the move and why."""
    current = get_escrow(conn, escrow_id, for_update=True)
    reason = check_move(escrow_id, current.status, wanted)
    allowed = {"funded_amount", "released_amount", "fee_amount", "refunded_amount", "deadline"}
    if set(changes) - allowed:
        raise ValueError(f"cannot change {sorted(set(changes) - allowed)} of an escrow")
    assignments = "".join(f", {name} = :{name}" for name in sorted(changes))
    conn.execute(
        sa.text(f"UPDATE escrows SET status = :status, updated_at = now(){assignments} WHERE id = :id"),
        {"status": wanted, "id": escrow_id, **changes},
    )
    _history(conn, escrow_id, current.status, wanted, reason, actor, details or {})
    # The row is locked: what it now holds is what was read plus what was written.
    return replace(current, status=wanted, **changes)


def history(conn: sa.Connection, escrow_id: str) -> list[dict[str, Any]]:
    """Every move of the escrow, oldest first."""
    get_escrow(conn, escrow_id)
    rows = conn.execute(
        sa.text(
            "SELECT from_status, to_status, reason, actor, details, at FROM escrow_history"
            " WHERE escrow_id = :id ORDER BY id"
        ),
        {"id": escrow_id},
    ).mappings()
    return [dict(r) for r in rows]


# -- the chain's escrow events --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Funding:
    """A confirmed ``Funded`` event of the escrow contract."""

    chain: ChainRef
    contract: str
    escrow_id: str
    buyer: str
    seller: str
    amount: int
    deadline: datetime


def funding_account(conn: sa.Connection, funding: Funding) -> str | None:
    """The ledger account that owns tokens funded into ``funding.escrow_id``: the escrow's own
    account when we know the escrow on that contract, else None (suspense)."""
    row = conn.execute(
        sa.text("SELECT 1 FROM escrows WHERE id = :id AND contract = :c AND chain_id = :chain"),
        {"id": funding.escrow_id, "c": funding.contract, "chain": funding.chain.chain_id},
    ).first()
    return None if row is None else escrow_account(funding.escrow_id)


def _event_key(kind: str, chain: ChainRef) -> str:
    return f"{kind}:{chain.chain_id}:{chain.tx_hash}:{chain.log_index}"


def _applied(conn: sa.Connection, escrow_id: str, event_key: str) -> bool:
    """Whether the escrow's history already holds the effect of the chain event ``event_key``."""
    row = conn.execute(
        sa.text(
            "SELECT count(*) FILTER (WHERE details->>'event' = :key)"
            " > count(*) FILTER (WHERE details->>'undone' = :key) FROM escrow_history"
            " WHERE escrow_id = :id AND (details->>'event' = :key OR details->>'undone' = :key)"
        ),
        {"id": escrow_id, "key": event_key},
    ).scalar_one()
    return bool(row)


def record_funding(conn: sa.Connection, funding: Funding) -> str:
    """Apply a confirmed funding to its escrow: ``funded`` when it matches what was agreed, else
    ``funding_exception`` with an exception for finance; an unknown escrow raises one too.
    Returns the resulting status (or ``unknown``). Safe to run twice for the same event."""
    key = _event_key("escrow_funding", funding.chain)
    account = funding_account(conn, funding)
    details = {
        "escrow_id": funding.escrow_id,
        "buyer": funding.buyer,
        "seller": funding.seller,
        "amount": str(funding.amount),
        "deadline": funding.deadline.isoformat(),
    }
    if account is None:
        exceptions_queue.open_exception(conn, key, "escrow_funding_unknown", details, chain=funding.chain)
        return "unknown"
    escrow = get_escrow(conn, funding.escrow_id, for_update=True)
    if _applied(conn, escrow.id, key):
        return escrow.status
    problems = _funding_problems(escrow, funding)
    actor = f"chain:{funding.chain.chain_id}"
    event = {**details, "event": key}
    if escrow.status != "awaiting_funding":
        problems.append(f"the escrow is {escrow.status}, not awaiting funding")
    if problems:
        exceptions_queue.open_exception(
            conn, key, "escrow_funding_mismatch", {**details, "problems": problems}, chain=funding.chain
        )
        conn.execute(
            sa.text(
                "UPDATE escrows SET funded_amount = funded_amount + :a, updated_at = now() WHERE id = :id"
            ),
            {"a": funding.amount, "id": escrow.id},
        )
        if escrow.status == "awaiting_funding":
            return move(conn, escrow.id, "funding_exception", actor, {**event, "problems": problems}).status
        _history(
            conn, escrow.id, escrow.status, escrow.status, "funding after the escrow was funded", actor, event
        )
        return escrow.status
    return move(
        conn, escrow.id, "funded", actor, event, funded_amount=escrow.funded_amount + funding.amount
    ).status


def _funding_problems(escrow: Escrow, funding: Funding) -> list[str]:
    problems = []
    if funding.amount < escrow.amount:
        problems.append(f"underfunded: {funding.amount} of {escrow.amount}")
    if funding.amount > escrow.amount:
        problems.append(f"overfunded: {funding.amount} for {escrow.amount}")
    if funding.buyer != escrow.buyer:
        problems.append(f"funded by {funding.buyer}, not the buyer {escrow.buyer}")
    if funding.seller != escrow.seller:
        problems.append(f"names seller {funding.seller}, not {escrow.seller}")
    if funding.deadline != escrow.deadline:
        problems.append("the on-chain deadline differs from the agreed one")
    return problems


def list_escrows(
    conn: sa.Connection,
    *,
    status: str | None = None,
    party: str | None = None,
    deadline_before: datetime | None = None,
    deadline_after: datetime | None = None,
    auto_release: bool | None = None,
    after_id: str | None = None,
    limit: int = 100,
) -> Sequence[Escrow]:
    """Escrows filtered by status, party (buyer or seller) and deadline; keyset pages by id."""
    party_address = None if party is None else custody.check_address(party, "party")
    rows = conn.execute(
        sa.text(
            _SELECT + " WHERE (CAST(:status AS text) IS NULL OR e.status = :status)"
            " AND (CAST(:party AS text) IS NULL OR e.buyer = :party OR e.seller = :party)"
            " AND (CAST(:before AS timestamptz) IS NULL OR e.deadline < :before)"
            " AND (CAST(:since AS timestamptz) IS NULL OR e.deadline >= :since)"
            " AND (CAST(:auto AS boolean) IS NULL OR e.auto_release = :auto)"
            " AND (CAST(:after AS text) IS NULL OR e.id > :after)"
            " ORDER BY e.id LIMIT :limit"
        ),
        {
            "status": status,
            "party": party_address,
            "before": deadline_before,
            "since": deadline_after,
            "auto": auto_release,
            "after": after_id,
            "limit": limit,
        },
    ).all()
    return [_from_row(r) for r in rows]


# -- attestors and attestations -------------------------------------------------------------


def register_attestor(
    conn: sa.Connection, name: str, pubkey: bytes, proof_of_possession: bytes
) -> tuple[int, accounts.Created]:
    """Register an attestor's BLS key after checking its proof of possession (against rogue keys).
    The same name and key again report ``exists``; a key or name already taken otherwise conflicts."""
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not name.isprintable():
        raise InvalidInput("an attestor name must be 1 to 100 printable characters")
    attestation.check_public_key(pubkey, proof_of_possession)
    row = conn.execute(
        sa.text(
            "INSERT INTO escrow_attestors (name, pubkey, proof_of_possession) VALUES (:n, :pk, :pop)"
            " ON CONFLICT DO NOTHING RETURNING id"
        ),
        {"n": name, "pk": pubkey, "pop": proof_of_possession},
    ).first()
    if row is not None:
        return int(row.id), "created"
    existing = conn.execute(
        sa.text("SELECT id, name, pubkey FROM escrow_attestors WHERE name = :n OR pubkey = :pk"),
        {"n": name, "pk": pubkey},
    ).all()
    if len(existing) == 1 and existing[0].name == name and bytes(existing[0].pubkey) == pubkey:
        return int(existing[0].id), "exists"
    raise Conflict("attestor_conflict", "that attestor name or public key is registered already")


def revoke_attestor(conn: sa.Connection, attestor_id: int) -> None:
    """Revoke an attestor: its attestations no longer count towards a threshold not yet met."""
    row = conn.execute(
        sa.text(
            "UPDATE escrow_attestors SET revoked_at = COALESCE(revoked_at, now()) WHERE id = :id RETURNING id"
        ),
        {"id": attestor_id},
    ).first()
    if row is None:
        raise NotFound("attestor_not_found", f"no attestor {attestor_id}")


def delivery_message_of(escrow: Escrow) -> bytes:
    """What the escrow's attestors sign."""
    return attestation.delivery_message(
        escrow.chain_id, escrow.contract, escrow.id, escrow.delivery_ref, escrow.amount
    )


@dataclass(frozen=True, slots=True)
class AttestOutcome:
    status: accounts.Created
    escrow_status: str
    attestations: int
    threshold: int
    auto_release: bool  # the escrow's term: its release starts once delivery is confirmed


def attest(
    conn: sa.Connection,
    escrow_id: str,
    attestor_id: int,
    signature: bytes,
    verifier: attestation.Verifier,
    actor: str,
) -> AttestOutcome:
    """Record one attestor's signature of the delivery; when the policy's threshold of valid,
    unrevoked attestations is met, verify the aggregate and store it as the release proof, moving
    the escrow to ``delivery_confirmed``. The same attestation again reports ``exists``."""
    escrow = get_escrow(conn, escrow_id, for_update=True)
    if attestor_id not in escrow.attestor_ids:
        raise InvalidInput(f"attestor {attestor_id} is not in the policy of escrow {escrow_id}")
    key = conn.execute(
        sa.text("SELECT pubkey, revoked_at IS NOT NULL AS revoked FROM escrow_attestors WHERE id = :id"),
        {"id": attestor_id},
    ).one()
    if key.revoked:
        raise InvalidInput(f"attestor {attestor_id} is revoked")
    message = delivery_message_of(escrow)
    if not verifier.verify(bytes(key.pubkey), message, signature):
        raise InvalidInput(f"the signature of attestor {attestor_id} does not verify for this delivery")
    previous = conn.execute(
        sa.text("SELECT signature FROM escrow_attestations WHERE escrow_id = :e AND attestor_id = :a"),
        {"e": escrow_id, "a": attestor_id},
    ).first()
    status: accounts.Created = "exists"
    if previous is None:
        if escrow.status != "funded":
            raise Conflict(
                "escrow_not_attestable", f"escrow {escrow_id} is {escrow.status}; it takes no attestations"
            )
        conn.execute(
            sa.text(
                "INSERT INTO escrow_attestations (escrow_id, attestor_id, signature) VALUES (:e, :a, :s)"
            ),
            {"e": escrow_id, "a": attestor_id, "s": signature},
        )
        status = "created"
    counted = conn.execute(
        sa.text(
            "SELECT s.attestor_id, k.pubkey, s.signature FROM escrow_attestations s"
            " JOIN escrow_attestors k ON k.id = s.attestor_id"
            " WHERE s.escrow_id = :e AND k.revoked_at IS NULL ORDER BY s.attestor_id"
        ),
        {"e": escrow_id},
    ).all()
    current = escrow  # locked since it was read; recording an attestation does not change it
    if current.status == "funded" and len(counted) >= escrow.threshold:
        # Each stored attestation was verified when it was recorded (this one just now), and
        # neither a key nor a signature can change since: only the aggregate is checked here.
        signers = {f"{r.attestor_id:020d}": (bytes(r.pubkey), bytes(r.signature)) for r in counted}
        proof = attestation.release_proof(
            message, signers, escrow.threshold, verifier, verified=frozenset(signers)
        )
        conn.execute(
            sa.text("UPDATE escrows SET release_proof = :p, proof_signers = :s WHERE id = :id"),
            {"p": proof.aggregate_signature, "s": [str(int(s)) for s in proof.signers], "id": escrow_id},
        )
        current = move(
            conn, escrow_id, "delivery_confirmed", actor, {"signers": [int(s) for s in proof.signers]}
        )
    return AttestOutcome(status, current.status, len(counted), escrow.threshold, escrow.auto_release)


# -- the release saga --------------------------------------------------------------------------


def fees_account() -> str:
    """Revenue from escrow fees."""
    return "fees:revenue"


def release_holds(escrow: Escrow, key: str, chain_id: int, to_seller: int, fee: int) -> tuple[NewEntry, ...]:
    """The holds of a release under ``key``: the seller's part through the outbox clearing
    account (which the chain's transfer then settles), the fee to revenue."""
    holds = []
    if to_seller:
        holds.append(
            NewEntry(
                f"{key}:seller",
                (
                    Leg(
                        escrow_account(escrow.id),
                        custody.clearing_code(chain_id),
                        to_seller,
                        custody.TOKEN_ASSET,
                        True,
                    ),
                ),
                kind="escrow.release",
                metadata={"escrow_id": escrow.id, "seller": escrow.seller},
            )
        )
    if fee:
        holds.append(
            NewEntry(
                f"{key}:fee",
                (Leg(escrow_account(escrow.id), fees_account(), fee, custody.TOKEN_ASSET, True),),
                kind="escrow.fee",
                metadata={"escrow_id": escrow.id},
            )
        )
    return tuple(holds)


def refund_hold(escrow: Escrow, key: str, chain_id: int, amount: int) -> NewEntry:
    """The hold of a refund of ``amount`` to the buyer under ``key``."""
    return NewEntry(
        f"{key}:buyer",
        (Leg(escrow_account(escrow.id), custody.clearing_code(chain_id), amount, custody.TOKEN_ASSET, True),),
        kind="escrow.refund",
        metadata={"escrow_id": escrow.id, "buyer": escrow.buyer},
    )


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    """What one release pays: ``to_seller + fee`` out of the escrow, under ``key``."""

    escrow: Escrow
    key: str
    to_seller: int
    fee: int
    holds: tuple[NewEntry, ...]


def plan_release(
    conn: sa.Connection, escrow_id: str, chain_id: int, amount: int | None = None
) -> ReleasePlan:
    """Lock a delivery-confirmed escrow and plan the release of ``amount`` (all that remains when
    None): the fee is charged on it rounded up, the seller gets the rest. The holds reserve the
    escrow's funds for the seller (through the outbox clearing account, which the chain's transfer
    then settles) and for the fee revenue."""
    escrow = get_escrow(conn, escrow_id, for_update=True)
    check_move(escrow_id, escrow.status, "releasing")
    gross = escrow.remaining if amount is None else amount
    if gross <= 0 or gross > escrow.remaining:
        raise InvalidInput(f"a release must be between 1 and the {escrow.remaining} the escrow still holds")
    check_amount(gross)
    fee = escrow.fee_for(gross)
    to_seller = gross - fee
    if to_seller <= 0:
        raise InvalidInput("the release is too small to pay the seller after the fee")
    releases = conn.execute(
        sa.text("SELECT count(*) FROM escrow_history WHERE escrow_id = :id AND to_status = 'releasing'"),
        {"id": escrow_id},
    ).scalar_one()
    key = f"escrow-release:{escrow_id}:{int(releases) + 1}"
    holds = release_holds(escrow, key, chain_id, to_seller, fee)
    return ReleasePlan(escrow, key, to_seller, fee, holds)


@dataclass(frozen=True, slots=True)
class Release:
    """A confirmed ``Released`` event of the escrow contract."""

    chain: ChainRef
    escrow_id: str
    to_seller: int
    fee: int
    remaining: int


def record_release(conn: sa.Connection, release: Release) -> str:
    """Apply a confirmed release to its escrow (once per event): the amounts paid, and
    ``released`` when nothing remains or back to ``funded`` after a partial release."""
    key = _event_key("escrow_release", release.chain)
    escrow = get_escrow(conn, release.escrow_id, for_update=True)
    if _applied(conn, escrow.id, key):
        return escrow.status
    actor = f"chain:{release.chain.chain_id}"
    released = escrow.released_amount + release.to_seller
    fees = escrow.fee_amount + release.fee
    details = {"event": key, "to_seller": str(release.to_seller), "fee": str(release.fee)}
    if escrow.status == "releasing":
        wanted = "released" if release.remaining == 0 else "delivery_confirmed"
        return move(conn, escrow.id, wanted, actor, details, released_amount=released, fee_amount=fees).status
    return _follow(
        conn, escrow, release.chain, "release", actor, details, released_amount=released, fee_amount=fees
    )


def finish_resolution(conn: sa.Connection, escrow_id: str, outcome: str) -> None:
    """Close the escrow's resolution being carried out as ``executed`` (closing its dispute too)
    or ``failed`` (the dispute stays open for another decision)."""
    row = conn.execute(
        sa.text(
            "UPDATE escrow_resolutions SET status = :s WHERE escrow_id = :e AND status = 'executing'"
            " RETURNING dispute_id"
        ),
        {"s": outcome, "e": escrow_id},
    ).first()
    if row is not None and outcome == "executed":
        conn.execute(
            sa.text("UPDATE escrow_disputes SET closed_at = now() WHERE id = :id"), {"id": row.dispute_id}
        )


def _sent_by_us(conn: sa.Connection, chain: ChainRef) -> bool:
    """Whether the event's transaction is one the sender signed (a saga's chain action)."""
    row = conn.execute(
        sa.text("SELECT 1 FROM chain_tx_attempts WHERE tx_hash = :h"), {"h": chain.tx_hash}
    ).first()
    return row is not None


def _follow(
    conn: sa.Connection,
    escrow: Escrow,
    chain: ChainRef,
    what: str,
    actor: str,
    details: dict[str, Any],
    **amounts: int,
) -> str:
    """Book a release or refund that is not the plain saga's: a split's part while ``resolving``
    (``resolved`` once nothing remains), one of our own transactions confirming after its saga
    moved on, or an unplanned one (the books follow the chain; finance gets an exception)."""
    assignments = ", ".join(f"{name} = :{name}" for name in sorted(amounts))
    conn.execute(
        sa.text(f"UPDATE escrows SET {assignments}, updated_at = now() WHERE id = :id"),
        {"id": escrow.id, **amounts},
    )
    after = get_escrow(conn, escrow.id)
    if escrow.status == "resolving":
        if after.remaining == 0:
            finish_resolution(conn, escrow.id, "executed")
            return move(conn, escrow.id, "resolved", actor, details).status
        _history(
            conn, escrow.id, escrow.status, escrow.status, f"the split's {what} confirmed", actor, details
        )
        return escrow.status
    if _sent_by_us(conn, chain):
        _history(conn, escrow.id, escrow.status, escrow.status, f"our {what} confirmed late", actor, details)
        return escrow.status
    exceptions_queue.open_exception(
        conn, details["event"], f"escrow_{what}_unplanned", {**details, "status": escrow.status}, chain=chain
    )
    _history(conn, escrow.id, escrow.status, escrow.status, f"{what} outside the saga", actor, details)
    return escrow.status


# -- refunds -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefundPlan:
    escrow: Escrow
    key: str
    amount: int
    holds: tuple[NewEntry, ...]


def plan_refund(conn: sa.Connection, escrow_id: str, chain_id: int) -> RefundPlan:
    """Lock an expired (or mismatched-funding) escrow and plan the refund of all it still holds,
    reserved by a hold through the outbox clearing account."""
    escrow = get_escrow(conn, escrow_id, for_update=True)
    check_move(escrow_id, escrow.status, "refunding")
    if escrow.remaining <= 0:
        raise InvalidInput(f"escrow {escrow_id} holds nothing to refund")
    refunds = conn.execute(
        sa.text("SELECT count(*) FROM escrow_history WHERE escrow_id = :id AND to_status = 'refunding'"),
        {"id": escrow_id},
    ).scalar_one()
    key = f"escrow-refund:{escrow_id}:{int(refunds) + 1}"
    hold = refund_hold(escrow, key, chain_id, escrow.remaining)
    return RefundPlan(escrow, key, escrow.remaining, (hold,))


@dataclass(frozen=True, slots=True)
class Refund:
    """A confirmed ``Refunded`` event of the escrow contract."""

    chain: ChainRef
    escrow_id: str
    amount: int
    remaining: int
    by_buyer: bool


def record_refund(conn: sa.Connection, refund: Refund) -> str:
    """Apply a confirmed refund to its escrow (once per event). Our own refund completes the
    ``refunding`` saga; the buyer's own refund after deadline and grace is followed as it is."""
    key = _event_key("escrow_refund", refund.chain)
    escrow = get_escrow(conn, refund.escrow_id, for_update=True)
    if _applied(conn, escrow.id, key):
        return escrow.status
    actor = f"chain:{refund.chain.chain_id}"
    details = {"event": key, "amount": str(refund.amount), "by_buyer": refund.by_buyer}
    refunded = escrow.refunded_amount + refund.amount
    status = escrow.status
    if refund.by_buyer and "refunding" in _moves_from(status):
        # The buyer's own refund after deadline and grace: the chain has moved.
        status = move(conn, escrow.id, "refunding", actor, details).status
    if status == "refunding":
        if refund.remaining == 0:
            return move(conn, escrow.id, "refunded", actor, details, refunded_amount=refunded).status
        conn.execute(
            sa.text("UPDATE escrows SET refunded_amount = :r, updated_at = now() WHERE id = :id"),
            {"r": refunded, "id": escrow.id},
        )
        _history(conn, escrow.id, status, status, "partial refund", actor, details)
        return status
    return _follow(conn, escrow, refund.chain, "refund", actor, details, refunded_amount=refunded)


def _moves_from(status: str) -> frozenset[str]:
    return frozenset(MOVES.get(status, {}))


def refund_account(conn: sa.Connection, chain_id: int, contract: str, escrow_id: str) -> str | None:
    """The escrow's own account for tokens leaving the contract by a refund we did not send."""
    row = conn.execute(
        sa.text("SELECT 1 FROM escrows WHERE id = :id AND contract = :c AND chain_id = :chain"),
        {"id": escrow_id, "c": contract, "chain": chain_id},
    ).first()
    return None if row is None else escrow_account(escrow_id)


def overdue(conn: sa.Connection, now: datetime, limit: int = 500) -> list[Escrow]:
    """Escrows whose deadline passed while still awaiting funding or funded (not confirmed), and
    expired ones that hold funds (a funding that landed after they expired)."""
    rows = conn.execute(
        sa.text(
            _SELECT + " WHERE (e.status IN ('awaiting_funding', 'funded') AND e.deadline < :now)"
            " OR (e.status = 'expired'"
            " AND e.funded_amount > e.released_amount + e.fee_amount + e.refunded_amount)"
            " ORDER BY e.deadline LIMIT :n"
        ),
        {"now": now, "n": limit},
    ).all()
    return [_from_row(r) for r in rows]


def stalled(conn: sa.Connection, limit: int = 500) -> list[tuple[Escrow, str]]:
    """Escrows in a saga whose chain action failed, with the status to return to: a release or
    refund whose latest action failed; a split none of whose actions is still open and one of
    which failed (what did confirm stays booked; finance decides the rest again)."""
    rows = conn.execute(
        sa.text(
            _SELECT + " WHERE (e.status IN ('releasing', 'refunding') AND EXISTS ("
            " SELECT 1 FROM chain_outbox o WHERE o.metadata->>'escrow_id' = e.id AND o.status = 'failed'"
            " AND o.id = (SELECT max(o2.id) FROM chain_outbox o2 WHERE o2.metadata->>'escrow_id' = e.id"
            " AND o2.action IN ('escrow.release', 'escrow.refund'))))"
            " OR (e.status = 'resolving' AND EXISTS (SELECT 1 FROM escrow_resolutions r"
            " WHERE r.escrow_id = e.id AND r.status = 'executing'"
            " AND EXISTS (SELECT 1 FROM chain_outbox o WHERE o.metadata->>'escrow_id' = e.id"
            " AND o.metadata->>'resolution' = r.id::text AND o.status = 'failed')"
            " AND NOT EXISTS (SELECT 1 FROM chain_outbox o WHERE o.metadata->>'escrow_id' = e.id"
            " AND o.metadata->>'resolution' = r.id::text AND o.status IN ('queued', 'signed', 'sent'))))"
            " ORDER BY e.id LIMIT :n"
        ),
        {"n": limit},
    ).all()
    back = {"releasing": "delivery_confirmed", "refunding": "expired", "resolving": "disputed"}
    return [(escrow, back[escrow.status]) for escrow in map(_from_row, rows)]


def record_deadline(conn: sa.Connection, chain: ChainRef, escrow_id: str, deadline: datetime) -> str:
    """Follow a confirmed ``DeadlineExtended`` event (a dispute's freeze): the escrow's deadline
    is the chain's from now on. Once per event; an unknown escrow is left to the exceptions."""
    key = _event_key("escrow_deadline", chain)
    row = conn.execute(sa.text("SELECT 1 FROM escrows WHERE id = :id"), {"id": escrow_id}).first()
    if row is None:
        exceptions_queue.open_exception(
            conn, key, "escrow_deadline_unknown", {"escrow_id": escrow_id}, chain=chain
        )
        return "unknown"
    escrow = get_escrow(conn, escrow_id, for_update=True)
    if _applied(conn, escrow_id, key):
        return escrow.status
    conn.execute(
        sa.text("UPDATE escrows SET deadline = :d, updated_at = now() WHERE id = :id"),
        {"d": deadline, "id": escrow_id},
    )
    details = {"event": key, "from": escrow.deadline.isoformat(), "to": deadline.isoformat()}
    actor = f"chain:{chain.chain_id}"
    _history(
        conn, escrow_id, escrow.status, escrow.status, "the deadline was extended on chain", actor, details
    )
    return escrow.status


def undo_funding(conn: sa.Connection, chain: ChainRef, escrow_id: str, amount: int) -> str:
    """A reorg took a booked funding out of the canonical chain (the custody compensation
    reverses its tokens). The escrow forgets it: back to ``awaiting_funding`` while nothing was
    paid out of it, else it stays where it is and finance gets an exception. The funding's event
    key is marked undone, so the same transaction re-included later applies again."""
    key = _event_key("escrow_funding", chain)
    escrow = get_escrow(conn, escrow_id, for_update=True)
    if not _applied(conn, escrow_id, key):
        return escrow.status
    actor = f"chain:{chain.chain_id}"
    details = {"undone": key, "amount": str(amount), "block_hash": chain.block_hash}
    funded = escrow.funded_amount - amount
    paid = escrow.released_amount + escrow.fee_amount + escrow.refunded_amount
    if "awaiting_funding" in _moves_from(escrow.status) and paid == 0 and funded == 0:
        return move(conn, escrow_id, "awaiting_funding", actor, details, funded_amount=0).status
    if funded >= paid:
        conn.execute(
            sa.text("UPDATE escrows SET funded_amount = :f, updated_at = now() WHERE id = :id"),
            {"f": funded, "id": escrow_id},
        )
    exceptions_queue.open_exception(
        conn,
        f"undo:{key}:{chain.block_hash}",
        "escrow_funding_orphaned",
        {**details, "escrow_id": escrow_id, "status": escrow.status},
        chain=chain,
    )
    _history(conn, escrow_id, escrow.status, escrow.status, "a reorg took the funding away", actor, details)
    return escrow.status
