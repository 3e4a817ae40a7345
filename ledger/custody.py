"""Custody mirrors: the ledger's copy of what each platform address holds on chain (DESIGN §4).

For every custody address (the escrow contract, the staking vault, the treasury and fee
wallets) an asset account ``chain:{chain_id}:{address}`` moves with every confirmed TRACE
``Transfer`` into or out of it, so that its balance at block B equals ``balanceOf`` at B.
The other side of each movement says why the tokens moved: a domain account when a domain
explains the transfer, the outbox clearing account when our own sender caused it, and the
suspense account (plus an exception for finance) when nothing explains it.

Works on plain data: no web3 here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from ledger import accounts
from ledger.commands import ChainRef, Leg, NewEntry, Reverse
from ledger.errors import InvalidInput

TOKEN_ASSET = "TRACE"  # noqa: S105 - an asset code, not a secret
TOKEN_SCALE = 18
ZERO_ADDRESS = "0x" + "0" * 40
_ADDRESS = re.compile(r"^0x[0-9a-f]{40}$")


def check_address(address: object, field: str | None = None) -> str:
    """A 20-byte address as 0x and 40 lower-case hex digits (the form every table stores);
    ``field`` names the input in the refusal."""
    prefix = f"{field}: " if field else ""
    if not isinstance(address, str):
        raise InvalidInput(f"{prefix}an address must be a string")
    lowered = address.lower()
    if not _ADDRESS.fullmatch(lowered):
        raise InvalidInput(f"{prefix}not an address: {address!r:.60}")
    return lowered


def mirror_code(chain_id: int, address: str) -> str:
    """The asset account mirroring what ``address`` holds on chain ``chain_id``."""
    return f"chain:{chain_id}:{check_address(address)}"


def minted_code(chain_id: int) -> str:
    """The equity account credited with every TRACE minted to a claimant on ``chain_id`` (what
    reconciliation compares with the chain's mints)."""
    return f"minted:{chain_id}"


def suspense_code(chain_id: int) -> str:
    """Where unexplained custody movements wait for finance to explain them."""
    return f"suspense:chain:{chain_id}"


def clearing_code(chain_id: int) -> str:
    """Outflows our own sender caused: credited when an outbox hold posts, debited when the
    chain's Transfer is booked against the mirror; zero whenever both sides are in."""
    return f"clearing:outbox:{chain_id}"


def event_key(chain: ChainRef, generation: int = 0) -> str:
    """The idempotency key of the booking of one log. A log re-included after a reorg (its
    first booking compensated) is a new generation, booked under a new key."""
    base = f"chain:{chain.chain_id}:{chain.tx_hash}:{chain.log_index}"
    return base if generation == 0 else f"{base}:g{generation}"


def compensation_key(entry_key: str) -> str:
    return f"reorg:{entry_key}"


@dataclass(frozen=True, slots=True)
class TokenTransfer:
    """A confirmed ERC-20 ``Transfer`` log of the TRACE token."""

    chain: ChainRef
    sender: str
    recipient: str
    amount: int


# Given a custody transfer, a domain names the account on the other side of the mirror, or
# None when the transfer is not one of its own.
Explainer = Callable[[sa.Connection, TokenTransfer], str | None]


def ensure_chart(conn: sa.Connection, chain_id: int, custody: Iterable[str]) -> None:
    """Create the token asset, one mirror per custody address, suspense and clearing (idempotent)."""
    accounts.create_asset(conn, TOKEN_ASSET, TOKEN_SCALE)
    for address in sorted({check_address(a) for a in custody}):
        accounts.create_account(
            conn,
            mirror_code(chain_id, address),
            TOKEN_ASSET,
            "asset",
            metadata={"custody_address": address, "chain_id": chain_id},
        )
    accounts.create_account(conn, suspense_code(chain_id), TOKEN_ASSET, "liability")
    accounts.create_account(conn, clearing_code(chain_id), TOKEN_ASSET, "liability")


@dataclass(frozen=True, slots=True)
class CustodyBooking:
    """What one custody transfer books, and whether finance must look at it."""

    entry: NewEntry
    unexplained: bool


def book_custody_transfer(
    transfer: TokenTransfer,
    custody: frozenset[str],
    counter_account: str | None,
    generation: int = 0,
) -> CustodyBooking | None:
    """The entry that moves the mirrors for ``transfer``; None if it touches no custody address.

    ``counter_account`` is what explains the movement; None books it to suspense.
    """
    chain_id = transfer.chain.chain_id
    into = transfer.recipient in custody
    out_of = transfer.sender in custody
    if not into and not out_of:
        return None
    unexplained = counter_account is None
    other = suspense_code(chain_id) if counter_account is None else counter_account
    if into and out_of:
        # Between two custody addresses: both mirrors move, nothing else does.
        legs = (
            Leg(
                mirror_code(chain_id, transfer.recipient),
                mirror_code(chain_id, transfer.sender),
                transfer.amount,
                TOKEN_ASSET,
            ),
        )
    elif into:
        legs = (Leg(mirror_code(chain_id, transfer.recipient), other, transfer.amount, TOKEN_ASSET),)
    else:
        legs = (Leg(other, mirror_code(chain_id, transfer.sender), transfer.amount, TOKEN_ASSET),)
    entry = NewEntry(
        key=event_key(transfer.chain, generation),
        legs=legs,
        kind="chain.custody_transfer" if not unexplained else "chain.suspense",
        metadata={
            "from": transfer.sender,
            "to": transfer.recipient,
            "amount": str(transfer.amount),
        },
        chain=transfer.chain,
    )
    return CustodyBooking(entry, unexplained)


def compensations(conn: sa.Connection, chain_id: int, block_hashes: Iterable[str]) -> list[Reverse]:
    """Reversals for every entry booked from the given (now orphaned) blocks, not yet reversed.

    Each reversal carries the orphaned reference, so a balance at any block no longer counts it.
    """
    hashes = sorted(set(block_hashes))
    if not hashes:
        return []
    rows = conn.execute(
        sa.text(
            "SELECT e.idempotency_key, e.tx_hash, e.log_index, e.block_number, e.block_hash"
            " FROM ledger_entries e"
            " WHERE e.chain_id = :chain_id AND e.block_hash = ANY(:hashes)"
            " AND e.reverses_entry_id IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM ledger_entries r WHERE r.reverses_entry_id = e.id)"
            " AND EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.entry_id = e.id"
            "             AND t.kind IN ('posted', 'post_pending'))"
            " ORDER BY e.id"
        ),
        {"chain_id": chain_id, "hashes": hashes},
    ).all()
    return [
        Reverse(
            key=compensation_key(r.idempotency_key),
            entry_key=r.idempotency_key,
            metadata={"reason": "chain reorganisation orphaned the block", "orphaned_block": r.block_hash},
            chain=ChainRef(chain_id, r.tx_hash, r.log_index, r.block_number, r.block_hash),
        )
        for r in rows
    ]
