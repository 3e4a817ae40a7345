"""The escrow sagas' chain side: a release is a ledger hold plus an outbox row in one commit; the
sender lands it; the indexer's confirmed ``Released`` event settles the escrow."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from contracts.deployment import Deployment
from ledger import outbox
from ledger.escrow import service
from workers.base import unit_of_work

RELEASE_GAS_LIMIT = 200_000
REFUND_GAS_LIMIT = 150_000
_RELEASE_SELECTOR = keccak(text="release(bytes32,uint256,uint256)")[:4]
_REFUND_SELECTOR = keccak(text="refund(bytes32,uint256)")[:4]


def release_calldata(escrow_id: str, to_seller: int, fee: int) -> bytes:
    """``TraceEscrow.release(id, toSeller, fee)`` calldata."""
    return _RELEASE_SELECTOR + encode(
        ["bytes32", "uint256", "uint256"], [bytes.fromhex(escrow_id[2:]), to_seller, fee]
    )


def refund_calldata(escrow_id: str, amount: int) -> bytes:
    """``TraceEscrow.refund(id, amount)`` calldata."""
    return _REFUND_SELECTOR + encode(["bytes32", "uint256"], [bytes.fromhex(escrow_id[2:]), amount])


def start_release(
    engine: sa.Engine, deployment: Deployment, escrow_id: str, actor: str, amount: int | None = None
) -> outbox.OutboxRow:
    """Start releasing a delivery-confirmed escrow (all that remains, or ``amount`` for a
    milestone): holds, the outbox row and the move to ``releasing`` commit together."""
    with unit_of_work(engine) as work:
        plan = service.plan_release(work.conn, escrow_id, deployment.chain_id, amount)
        action = outbox.ChainAction(
            key=plan.key,
            chain_id=deployment.chain_id,
            signer=deployment.treasury,
            action="escrow.release",
            to_address=deployment.escrow,
            data=release_calldata(escrow_id, plan.to_seller, plan.fee),
            gas_limit=RELEASE_GAS_LIMIT,
            metadata={"escrow_id": escrow_id, "to_seller": str(plan.to_seller), "fee": str(plan.fee)},
        )
        row, _ = outbox.enqueue(work.conn, action, plan.holds)
        service.move(
            work.conn,
            escrow_id,
            "releasing",
            actor,
            {"outbox": plan.key, "to_seller": str(plan.to_seller), "fee": str(plan.fee)},
        )
    return row


def start_refund(engine: sa.Engine, deployment: Deployment, escrow_id: str, actor: str) -> outbox.OutboxRow:
    """Start refunding all an expired escrow still holds to its buyer (hold, outbox row and the
    move to ``refunding`` in one commit)."""
    with unit_of_work(engine) as work:
        return _enqueue_refund(work.conn, deployment, escrow_id, actor)


def _enqueue_refund(
    conn: sa.Connection, deployment: Deployment, escrow_id: str, actor: str
) -> outbox.OutboxRow:
    plan = service.plan_refund(conn, escrow_id, deployment.chain_id)
    action = outbox.ChainAction(
        key=plan.key,
        chain_id=deployment.chain_id,
        signer=deployment.treasury,
        action="escrow.refund",
        to_address=deployment.escrow,
        data=refund_calldata(escrow_id, plan.amount),
        gas_limit=REFUND_GAS_LIMIT,
        metadata={"escrow_id": escrow_id, "amount": str(plan.amount)},
    )
    row, _ = outbox.enqueue(conn, action, plan.holds)
    service.move(conn, escrow_id, "refunding", actor, {"outbox": plan.key, "amount": str(plan.amount)})
    return row


@dataclass
class SweepReport:
    expired: int = 0
    refunds_started: int = 0
    returned: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def sweep(engine: sa.Engine, deployment: Deployment, now: datetime | None = None) -> SweepReport:
    """The escrow deadline sweep (beat): overdue escrows expire and what they hold is refunded to
    the buyer through the refund saga; a saga whose chain action failed returns to the status it
    started from, so it can be tried again. Each escrow in its own commit; safe to run twice."""
    moment = now or datetime.now(UTC)
    report = SweepReport()
    actor = "sweep:escrow-deadlines"
    with engine.connect() as conn:
        overdue = service.overdue(conn, moment)
        stalled = service.stalled(conn)
    for escrow in overdue:
        with unit_of_work(engine) as work:
            current = service.get_escrow(work.conn, escrow.id, for_update=True)
            if current.status not in ("awaiting_funding", "funded") or current.deadline >= moment:
                continue  # moved on since it was listed
            service.move(work.conn, escrow.id, "expired", actor, {"deadline": current.deadline.isoformat()})
            report.expired += 1
            if current.remaining > 0:
                _enqueue_refund(work.conn, deployment, escrow.id, actor)
                report.refunds_started += 1
    for escrow, back in stalled:
        with unit_of_work(engine) as work:
            if service.get_escrow(work.conn, escrow.id, for_update=True).status != escrow.status:
                continue
            service.move(work.conn, escrow.id, back, actor, {"reason": "the chain action failed"})
            report.returned += 1
    return report
