"""Fund -> attest -> release on anvil, through the indexer and the sender, with real PostgreSQL:
the seller and the fee wallet are paid once, every mirror equals balanceOf, no hold stays open."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from contracts.bindings import ARBITER_ROLE, contract_at, transact
from ledger.escrow import attestation, service
from ledger.escrow.states import TransitionRefused
from tests.books import assert_books_balance
from tests.chain_node.escrow_world import (
    ATTESTORS,
    FAST,
    TRACE,
    assert_books_follow_the_chain,
    balance,
    create_and_fund,
    escrow_of,
    run_until_settled,
    world,
)
from workers.escrow_saga import start_release, sweep

__all__ = ["world"]


def _confirm_delivery(world: dict[str, Any], escrow_id: str) -> None:
    message = service.delivery_message_of(escrow_of(world, escrow_id))
    for attestor_id, (secret, _, _) in zip(world["attestors"], ATTESTORS.values(), strict=True):
        signature = attestation.sign_delivery(secret, message)
        with world["engine"].begin() as conn:
            service.attest(conn, escrow_id, attestor_id, signature, FAST, f"attestor:{attestor_id}")
    assert escrow_of(world, escrow_id).status == "delivery_confirmed"


def test_fund_attest_release_pays_once_and_leaves_the_books_matching_the_chain(world: dict[str, Any]) -> None:
    deployment, token = world["deployment"], world["token"]
    escrow = create_and_fund(world, "po-77", 200 * TRACE)
    assert escrow.status == "funded"
    # A release before delivery is confirmed is refused, and writes nothing.
    with pytest.raises(TransitionRefused):
        start_release(world["engine"], deployment, escrow.id, "staff:test")
    _confirm_delivery(world, escrow.id)
    start_release(world["engine"], deployment, escrow.id, "staff:test")
    assert escrow_of(world, escrow.id).status == "releasing"
    final = run_until_settled(world, escrow.id, "released")
    assert final.status == "released"
    fee = 5 * TRACE  # 2.5 % of 200, rounded up (exact here)
    assert (final.released_amount, final.fee_amount, final.remaining) == (195 * TRACE, fee, 0)
    assert token.functions.balanceOf(world["seller"].address).call() == 195 * TRACE
    assert token.functions.balanceOf(world["fees"].address).call() == fee
    assert balance(world, service.escrow_account(escrow.id)) == 0
    assert balance(world, service.fees_account()) == fee
    assert_books_follow_the_chain(world)
    with world["engine"].connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions")).scalars().all()
    # Minting to the buyer touches no custody address: nothing at all is left for finance.
    assert kinds == []
    assert_books_balance(world["engine"])


def _history(world: dict[str, Any], escrow_id: str) -> list[dict[str, Any]]:
    with world["engine"].connect() as conn:
        return service.history(conn, escrow_id)


def test_a_reverted_release_voids_its_holds_and_can_be_tried_again(world: dict[str, Any]) -> None:
    deployment, w3 = world["deployment"], world["w3"]
    escrow = create_and_fund(world, "po-78", 100 * TRACE)
    _confirm_delivery(world, escrow.id)
    # The platform key loses the arbiter role on chain: its release reverts (status 0).
    contract = contract_at(w3, "TraceEscrow", deployment.escrow)
    transact(w3, contract.functions.revokeRole(ARBITER_ROLE, world["signer"].address), world["deployer"])
    start_release(world["engine"], deployment, escrow.id, "staff:test")
    for _ in range(6):
        world["sender"].run_once()
        world["anvil"].mine(1)
    with world["engine"].connect() as conn:
        statuses = conn.execute(sa.text("SELECT status FROM chain_outbox")).scalars().all()
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions")).scalars().all()
    assert statuses == ["failed"]
    assert kinds == ["chain_action_failed"]
    assert balance(world, service.escrow_account(escrow.id)) == 100 * TRACE
    # With the role back, the sweep returns the escrow and, as it releases by itself, tries again.
    transact(w3, contract.functions.grantRole(ARBITER_ROLE, world["signer"].address), world["deployer"])
    report = sweep(world["engine"], deployment)
    assert (report.returned, report.releases_started) == (1, 1)
    moves = [h["to_status"] for h in _history(world, escrow.id)]
    assert moves[-3:] == ["releasing", "delivery_confirmed", "releasing"]
    assert run_until_settled(world, escrow.id, "released").status == "released"
    assert_books_follow_the_chain(world)
    assert_books_balance(world["engine"])


def test_the_deadline_sweep_refunds_an_unconfirmed_escrow(world: dict[str, Any]) -> None:
    escrow = create_and_fund(world, "po-79", 50 * TRACE, deadline_s=600)
    world["anvil"].rpc("evm_increaseTime", [601])
    world["anvil"].mine(1)
    chain_now = datetime.fromtimestamp(int(world["w3"].eth.get_block("latest")["timestamp"]), UTC)
    report = sweep(world["engine"], world["deployment"], chain_now)
    assert (report.expired, report.refunds_started) == (1, 1)
    assert escrow_of(world, escrow.id).status == "refunding"
    again = sweep(world["engine"], world["deployment"], chain_now)
    assert (again.expired, again.refunds_started) == (0, 0)
    final = run_until_settled(world, escrow.id, "refunded")
    assert (final.status, final.refunded_amount, final.remaining) == ("refunded", 50 * TRACE, 0)
    assert world["token"].functions.balanceOf(world["buyer"].address).call() == 1_000 * TRACE
    assert balance(world, service.escrow_account(escrow.id)) == 0
    assert_books_follow_the_chain(world)
    assert_books_balance(world["engine"])


def test_the_buyer_s_own_refund_after_deadline_and_grace_is_followed(world: dict[str, Any]) -> None:
    deployment, w3 = world["deployment"], world["w3"]
    escrow = create_and_fund(world, "po-80", 30 * TRACE, deadline_s=600)
    contract = contract_at(w3, "TraceEscrow", deployment.escrow)
    grace = int(contract.functions.graceSeconds().call())
    world["anvil"].rpc("evm_increaseTime", [600 + grace + 1])
    world["anvil"].mine(1)
    transact(w3, contract.functions.refund(bytes.fromhex(escrow.id[2:]), 30 * TRACE), world["buyer"])
    world["anvil"].mine(1)
    world["indexer"].run_once()
    final = escrow_of(world, escrow.id)
    assert (final.status, final.refunded_amount) == ("refunded", 30 * TRACE)
    assert balance(world, service.escrow_account(escrow.id)) == 0
    assert_books_follow_the_chain(world)
    with world["engine"].connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions")).scalars().all()
    assert kinds == []
