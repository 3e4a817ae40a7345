"""What the escrow contract's confirmed events do to the books (DESIGN §9, §6).

The indexer asks :func:`explain_transfer` who owns tokens moving into or out of the escrow
contract, and hands every confirmed escrow event to :func:`apply_events` in the same
transaction as the transfers' bookings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa

from ledger.commands import ChainRef
from ledger.custody import TokenTransfer
from ledger.escrow import service


class ChainEvent(Protocol):
    """A confirmed, decoded event as the indexer holds it."""

    @property
    def chain(self) -> ChainRef: ...
    @property
    def contract(self) -> str: ...
    @property
    def event(self) -> str: ...
    @property
    def args(self) -> Mapping[str, Any]: ...


def _funding(event: ChainEvent) -> service.Funding:
    args = event.args
    return service.Funding(
        chain=event.chain,
        contract=event.contract,
        escrow_id=str(args["id"]).lower(),
        buyer=str(args["buyer"]).lower(),
        seller=str(args["seller"]).lower(),
        amount=int(args["amount"]),
        deadline=datetime.fromtimestamp(int(args["deadline"]), UTC),
    )


def explain_transfer(
    conn: sa.Connection, escrow_contract: str, transfer: TokenTransfer, same_tx: Sequence[ChainEvent]
) -> str | None:
    """The account on the other side of a transfer into or out of the escrow contract that one of
    our escrows explains: a funding (the ``Funded`` event of the same transaction, same buyer and
    amount) or a refund we did not send ourselves (the buyer's own, after deadline and grace)."""
    if transfer.sender == escrow_contract:
        for event in same_tx:
            if event.contract == escrow_contract and event.event == "Refunded":
                args = event.args
                if (
                    str(args["buyer"]).lower() == transfer.recipient
                    and int(args["amount"]) == transfer.amount
                ):
                    return service.refund_account(
                        conn, event.chain.chain_id, escrow_contract, str(args["id"]).lower()
                    )
        return None
    if transfer.recipient != escrow_contract:
        return None
    for event in same_tx:
        if event.contract != escrow_contract or event.event != "Funded":
            continue
        funding = _funding(event)
        if funding.buyer == transfer.sender and funding.amount == transfer.amount:
            return service.funding_account(conn, funding)
    return None


def _release(event: ChainEvent) -> service.Release:
    args = event.args
    return service.Release(
        chain=event.chain,
        escrow_id=str(args["id"]).lower(),
        to_seller=int(args["toSeller"]),
        fee=int(args["fee"]),
        remaining=int(args["remaining"]),
    )


def _refund(event: ChainEvent) -> service.Refund:
    args = event.args
    return service.Refund(
        chain=event.chain,
        escrow_id=str(args["id"]).lower(),
        amount=int(args["amount"]),
        remaining=int(args["remaining"]),
        by_buyer=bool(args["byBuyer"]),
    )


def _deadline(conn: sa.Connection, event: ChainEvent) -> str:
    args = event.args
    deadline = datetime.fromtimestamp(int(args["deadline"]), UTC)
    return service.record_deadline(conn, event.chain, str(args["id"]).lower(), deadline)


def _undo_funding(conn: sa.Connection, event: ChainEvent) -> str:
    funding = _funding(event)
    if service.funding_account(conn, funding) is None:
        return "unknown"
    return service.undo_funding(conn, event.chain, funding.escrow_id, funding.amount)


# Each escrow event the books follow, and what applies it.
_APPLY: dict[str, Callable[[sa.Connection, ChainEvent], str]] = {
    "Funded": lambda conn, event: service.record_funding(conn, _funding(event)),
    "Released": lambda conn, event: service.record_release(conn, _release(event)),
    "Refunded": lambda conn, event: service.record_refund(conn, _refund(event)),
    "DeadlineExtended": _deadline,
}

# What undoes an applied event a reorg took away. A release or refund of ours that is orphaned
# also has its outbox row's receipt orphaned: the sender's confirmation depth and the custody
# compensation cover it, and finance gets the reorg exception.
_UNDO: dict[str, Callable[[sa.Connection, ChainEvent], str]] = {
    "Funded": _undo_funding,
}


def undo_events(conn: sa.Connection, escrow_contract: str, events: Sequence[ChainEvent]) -> None:
    """Undo what orphaned, already applied escrow events did, latest first."""
    for event in reversed(events):
        undo = _UNDO.get(event.event) if event.contract == escrow_contract else None
        if undo is not None:
            undo(conn, event)


def apply_events(conn: sa.Connection, escrow_contract: str, events: Sequence[ChainEvent]) -> None:
    """Apply the escrow contract's confirmed events, in chain order."""
    for event in events:
        apply = _APPLY.get(event.event) if event.contract == escrow_contract else None
        if apply is not None:
            apply(conn, event)
