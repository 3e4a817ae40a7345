"""Treasury top-ups: TRACE minted into the treasury wallet through the sender.

Staking rewards are paid out of the treasury wallet (DESIGN §8), so the treasury must hold
TRACE that the books can explain. A top-up holds ``clearing:outbox:{chain_id}`` ->
``treasury:issued:{chain_id}`` (equity: TRACE the platform issued to itself) and writes an outbox
row calling ``TraceToken.mint(treasury, amount)`` from the platform signer, in one commit. The
sender posts the hold on the confirmed receipt; the indexer books the confirmed ``Transfer``
from the zero address into the treasury mirror against the same clearing account (our own
transaction), so clearing nets to zero and the mirror follows ``balanceOf``. A reverted mint
voids the hold, as every outbox action does.

Idempotent on the caller's key: the same key and amount again is the same top-up; the same key
for another amount is an idempotency conflict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ledger import accounts, outbox
from ledger.commands import Leg, NewEntry, check_key
from ledger.custody import TOKEN_ASSET, check_address, clearing_code, ensure_chart
from ledger.errors import NotFound
from ledger.money import check_amount
from ledger.points.claims import MINT_GAS_LIMIT, mint_calldata

ACTION = "treasury.mint"
# Outbox state -> top-up state.
_STATES = {
    "queued": "pending",
    "signed": "pending",
    "sent": "pending",
    "confirmed": "minted",
    "failed": "failed",
}


def issued_code(chain_id: int) -> str:
    """The equity account credited with the TRACE minted into the treasury on ``chain_id``."""
    return f"treasury:issued:{chain_id}"


def _outbox_key(key: str) -> str:
    return f"treasury:mint:{key}"


@dataclass(frozen=True, slots=True)
class TopUp:
    key: str
    chain_id: int
    treasury: str
    amount: int
    status: str
    outbox_status: str
    tx_hash: str | None
    created_at: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "chain_id": self.chain_id,
            "treasury": self.treasury,
            "amount": str(self.amount),
            "status": self.status,
            "outbox_status": self.outbox_status,
            "tx_hash": self.tx_hash,
            "created_at": self.created_at,
        }


def mint(
    conn: sa.Connection, chain_id: int, token: str, treasury: str, amount: int, *, key: str
) -> tuple[TopUp, accounts.Created]:
    """Queue a mint of ``amount`` base units into ``treasury`` (the signer's wallet) under ``key``."""
    check_amount(amount)
    check_key(key)
    token, treasury = check_address(token, "token"), check_address(treasury, "treasury")
    ensure_chart(conn, chain_id, (treasury,))
    accounts.create_account(conn, issued_code(chain_id), TOKEN_ASSET, "equity")
    action = outbox.ChainAction(
        key=_outbox_key(key),
        chain_id=chain_id,
        signer=treasury,
        action=ACTION,
        to_address=token,
        data=mint_calldata(treasury, amount),
        gas_limit=MINT_GAS_LIMIT,
        metadata={"amount": str(amount), "treasury": treasury},
    )
    hold = NewEntry(
        key=_outbox_key(key),
        kind=ACTION,
        legs=(Leg(clearing_code(chain_id), issued_code(chain_id), amount, TOKEN_ASSET, pending=True),),
        metadata={"treasury": treasury},
    )
    _, status = outbox.enqueue(conn, action, [hold])
    return get(conn, key), status


def get(conn: sa.Connection, key: str) -> TopUp:
    """The top-up made under ``key`` (404 ``unknown_top_up``)."""
    row = conn.execute(
        sa.text(
            "SELECT chain_id, status, tx_hash, metadata, created_at FROM chain_outbox"
            " WHERE key = :k AND action = :a"
        ),
        {"k": _outbox_key(check_key(key)), "a": ACTION},
    ).first()
    if row is None:
        raise NotFound("unknown_top_up", f"no treasury top-up under key {key!r}")
    return TopUp(
        key=key,
        chain_id=int(row.chain_id),
        treasury=str(row.metadata["treasury"]),
        amount=int(row.metadata["amount"]),
        status=_STATES.get(row.status, row.status),
        outbox_status=row.status,
        tx_hash=row.tx_hash,
        created_at=row.created_at.isoformat(),
    )
