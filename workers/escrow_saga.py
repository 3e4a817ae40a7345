"""The escrow sagas' chain side: a release is a ledger hold plus an outbox row in one commit; the
sender lands it; the indexer's confirmed ``Released`` event settles the escrow."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from contracts.deployment import Deployment
from ledger import outbox
from ledger.accounts import Created
from ledger.escrow import attestation, disputes, service
from workers.base import unit_of_work

RELEASE_GAS_LIMIT = 200_000
REFUND_GAS_LIMIT = 150_000
EXTEND_GAS_LIMIT = 80_000
_RELEASE_SELECTOR = keccak(text="release(bytes32,uint256,uint256)")[:4]
_REFUND_SELECTOR = keccak(text="refund(bytes32,uint256)")[:4]
_EXTEND_SELECTOR = keccak(text="extendDeadline(bytes32,uint64)")[:4]


def release_calldata(escrow_id: str, to_seller: int, fee: int) -> bytes:
    """``TraceEscrow.release(id, toSeller, fee)`` calldata."""
    return _RELEASE_SELECTOR + encode(
        ["bytes32", "uint256", "uint256"], [bytes.fromhex(escrow_id[2:]), to_seller, fee]
    )


def refund_calldata(escrow_id: str, amount: int) -> bytes:
    """``TraceEscrow.refund(id, amount)`` calldata."""
    return _REFUND_SELECTOR + encode(["bytes32", "uint256"], [bytes.fromhex(escrow_id[2:]), amount])


def extend_calldata(escrow_id: str, deadline: datetime) -> bytes:
    """``TraceEscrow.extendDeadline(id, deadline)`` calldata."""
    return _EXTEND_SELECTOR + encode(
        ["bytes32", "uint64"], [bytes.fromhex(escrow_id[2:]), int(deadline.timestamp())]
    )


def start_release(
    engine: sa.Engine, deployment: Deployment, escrow_id: str, actor: str, amount: int | None = None
) -> outbox.OutboxRow:
    """Start releasing a delivery-confirmed escrow (all that remains, or ``amount`` for a
    milestone): holds, the outbox row and the move to ``releasing`` commit together."""
    with unit_of_work(engine) as work:
        return enqueue_release(work.conn, deployment, escrow_id, actor, amount)


def _release_action(
    deployment: Deployment, key: str, escrow_id: str, to_seller: int, fee: int, **metadata: str
) -> outbox.ChainAction:
    return outbox.ChainAction(
        key=key,
        chain_id=deployment.chain_id,
        signer=deployment.treasury,
        action="escrow.release",
        to_address=deployment.escrow,
        data=release_calldata(escrow_id, to_seller, fee),
        gas_limit=RELEASE_GAS_LIMIT,
        metadata={"escrow_id": escrow_id, "to_seller": str(to_seller), "fee": str(fee), **metadata},
    )


def _refund_action(
    deployment: Deployment, key: str, escrow_id: str, amount: int, **metadata: str
) -> outbox.ChainAction:
    return outbox.ChainAction(
        key=key,
        chain_id=deployment.chain_id,
        signer=deployment.treasury,
        action="escrow.refund",
        to_address=deployment.escrow,
        data=refund_calldata(escrow_id, amount),
        gas_limit=REFUND_GAS_LIMIT,
        metadata={"escrow_id": escrow_id, "amount": str(amount), **metadata},
    )


def enqueue_release(
    conn: sa.Connection, deployment: Deployment, escrow_id: str, actor: str, amount: int | None = None
) -> outbox.OutboxRow:
    """The release saga's first step in the caller's transaction: holds, outbox row, ``releasing``."""
    plan = service.plan_release(conn, escrow_id, deployment.chain_id, amount)
    action = _release_action(deployment, plan.key, escrow_id, plan.to_seller, plan.fee)
    service.move(
        conn,
        escrow_id,
        "releasing",
        actor,
        {"outbox": plan.key, "to_seller": str(plan.to_seller), "fee": str(plan.fee)},
    )
    # Last: the holds lock the hot fee and clearing accounts until the commit.
    row, _ = outbox.enqueue(conn, action, plan.holds)
    return row


def attest(
    conn: sa.Connection,
    deployment: Deployment,
    escrow_id: str,
    attestor_id: int,
    signature: bytes,
    verifier: attestation.Verifier,
    actor: str,
) -> service.AttestOutcome:
    """Record an attestation; when it confirms the delivery of an escrow that releases by itself,
    the release saga starts in the same transaction (nothing to lose between the two)."""
    outcome = service.attest(conn, escrow_id, attestor_id, signature, verifier, actor)
    confirmed = outcome.status == "created" and outcome.escrow_status == "delivery_confirmed"
    if confirmed and outcome.auto_release:
        enqueue_release(conn, deployment, escrow_id, actor)
        return replace(outcome, escrow_status="releasing")
    return outcome


def open_dispute(
    conn: sa.Connection,
    deployment: Deployment,
    escrow_id: str,
    party: str,
    reason: str,
    actor: str,
    extension_s: int,
    now: datetime | None = None,
) -> tuple[disputes.Dispute, Created]:
    """Open a dispute and freeze the escrow on chain too: the arbiter extends its deadline to
    ``extension_s`` past the later of now and the current deadline, so the buyer's own refund
    waits for the resolution. The dispute and the chain action commit together."""
    dispute, status = disputes.open_dispute(conn, escrow_id, party, reason, actor)
    if status == "created":
        escrow = service.get_escrow(conn, escrow_id)
        if escrow.remaining > 0:
            base = max(escrow.deadline, (now or datetime.now(UTC)).replace(microsecond=0))
            frozen_until = base + timedelta(seconds=extension_s)
            action = outbox.ChainAction(
                key=f"escrow-freeze:{escrow_id}:{dispute.id}",
                chain_id=deployment.chain_id,
                signer=deployment.treasury,
                action="escrow.extend_deadline",
                to_address=deployment.escrow,
                data=extend_calldata(escrow_id, frozen_until),
                gas_limit=EXTEND_GAS_LIMIT,
                metadata={
                    "escrow_id": escrow_id,
                    "dispute": str(dispute.id),
                    "deadline": frozen_until.isoformat(),
                },
            )
            outbox.enqueue(conn, action)
    return dispute, status


def execute_split(
    conn: sa.Connection, deployment: Deployment, resolution: disputes.Resolution, actor: str
) -> None:
    """Carry out a decided (and, where needed, approved) split: the escrow moves to ``resolving``;
    the seller's part and the fee go out by one release, the buyer's by one refund, each with its
    holds in this same transaction."""
    escrow = service.get_escrow(conn, resolution.escrow_id, for_update=True)
    key = f"escrow-split:{escrow.id}:{resolution.id}"
    tag = {"resolution": str(resolution.id)}
    if resolution.seller_amount or resolution.fee:
        action = _release_action(
            deployment, f"{key}:release", escrow.id, resolution.seller_amount, resolution.fee, **tag
        )
        holds = service.release_holds(
            escrow, f"{key}:release", deployment.chain_id, resolution.seller_amount, resolution.fee
        )
        outbox.enqueue(conn, action, holds)
    if resolution.buyer_amount:
        action = _refund_action(deployment, f"{key}:refund", escrow.id, resolution.buyer_amount, **tag)
        hold = service.refund_hold(escrow, f"{key}:refund", deployment.chain_id, resolution.buyer_amount)
        outbox.enqueue(conn, action, (hold,))
    service.move(conn, escrow.id, "resolving", actor, {"resolution": resolution.id, **resolution.as_dict()})


def decide_split(
    conn: sa.Connection,
    deployment: Deployment,
    escrow_id: str,
    seller_amount: int,
    buyer_amount: int,
    fee: int,
    actor: str,
    approval_above: int,
) -> tuple[disputes.Resolution, Created]:
    """Finance's decision; carried out at once unless its size needs a second approval."""
    resolution, status = disputes.decide_split(
        conn, escrow_id, seller_amount, buyer_amount, fee, actor, approval_above
    )
    if status == "created" and resolution.status == "executing":
        execute_split(conn, deployment, resolution, actor)
    return resolution, status


def approve_split(
    conn: sa.Connection, deployment: Deployment, resolution_id: int, actor: str
) -> tuple[disputes.Resolution, Created]:
    """The second finance user's approval; the split is then carried out."""
    resolution, status = disputes.approve(conn, resolution_id, actor)
    if status == "created":
        execute_split(conn, deployment, resolution, actor)
    return resolution, status


def start_refund(engine: sa.Engine, deployment: Deployment, escrow_id: str, actor: str) -> outbox.OutboxRow:
    """Start refunding all an expired escrow still holds to its buyer (hold, outbox row and the
    move to ``refunding`` in one commit)."""
    with unit_of_work(engine) as work:
        return _enqueue_refund(work.conn, deployment, escrow_id, actor)


def _enqueue_refund(
    conn: sa.Connection, deployment: Deployment, escrow_id: str, actor: str
) -> outbox.OutboxRow:
    plan = service.plan_refund(conn, escrow_id, deployment.chain_id)
    action = _refund_action(deployment, plan.key, escrow_id, plan.amount)
    row, _ = outbox.enqueue(conn, action, plan.holds)
    service.move(conn, escrow_id, "refunding", actor, {"outbox": plan.key, "amount": str(plan.amount)})
    return row


@dataclass
class SweepReport:
    expired: int = 0
    refunds_started: int = 0
    returned: int = 0
    releases_started: int = 0

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
            if current.status in ("awaiting_funding", "funded") and current.deadline < moment:
                details = {"deadline": current.deadline.isoformat()}
                service.move(work.conn, escrow.id, "expired", actor, details)
                report.expired += 1
            elif current.status != "expired":
                continue  # moved on since it was listed
            if current.remaining > 0:
                _enqueue_refund(work.conn, deployment, escrow.id, actor)
                report.refunds_started += 1
    for escrow, back in stalled:
        with unit_of_work(engine) as work:
            if service.get_escrow(work.conn, escrow.id, for_update=True).status != escrow.status:
                continue
            if escrow.status == "resolving":
                service.finish_resolution(work.conn, escrow.id, "failed")
            service.move(work.conn, escrow.id, back, actor, {"reason": "the chain action failed"})
            report.returned += 1
    # A confirmed delivery of an escrow that releases by itself and is not being released (its
    # release failed and came back above, say) starts again.
    with engine.connect() as conn:
        ready = service.list_escrows(conn, status="delivery_confirmed", auto_release=True, limit=500)
    for escrow in ready:
        with unit_of_work(engine) as work:
            if service.get_escrow(work.conn, escrow.id, for_update=True).status != "delivery_confirmed":
                continue
            enqueue_release(work.conn, deployment, escrow.id, actor)
            report.releases_started += 1
    return report
