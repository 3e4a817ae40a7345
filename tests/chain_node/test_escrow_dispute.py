"""Disputes on anvil, in process: the freeze holds the buyer's own refund back on chain, and a
split whose transactions fail returns the escrow to `disputed` with every hold voided; decided
again, it is carried out and the books follow the chain."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from contracts.anvil import AnvilNode
from contracts.bindings import ARBITER_ROLE, ChainTxFailed, contract_at, transact
from ledger.escrow import disputes, service
from tests.books import assert_books_balance
from tests.chain_node.escrow_world import (
    TRACE,
    assert_books_follow_the_chain,
    balance,
    create_and_fund,
    escrow_of,
    run_until_settled,
    world,
)
from workers.escrow_saga import decide_split, open_dispute, sweep

__all__ = ["world"]
WEEK = 7 * 86_400


def _settle_chain(world: dict[str, Any], rounds: int = 6) -> None:
    for _ in range(rounds):
        world["sender"].run_once()
        world["anvil"].mine(1)
        world["indexer"].run_once()


def test_a_frozen_escrow_waits_for_finance_and_a_failed_split_is_decided_again(
    anvil: AnvilNode, world: dict[str, Any]
) -> None:
    w3, deployment, engine = world["w3"], world["deployment"], world["engine"]
    contract = contract_at(w3, "TraceEscrow", deployment.escrow)
    escrow = create_and_fund(world, "po-dispute", 100 * TRACE, deadline_s=600)
    with engine.begin() as conn:
        opened, status = open_dispute(
            conn, deployment, escrow.id, "buyer", "never arrived", "party:buyer", WEEK
        )
    assert (status, opened.party, escrow_of(world, escrow.id).status) == ("created", "buyer", "disputed")
    _settle_chain(world, 3)
    frozen = escrow_of(world, escrow.id)
    assert frozen.deadline > escrow.deadline
    # Past the agreed deadline and the grace, the buyer still cannot take the funds back.
    grace = int(contract.functions.graceSeconds().call())
    anvil.rpc("evm_increaseTime", [600 + grace + 60])
    anvil.mine(1)
    with pytest.raises(ChainTxFailed):
        transact(w3, contract.functions.refund(bytes.fromhex(escrow.id[2:]), 100 * TRACE), world["buyer"])
    # Nor does the sweep touch a disputed escrow.
    assert sweep(engine, deployment).expired == 0

    # The platform key loses the arbiter role: both transactions of the split revert.
    transact(w3, contract.functions.revokeRole(ARBITER_ROLE, world["signer"].address), world["deployer"])
    with engine.begin() as conn:
        first, _ = decide_split(
            conn, deployment, escrow.id, 50 * TRACE, 48 * TRACE, 2 * TRACE, "finance:a", 10**30
        )
    assert first.status == "executing"
    _settle_chain(world)
    report = sweep(engine, deployment)
    assert report.returned == 1
    with engine.connect() as conn:
        assert [r.status for r in disputes.resolutions_of(conn, escrow.id)] == ["failed"]
        assert disputes.open_dispute_of(conn, escrow.id) is not None
        failed = conn.execute(
            sa.text("SELECT count(*) FROM chain_outbox WHERE status = 'failed'")
        ).scalar_one()
    assert failed == 2
    assert escrow_of(world, escrow.id).status == "disputed"
    assert balance(world, service.escrow_account(escrow.id)) == 100 * TRACE

    # With the role back, finance decides again and the chain carries it out.
    transact(w3, contract.functions.grantRole(ARBITER_ROLE, world["signer"].address), world["deployer"])
    with engine.begin() as conn:
        decide_split(conn, deployment, escrow.id, 50 * TRACE, 48 * TRACE, 2 * TRACE, "finance:a", 10**30)
    final = run_until_settled(world, escrow.id, "resolved")
    assert (final.status, final.released_amount, final.refunded_amount, final.fee_amount) == (
        "resolved",
        50 * TRACE,
        48 * TRACE,
        2 * TRACE,
    )
    with engine.connect() as conn:
        assert [r.status for r in disputes.resolutions_of(conn, escrow.id)] == ["failed", "executed"]
        assert disputes.open_dispute_of(conn, escrow.id) is None
    assert balance(world, service.fees_account()) == 2 * TRACE
    assert_books_follow_the_chain(world)
    assert_books_balance(engine)
