"""Staking through a reorg and through a failed claim, on anvil with real PostgreSQL.

- A reorg takes a booked ``Staked`` away: the position and the stake account forget it (the
  custody booking is compensated, finance gets an exception); the same transaction included
  again is applied once more.
- A compounding claim whose ``stakeFor`` reverts on chain (the pool was closed meanwhile) has its
  hold voided by the sender, and the staking tick gives the amount back to the staker's reward.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from contracts.anvil import AnvilNode
from contracts.bindings import build_signed, contract_at, transact
from ledger.staking import service
from tests.books import assert_books_balance
from tests.chain_node.escrow_world import TRACE, assert_books_follow_the_chain, balance, world
from workers import staking_saga

__all__ = ["world"]


def _settle(world: dict[str, Any], rounds: int = 8) -> None:
    for _ in range(rounds):
        world["sender"].run_once()
        world["anvil"].mine(1)
        world["indexer"].run_once()
        with world["engine"].connect() as conn:
            open_rows = conn.execute(
                sa.text("SELECT count(*) FROM chain_outbox WHERE status NOT IN ('confirmed', 'failed')")
            ).scalar_one()
        if open_rows == 0:
            break
    world["anvil"].mine(1)
    world["indexer"].run_once()


def _pool(world: dict[str, Any], name: str) -> int:
    now = int(time.time())
    with world["engine"].begin() as conn:
        settings = service.PoolSettings("emission", None, 10**15, 0, 0, None, True)
        pool, _ = staking_saga.create_pool(conn, world["deployment"], name, settings, "staff:test", now)
        service.fund_pool(conn, pool.id, 100 * TRACE, key=f"fund-{name}", actor="staff:test", now_s=now)
    _settle(world)
    return pool.id


def _stake_of(world: dict[str, Any], pool_id: int, staker: str) -> int:
    with world["engine"].connect() as conn:
        row = conn.execute(
            sa.text("SELECT stake FROM staking_positions WHERE pool_id = :p AND staker = :s"),
            {"p": pool_id, "s": staker},
        ).scalar_one_or_none()
    return 0 if row is None else int(row)


def test_a_reorg_that_drops_a_stake_is_undone_and_the_stake_applies_again(
    anvil: AnvilNode, world: dict[str, Any]
) -> None:
    w3, deployment, staker = world["w3"], world["deployment"], world["buyer"]
    who = staker.address.lower()
    pool_id = _pool(world, "reorg-pool")
    vault = contract_at(w3, "TraceStakingVault", deployment.vault)
    transact(w3, world["token"].functions.approve(vault.address, 100 * TRACE), staker)
    fees = {"gas": 200_000, "max_fee_per_gas": 10**10, "max_priority_fee_per_gas": 10**9}
    nonce = w3.eth.get_transaction_count(staker.address)
    raw = build_signed(
        w3, vault.functions.stake(pool_id, 40 * TRACE), staker, nonce=nonce, **fees
    ).raw_transaction

    fork = anvil.snapshot()
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw))
    anvil.mine(1)
    world["indexer"].run_once()
    assert _stake_of(world, pool_id, who) == 40 * TRACE
    assert balance(world, service.stake_account(pool_id, who)) == 40 * TRACE

    anvil.revert(fork)
    anvil.mine(4)
    report = world["indexer"].run_once()
    assert report.reorgs == 1 and report.compensated >= 1
    assert _stake_of(world, pool_id, who) == 0
    assert balance(world, service.stake_account(pool_id, who)) == 0
    with world["engine"].connect() as conn:
        assert service.get_pool(conn, pool_id).total_staked == 0
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions ORDER BY id")).scalars().all()
    assert "staking_event_orphaned" in kinds
    assert_books_follow_the_chain(world)

    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw))
    anvil.mine(1)
    world["indexer"].run_once()
    assert _stake_of(world, pool_id, who) == 40 * TRACE
    assert balance(world, service.stake_account(pool_id, who)) == 40 * TRACE
    with world["engine"].connect() as conn:
        moves = (
            conn.execute(
                sa.text("SELECT kind FROM staking_moves WHERE pool_id = :p AND staker = :s ORDER BY id"),
                {"p": pool_id, "s": who},
            )
            .scalars()
            .all()
        )
    assert moves == ["staked", "undone", "staked"]
    assert_books_follow_the_chain(world)
    assert_books_balance(world["engine"])


def test_a_claim_that_fails_on_chain_goes_back_to_the_staker(world: dict[str, Any]) -> None:
    w3, deployment, staker, signer = world["w3"], world["deployment"], world["buyer"], world["signer"]
    who = staker.address.lower()
    transact(w3, world["token"].functions.mint(signer.address, 100 * TRACE), signer)
    pool_id = _pool(world, "closing-pool")
    vault = contract_at(w3, "TraceStakingVault", deployment.vault)
    transact(w3, world["token"].functions.approve(vault.address, 100 * TRACE), staker)
    transact(w3, vault.functions.stake(pool_id, 10 * TRACE), staker)
    _settle(world)
    later = int(time.time()) + 100
    with world["engine"].begin() as conn:
        # Closed on the vault first (the mirror is sent before the claim), so stakeFor reverts.
        staking_saga.change_pool(conn, deployment, pool_id, {"active": False}, "staff:test", later)
        claim = staking_saga.enqueue_claim(conn, deployment, pool_id, who, None, "compound", 1, later)
    assert claim.amount > 0
    _settle(world)
    with world["engine"].connect() as conn:
        status = conn.execute(
            sa.text("SELECT status FROM chain_outbox WHERE key = :k"), {"k": claim.outbox_key}
        ).scalar_one()
        assert [r["accrued"] for r in service.rewards_of(conn, who, later)] == ["0"]
    assert status == "failed"
    assert balance(world, service.stake_account(pool_id, who)) == 10 * TRACE
    run = staking_saga.tick_all(world["engine"], later)
    assert run.returned == 1
    assert staking_saga.tick_all(world["engine"], later).returned == 0  # once
    with world["engine"].connect() as conn:
        [reward] = service.rewards_of(conn, who, later)
        liability = {p["pool_id"]: p for p in service.liability_report(conn, later)}[pool_id]
    assert int(reward["accrued"]) == claim.amount
    assert liability["paying"] == "0" and liability["paid"] == "0"
    assert_books_follow_the_chain(world)
    assert_books_balance(world["engine"])


def test_a_reorg_that_drops_a_compounding_undoes_it_and_its_reinclusion_books_it_once(
    anvil: AnvilNode, world: dict[str, Any]
) -> None:
    w3, deployment, staker, signer = world["w3"], world["deployment"], world["buyer"], world["signer"]
    who = staker.address.lower()
    transact(w3, world["token"].functions.mint(signer.address, 100 * TRACE), signer)
    pool_id = _pool(world, "compound-reorg")
    vault = contract_at(w3, "TraceStakingVault", deployment.vault)
    transact(w3, world["token"].functions.approve(vault.address, 100 * TRACE), staker)
    transact(w3, vault.functions.stake(pool_id, 10 * TRACE), staker)
    _settle(world)
    later = int(time.time()) + 100
    # A first compounding lands for good (with the vault's approval).
    with world["engine"].begin() as conn:
        staking_saga.enqueue_claim(conn, deployment, pool_id, who, 10**16, "compound", 1, later)
    _settle(world)
    base = 10 * TRACE + 10**16
    assert _stake_of(world, pool_id, who) == base

    with world["engine"].begin() as conn:
        claim = staking_saga.enqueue_claim(conn, deployment, pool_id, who, 10**16, "compound", 2, later)
    fork = anvil.snapshot()
    world["sender"].run_once()  # signs and broadcasts; the node mines it at once
    anvil.mine(1)
    world["indexer"].run_once()
    assert _stake_of(world, pool_id, who) == base + 10**16
    assert balance(world, service.stake_account(pool_id, who)) == base + 10**16
    with world["engine"].connect() as conn:
        raw = bytes(
            conn.execute(
                sa.text(
                    "SELECT a.raw_tx FROM chain_tx_attempts a JOIN chain_outbox o ON o.id = a.outbox_id"
                    " WHERE o.key = :k ORDER BY a.id DESC LIMIT 1"
                ),
                {"k": claim.outbox_key},
            ).scalar_one()
        )

    anvil.revert(fork)
    anvil.mine(4)
    report = world["indexer"].run_once()
    assert report.reorgs == 1
    assert _stake_of(world, pool_id, who) == base
    assert balance(world, service.stake_account(pool_id, who)) == base

    # The same signed transaction lands again: applied once more, under the next generation.
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw))
    _settle(world)
    assert _stake_of(world, pool_id, who) == base + 10**16
    assert balance(world, service.stake_account(pool_id, who)) == base + 10**16
    with world["engine"].connect() as conn:
        keys = (
            conn.execute(
                sa.text(
                    "SELECT idempotency_key FROM ledger_entries"
                    " WHERE idempotency_key LIKE '%staking:compounded:%' ORDER BY id"
                )
            )
            .scalars()
            .all()
        )
    # The first compounding; the second, its reversal, and its re-inclusion.
    assert len(keys) == 4 and keys[2].startswith("reorg:") and keys[3].endswith(":g1"), keys
    assert_books_follow_the_chain(world)
    assert_books_balance(world["engine"])
