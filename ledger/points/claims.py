"""Claims: points turned into TRACE minted to the participant's wallet.

A claim holds the points (``points:{participant}`` -> ``points:redeemed``) and the mint
(``expense:points:claims`` -> ``minted:{chain_id}``, TRACE) and writes an outbox row calling
``TraceToken.mint(wallet, amount)`` from the platform signer, all in one commit. The sender posts
both holds when the mint's receipt is confirmed on the canonical chain, and voids both (and opens
an exception) when it reverts; a transaction orphaned before its confirmation is simply sent
again, as every outbox row is. A claim's state is therefore its outbox row's.

The rate is ``points_per_trace`` (a Decimal, e.g. 100 points for 1 TRACE). A claim of P points
pays T = floor(P * 10^18 / rate) base units, and consumes the fewest points that pay T,
ceil(T * rate / 10^18) <= P; the rest stays as points. Points are taken from the lots that
expire soonest, then the oldest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any, ClassVar

import sqlalchemy as sa
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from ledger import accounts, outbox
from ledger.commands import Leg, NewEntry, check_key
from ledger.custody import TOKEN_ASSET, ensure_chart, minted_code
from ledger.errors import Conflict, InvalidInput, LedgerError, NotFound
from ledger.escrow import party
from ledger.money import UINT256_LIMIT, check_amount
from ledger.points import rules
from ledger.points.statements import LOT_REMAINING

MINT_GAS_LIMIT = 120_000
CLAIMS_EXPENSE = "expense:points:claims"
TOKEN_BASE_UNITS = 10**18
_MINT_SELECTOR = keccak(text="mint(address,uint256)")[:4]
# Outbox state -> claim state.
_STATES = {
    "queued": "pending",
    "signed": "pending",
    "sent": "pending",
    "confirmed": "paid",
    "failed": "failed",
}


def mint_calldata(wallet: str, amount: int) -> bytes:
    return _MINT_SELECTOR + encode(["address", "uint256"], [wallet, amount])


def check_rate(points_per_trace: Decimal) -> Fraction:
    """Base units of TRACE per point, exactly, from the configured points per TRACE."""
    if not isinstance(points_per_trace, Decimal) or not points_per_trace.is_finite() or points_per_trace <= 0:
        raise InvalidInput("points per TRACE must be a positive decimal number")
    return Fraction(TOKEN_BASE_UNITS) / Fraction(points_per_trace)


def convert(points: int, points_per_trace: Decimal) -> tuple[int, int]:
    """(TRACE base units paid, points consumed) for a claim of ``points`` (see the module doc).

    Exact rational arithmetic: floor for the payout, ceil for the points it costs.
    """
    check_amount(points, what="points")
    per_point = check_rate(points_per_trace)
    paid = (points * per_point.numerator) // per_point.denominator  # floor
    if paid <= 0:
        raise LedgerError("claim_too_small", f"{points} points pay less than one base unit of TRACE")
    if paid >= UINT256_LIMIT:
        raise InvalidInput("the claim would mint 2^256 base units or more")
    cost = -((-paid * per_point.denominator) // per_point.numerator)  # ceil
    if not 0 < cost <= points:
        raise RuntimeError(f"conversion of {points} points consumed {cost}")
    return paid, cost


@dataclass(frozen=True, slots=True)
class ClaimPointsRequest(party._SignedRequest):
    """A participant's signed claim of ``points`` (signed by its registered wallet)."""

    PRIMARY_TYPE: ClassVar[str] = "ClaimPoints"
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("participant", "string"),
        ("points", "uint256"),
        ("nonce", "uint256"),
        ("expiry", "uint64"),
    )

    participant: str
    points: int
    nonce: int
    expiry: int

    def __post_init__(self) -> None:
        rules.check_participant_id(self.participant)
        check_amount(self.points, what="points")
        self._check_nonce_and_expiry()

    def _message(self) -> dict[str, Any]:
        return {
            "participant": self.participant,
            "points": self.points,
            "nonce": self.nonce,
            "expiry": self.expiry,
        }


@dataclass(frozen=True, slots=True)
class Claim:
    id: int
    key: str
    participant_id: str
    wallet: str
    requested_points: int
    points: int
    trace_amount: int
    points_per_trace: str
    chain_id: int
    outbox_key: str
    status: str
    tx_hash: str | None
    requested_by: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "participant": self.participant_id,
            "wallet": self.wallet,
            "requested_points": str(self.requested_points),
            "points": str(self.points),
            "trace_amount": str(self.trace_amount),
            "points_per_trace": self.points_per_trace,
            "chain_id": self.chain_id,
            "outbox_key": self.outbox_key,
            "status": self.status,
            "tx_hash": self.tx_hash,
            "requested_by": self.requested_by,
            "created_at": self.created_at.isoformat(),
        }


_SELECT = (
    "SELECT c.id, c.key, c.participant_id, c.wallet, c.requested_points, c.points, c.trace_amount,"
    " c.points_per_trace, c.chain_id, c.outbox_key, o.status AS outbox_status, o.tx_hash, c.requested_by,"
    " c.created_at FROM points_claims c JOIN chain_outbox o ON o.key = c.outbox_key"
)


def _claim(r: Any) -> Claim:
    return Claim(
        r.id, r.key, r.participant_id, r.wallet, int(r.requested_points), int(r.points), int(r.trace_amount),
        r.points_per_trace, r.chain_id, r.outbox_key, _STATES.get(r.outbox_status, r.outbox_status),
        r.tx_hash, r.requested_by, r.created_at,
    )  # fmt: skip


def get_claim(conn: sa.Connection, claim_id: int) -> Claim:
    row = conn.execute(sa.text(_SELECT + " WHERE c.id = :id"), {"id": claim_id}).first()
    if row is None:
        raise NotFound("claim_not_found", f"no claim {claim_id}")
    return _claim(row)


def list_claims(
    conn: sa.Connection, *, participant_id: str | None = None, after: int | None = None, limit: int = 100
) -> list[Claim]:
    """Claims, newest first (keyset: ``after`` is the last id seen)."""
    rows = conn.execute(
        sa.text(
            _SELECT + " WHERE (CAST(:p AS text) IS NULL OR c.participant_id = :p)"
            " AND (CAST(:after AS bigint) IS NULL OR c.id < :after) ORDER BY c.id DESC LIMIT :limit"
        ),
        {"p": participant_id, "after": after, "limit": limit},
    )
    return [_claim(r) for r in rows]


@dataclass(frozen=True, slots=True)
class Chain:
    """Where claims mint: the chain, the token and the signer holding MINTER_ROLE."""

    chain_id: int
    token: str
    signer: str


def create_claim(
    conn: sa.Connection,
    chain: Chain,
    participant_id: str,
    points: int,
    key: str,
    points_per_trace: Decimal,
    actor: str,
    *,
    signed_nonce: int | None = None,
) -> tuple[Claim, accounts.Created]:
    """Claim ``points`` of ``participant_id`` as TRACE in the caller's transaction (module doc).

    Idempotent on ``key``: the same claim again returns it (``exists``); another claim under the
    key is an idempotency conflict. Refused when the participant has no wallet, or fewer
    claimable points than asked (``insufficient_points``), or the points pay no TRACE.
    """
    check_key(key)
    check_amount(points, what="points")
    participant = rules.get_participant(conn, participant_id, for_update=True)
    existing = conn.execute(sa.text(_SELECT + " WHERE c.key = :k"), {"k": key}).first()
    if existing is not None:
        claim = _claim(existing)
        if (claim.participant_id, claim.requested_points) != (participant_id, points):
            raise Conflict("idempotency_conflict", f"claim key {key!r} was used for another claim")
        return claim, "exists"
    if participant.wallet is None:
        raise LedgerError("no_wallet", f"participant {participant_id!r} has no wallet to mint to")
    paid, cost = convert(points, points_per_trace)
    # Lock the claimable lots in id order (as the expiry sweep does), then take soonest expiry first.
    lot_ids = (
        conn.execute(
            sa.text(
                "SELECT id FROM points_lots WHERE participant_id = :p AND expired < amount"
                " AND (expires_at IS NULL OR expires_at > now()) ORDER BY id FOR UPDATE"
            ),
            {"p": participant_id},
        )
        .scalars()
        .all()
    )
    lots = conn.execute(
        sa.text(
            "WITH l AS (" + LOT_REMAINING + " WHERE l.id = ANY(:ids))"
            " SELECT id, remaining FROM l WHERE remaining > 0 ORDER BY expires_at NULLS LAST, id"
        ),
        {"ids": list(lot_ids)},
    ).all()
    available = sum(int(lot.remaining) for lot in lots)
    if available < points:
        raise LedgerError(
            "insufficient_points",
            f"participant {participant_id!r} has {available} claimable points, asked {points}",
        )
    taken: list[tuple[int, int]] = []
    left = cost
    for lot in lots:
        if left == 0:
            break
        take = min(left, int(lot.remaining))
        taken.append((int(lot.id), take))
        left -= take
    ensure_chart(conn, chain.chain_id, ())
    accounts.create_account(conn, CLAIMS_EXPENSE, TOKEN_ASSET, "expense")
    accounts.create_account(conn, minted_code(chain.chain_id), TOKEN_ASSET, "equity")
    claim_id = int(
        conn.execute(
            sa.text(
                "INSERT INTO points_claims (key, participant_id, wallet, requested_points, points,"
                " trace_amount, points_per_trace, chain_id, outbox_key, requested_by, signed_nonce)"
                " VALUES (:k, :p, :w, :rp, :pts, :t, :rate, :c, :ok, :a, :n) RETURNING id"
            ),
            {
                "k": key,
                "p": participant_id,
                "w": participant.wallet,
                "rp": points,
                "pts": cost,
                "t": paid,
                "rate": str(points_per_trace),
                "c": chain.chain_id,
                "ok": f"points:claim:{key}",
                "a": actor,
                "n": None if signed_nonce is None else str(signed_nonce),
            },
        ).scalar_one()
    )
    conn.execute(
        sa.text(
            "INSERT INTO points_claim_lots (claim_id, lot_id, amount)"
            " SELECT :c, * FROM unnest(CAST(:lots AS bigint[]), CAST(:amounts AS numeric[]))"
        ),
        {"c": claim_id, "lots": [t[0] for t in taken], "amounts": [t[1] for t in taken]},
    )
    action = outbox.ChainAction(
        key=f"points:claim:{key}",
        chain_id=chain.chain_id,
        signer=chain.signer,
        action="points.mint",
        to_address=chain.token,
        data=mint_calldata(participant.wallet, paid),
        gas_limit=MINT_GAS_LIMIT,
        metadata={
            "claim_id": claim_id,
            "participant": participant_id,
            "points": str(cost),
            "amount": str(paid),
        },
    )
    holds = [
        NewEntry(
            key=f"points:claim:{claim_id}:points",
            kind="points.claim",
            legs=(
                Leg(
                    rules.participant_account(participant_id), rules.REDEEMED, cost, rules.ASSET, pending=True
                ),
            ),
            metadata={"claim_id": claim_id},
        ),
        NewEntry(
            key=f"points:claim:{claim_id}:mint",
            kind="points.claim",
            legs=(Leg(CLAIMS_EXPENSE, minted_code(chain.chain_id), paid, TOKEN_ASSET, pending=True),),
            metadata={"claim_id": claim_id, "wallet": participant.wallet},
        ),
    ]
    outbox.enqueue(conn, action, holds)
    return get_claim(conn, claim_id), "created"


def create_signed_claim(
    conn: sa.Connection,
    chain: Chain,
    request: ClaimPointsRequest,
    signature: bytes | str,
    points_per_trace: Decimal,
    now: datetime,
) -> tuple[Claim, accounts.Created]:
    """A participant's own claim: ``request`` signed (EIP-712, the party domain on the token
    contract) by the participant's registered wallet; its nonce is used once."""
    participant = rules.get_participant(conn, request.participant)
    if participant.wallet is None:
        raise LedgerError("no_wallet", f"participant {request.participant!r} has no wallet")
    signer = party.require_signer(
        request,  # type: ignore[arg-type]
        signature,
        chain.chain_id,
        chain.token,
        participant.wallet,
        now,
    )
    key = f"party:{signer}:{request.nonce}"
    earlier = party.use_nonce(
        conn, signer, request.nonce, "points.claim", request.digest(chain.chain_id, chain.token), key
    )
    if earlier is not None:
        row = conn.execute(sa.text(_SELECT + " WHERE c.key = :k"), {"k": earlier}).first()
        if row is None:
            raise RuntimeError(f"nonce {request.nonce} of {signer} names no claim")
        return _claim(row), "exists"
    return create_claim(
        conn, chain, request.participant, request.points, key, points_per_trace, f"party:{signer}",
        signed_nonce=request.nonce,
    )  # fmt: skip
