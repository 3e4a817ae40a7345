"""What the staking vault's confirmed events do to the books (DESIGN §8, §4).

The indexer asks :func:`explain_transfer` who owns tokens moving into or out of the vault, and
hands every confirmed vault event to :func:`apply_events` in the same transaction as the
transfers' bookings; after a reorg, :func:`undo_events` takes back what orphaned events did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import sqlalchemy as sa

from ledger.custody import TokenTransfer
from ledger.staking import service
from workers.escrow_events import ChainEvent

UINT64_MAX = 2**64 - 1


def _stake_event(event: ChainEvent, compounded: bool = False) -> service.StakeEvent | None:
    """The vault event as the staking service takes it; None for a pool id no pool of ours can
    have (the custody transfer then goes to suspense)."""
    args = event.args
    pool_id = int(args["poolId"])
    if not 0 < pool_id < 2**63:
        return None
    staked = event.event == "Staked"
    return service.StakeEvent(
        chain=event.chain,
        pool_id=pool_id,
        staker=str(args["staker"]).lower(),
        amount=int(args["amount"]),
        new_balance=int(args["newBalance"]),
        unlock_at_s=min(int(args["unlockAt"]), UINT64_MAX) if staked else None,
        staked=staked,
        compounded=compounded,
    )


def _compounds(conn: sa.Connection, tx_hashes: set[str]) -> dict[str, tuple[int, str, int]]:
    """Which of ``tx_hashes`` are transactions of our compounding claims, and the (pool, staker,
    amount) each was sent for."""
    if not tx_hashes:
        return {}
    rows = conn.execute(
        sa.text(
            "SELECT a.tx_hash, o.metadata FROM chain_tx_attempts a JOIN chain_outbox o ON o.id = a.outbox_id"
            " WHERE a.tx_hash = ANY(:h) AND o.action = 'staking.compound'"
        ),
        {"h": sorted(tx_hashes)},
    ).all()
    return {
        r.tx_hash: (int(r.metadata["pool"]), str(r.metadata["staker"]), int(r.metadata["amount"]))
        for r in rows
    }


def explain_transfer(
    conn: sa.Connection, vault: str, transfer: TokenTransfer, same_tx: Sequence[ChainEvent]
) -> str | None:
    """``stake:{pool}:{staker}`` for a transfer into the vault that a ``Staked`` event of the same
    transaction explains (same staker and amount, a pool of ours), or out of it that an
    ``Unstaked`` event explains; None otherwise (suspense)."""
    if transfer.recipient == vault:
        wanted, party = "Staked", transfer.sender
    elif transfer.sender == vault:
        wanted, party = "Unstaked", transfer.recipient
    else:
        return None
    for event in same_tx:
        if event.contract != vault or event.event != wanted:
            continue
        stake = _stake_event(event)
        if stake is None or stake.staker != party or stake.amount != transfer.amount:
            continue
        # The pool's row is locked before the stake account is booked (every writer of a pool
        # locks it before its accounts: no lock-order deadlock with a claim of the same pool).
        if service.pool_on(conn, event.chain.chain_id, vault, stake.pool_id, for_update=True):
            return service.ensure_stake_account(conn, stake.pool_id, stake.staker)
    return None


def _now_s() -> int:
    return int(time.time())


def apply_events(
    conn: sa.Connection, vault: str, events: Sequence[ChainEvent], now_s: Callable[[], int] = _now_s
) -> None:
    """Apply the vault's confirmed ``Staked`` / ``Unstaked`` events to positions, in chain order.
    Rewards count from the moment the event is booked (``now_s``)."""
    ours = [e for e in events if e.contract == vault and e.event in ("Staked", "Unstaked")]
    compounds = _compounds(conn, {e.chain.tx_hash for e in ours if e.event == "Staked"})
    for event in ours:
        expected = compounds.get(event.chain.tx_hash)
        args = event.args
        compounded = expected is not None and expected == (
            int(args["poolId"]),
            str(args["staker"]).lower(),
            int(args["amount"]),
        )
        stake = _stake_event(event, compounded)
        if stake is not None:
            service.apply_stake_event(conn, vault, stake, now_s())


def undo_events(
    conn: sa.Connection, vault: str, events: Sequence[ChainEvent], now_s: Callable[[], int] = _now_s
) -> None:
    """Take back what orphaned, already applied vault events did to positions, latest first."""
    for event in reversed(events):
        if event.contract != vault or event.event not in ("Staked", "Unstaked"):
            continue
        stake = _stake_event(event)
        if stake is not None:
            service.undo_stake_event(conn, vault, stake, now_s())
