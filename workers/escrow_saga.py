"""The escrow sagas' chain side: a release is a ledger hold plus an outbox row in one commit; the
sender lands it; the indexer's confirmed ``Released`` event settles the escrow."""

from __future__ import annotations

import sqlalchemy as sa
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from contracts.deployment import Deployment
from ledger import outbox
from ledger.escrow import service
from workers.base import unit_of_work

RELEASE_GAS_LIMIT = 200_000
_RELEASE_SELECTOR = keccak(text="release(bytes32,uint256,uint256)")[:4]


def release_calldata(escrow_id: str, to_seller: int, fee: int) -> bytes:
    """``TraceEscrow.release(id, toSeller, fee)`` calldata."""
    return _RELEASE_SELECTOR + encode(
        ["bytes32", "uint256", "uint256"], [bytes.fromhex(escrow_id[2:]), to_seller, fee]
    )


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
