"""A reorg takes a booked funding away (anvil snapshot and revert, the indexer at one
confirmation): the escrow forgets it and takes no attestation; when the same funding transaction
is included again it is booked once more, under a new generation; the release then pays once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from web3 import Web3

from contracts.anvil import AnvilNode
from contracts.bindings import build_signed, contract_at
from ledger.errors import Conflict
from ledger.escrow import attestation, service
from tests.books import assert_books_balance
from tests.chain_node.escrow_world import (
    ATTESTORS,
    FAST,
    TRACE,
    assert_books_follow_the_chain,
    balance,
    escrow_of,
    run_until_settled,
    world,
)
from workers.escrow_saga import attest

__all__ = ["world"]


def _create(world: dict[str, Any], key: str, amount: int) -> service.Escrow:
    w3, deployment = world["w3"], world["deployment"]
    now = datetime.fromtimestamp(int(w3.eth.get_block("latest")["timestamp"]), UTC)
    with world["engine"].begin() as conn:
        escrow, _ = service.create_escrow(
            conn,
            service.NewEscrow(
                key=key,
                chain_id=deployment.chain_id,
                contract=deployment.escrow,
                buyer=world["buyer"].address,
                seller=world["seller"].address,
                amount=amount,
                fee_bps=250,
                deadline=(now + timedelta(days=5)).replace(microsecond=0),
                delivery_ref=f"BOL-{key}",
                attestor_ids=world["attestors"],
                threshold=2,
            ),
            "staff:test",
        )
    return escrow


def _signed_funding(world: dict[str, Any], escrow: service.Escrow) -> list[bytes]:
    """The buyer's approve and fund, signed once (so they can be included again after a reorg)."""
    w3, buyer = world["w3"], world["buyer"]
    contract = contract_at(w3, "TraceEscrow", world["deployment"].escrow)
    nonce = w3.eth.get_transaction_count(buyer.address)
    fees = {"gas": 200_000, "max_fee_per_gas": 10**10, "max_priority_fee_per_gas": 10**9}
    approve = build_signed(
        w3, world["token"].functions.approve(contract.address, escrow.amount), buyer, nonce=nonce, **fees
    )
    fund = contract.functions.fund(
        bytes.fromhex(escrow.id[2:]), world["seller"].address, escrow.amount, int(escrow.deadline.timestamp())
    )
    # The fund call cannot be estimated before the approval lands: its gas is given.
    return [approve.raw_transaction, build_signed(w3, fund, buyer, nonce=nonce + 1, **fees).raw_transaction]


def _include(world: dict[str, Any], raw: list[bytes]) -> None:
    for tx in raw:
        world["w3"].eth.wait_for_transaction_receipt(world["w3"].eth.send_raw_transaction(tx))
    world["anvil"].mine(1)


def _attest_all(world: dict[str, Any], escrow_id: str) -> list[str]:
    message = service.delivery_message_of(escrow_of(world, escrow_id))
    statuses = []
    for attestor_id, (secret, _, _) in zip(world["attestors"], ATTESTORS.values(), strict=True):
        with world["engine"].begin() as conn:
            outcome = attest(
                conn,
                world["deployment"],
                escrow_id,
                attestor_id,
                attestation.sign_delivery(secret, message),
                FAST,
                f"attestor:{attestor_id}",
            )
        statuses.append(outcome.escrow_status)
    return statuses


def test_a_reorg_that_drops_the_funding_pays_nothing_twice(anvil: AnvilNode, world: dict[str, Any]) -> None:
    escrow = _create(world, "po-reorg", 80 * TRACE)
    raw = _signed_funding(world, escrow)
    fork = anvil.snapshot()
    _include(world, raw)
    world["indexer"].run_once()
    assert escrow_of(world, escrow.id).status == "funded"
    assert balance(world, service.escrow_account(escrow.id)) == 80 * TRACE

    # The funding's blocks leave the canonical chain: a longer fork without them.
    anvil.revert(fork)
    anvil.mine(4)
    report = world["indexer"].run_once()
    assert (report.reorgs, report.compensated) == (1, 1)
    forgotten = escrow_of(world, escrow.id)
    assert (forgotten.status, forgotten.funded_amount) == ("awaiting_funding", 0)
    assert balance(world, service.escrow_account(escrow.id)) == 0
    assert_books_follow_the_chain(world)
    # Nothing to confirm a delivery of: attestations are refused and nothing is written.
    with pytest.raises(Conflict, match="takes no attestations"):
        _attest_all(world, escrow.id)

    # The very same transactions are included again: booked once more, under a new generation.
    _include(world, raw)
    world["indexer"].run_once()
    funded = escrow_of(world, escrow.id)
    assert (funded.status, funded.funded_amount) == ("funded", 80 * TRACE)
    assert balance(world, service.escrow_account(escrow.id)) == 80 * TRACE
    fund_tx = "0x" + Web3.keccak(raw[1]).hex().removeprefix("0x")
    with world["engine"].connect() as conn:
        keys = (
            conn.execute(
                sa.text("SELECT idempotency_key FROM ledger_entries WHERE tx_hash = :tx ORDER BY id"),
                {"tx": fund_tx},
            )
            .scalars()
            .all()
        )
        moves = [h["to_status"] for h in service.history(conn, escrow.id)]
    # The first booking, its reversal, the booking of the re-included transaction.
    assert len(keys) == 3 and keys[2].endswith(":g1"), keys
    assert moves == ["awaiting_funding", "funded", "awaiting_funding", "funded"]

    assert _attest_all(world, escrow.id) == ["funded", "releasing"]
    final = run_until_settled(world, escrow.id, "released")
    assert (final.released_amount, final.fee_amount) == (78 * TRACE, 2 * TRACE)
    seller = world["token"].functions.balanceOf(Web3.to_checksum_address(world["seller"].address)).call()
    assert seller == 78 * TRACE
    assert_books_follow_the_chain(world)
    assert_books_balance(world["engine"])
