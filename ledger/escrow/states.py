"""The escrow state machine: one table of allowed moves; every other move is refused."""

from __future__ import annotations

from typing import Final, Literal

from ledger.errors import Conflict

Status = Literal[
    "awaiting_funding",
    "funded",
    "delivery_confirmed",
    "releasing",
    "released",
    "expired",
    "refunding",
    "refunded",
    "disputed",
    "resolving",
    "resolved",
    "funding_exception",
]

# from -> the moves allowed from it, each with what causes it.
MOVES: Final[dict[str, dict[str, str]]] = {
    "awaiting_funding": {
        "funded": "the confirmed Funded event matches the escrow",
        "funding_exception": "the funding does not match the escrow (amount, parties, deadline)",
        "expired": "the deadline passed with no funding",
    },
    "funded": {
        "delivery_confirmed": "the attestation threshold is met and the aggregate verifies",
        "expired": "the deadline passed without delivery confirmation",
        "disputed": "a party or staff opened a dispute",
        "refunding": "the buyer's own on-chain refund after deadline and grace, or staff refund",
        "awaiting_funding": "a reorg took the funding transaction out of the canonical chain",
    },
    "delivery_confirmed": {
        "releasing": "the release saga started (hold and outbox written)",
        "disputed": "a party or staff opened a dispute before the release",
        "awaiting_funding": "a reorg took the funding transaction out of the canonical chain",
    },
    "releasing": {
        "released": "the release confirmed on chain and the escrow is exhausted",
        "delivery_confirmed": (
            "a partial release (a milestone) confirmed and the rest waits for the next one, or the"
            " release transaction failed, its hold was voided and it may be retried"
        ),
    },
    "expired": {
        "refunding": "the refund saga started",
        "disputed": "a dispute opened after the deadline, before the refund",
    },
    "refunding": {
        "refunded": "the refund confirmed on chain",
        "expired": "the refund transaction failed; the hold was voided, it may be retried",
    },
    "disputed": {
        "resolving": "finance decided a split (approved where its size requires); the chain carries it out",
    },
    "resolving": {
        "resolved": "the split's release and refund confirmed on chain",
        "disputed": "a transaction of the split failed; the holds were voided",
    },
    "funding_exception": {
        "refunding": "staff refund the mismatched funding to the buyer",
        "awaiting_funding": "a reorg took the funding transaction out of the canonical chain",
    },
    "released": {},
    "refunded": {},
    "resolved": {},
}
STATUSES: Final[tuple[str, ...]] = tuple(MOVES)
FINAL: Final[frozenset[str]] = frozenset(s for s, moves in MOVES.items() if not moves)


class TransitionRefused(Conflict):
    """A move the state machine does not allow."""

    def __init__(self, escrow_id: str, current: str, wanted: str) -> None:
        allowed = ", ".join(sorted(MOVES.get(current, {}))) or "none (final)"
        super().__init__(
            "escrow_transition_refused",
            f"escrow {escrow_id} is {current}; it cannot become {wanted} (allowed: {allowed})",
        )
        self.current = current
        self.wanted = wanted


def check_move(escrow_id: str, current: str, wanted: str) -> str:
    """The reason the table gives for ``current -> wanted``; refuses any other move."""
    reason = MOVES.get(current, {}).get(wanted)
    if reason is None:
        raise TransitionRefused(escrow_id, current, wanted)
    return reason
