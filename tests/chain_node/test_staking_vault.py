"""Staking on anvil through the indexer and the sender, with real PostgreSQL: a pool mirrored on
the vault through the outbox, stakes and unstakes followed from the vault's confirmed events, a
claim paid from the treasury and one compounded into the stake; every custody mirror equals
balanceOf, no hold stays open, and indexing again changes nothing."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from web3 import Web3

from contracts.bindings import contract_at, transact
from ledger.check import check_ledger
from ledger.custody import mirror_code
from ledger.staking import service
from tests.chain_node.escrow_world import TRACE, assert_books_follow_the_chain, balance, world
from workers import staking_saga

__all__ = ["world"]
RATE = 10**15  # base units a second, shared pro rata


def _settle(world: dict[str, Any], rounds: int = 8) -> None:
    """Sender, a block, indexer, until no chain action is open (and one more indexer pass)."""
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


def _position(world: dict[str, Any], pool_id: int, staker: str) -> tuple[int, int]:
    with world["engine"].connect() as conn:
        row = conn.execute(
            sa.text("SELECT stake, accrued FROM staking_positions WHERE pool_id = :p AND staker = :s"),
            {"p": pool_id, "s": staker},
        ).one()
    return int(row.stake), int(row.accrued)


def _outbox_statuses(world: dict[str, Any]) -> dict[str, str]:
    with world["engine"].connect() as conn:
        return {r.key: r.status for r in conn.execute(sa.text("SELECT key, status FROM chain_outbox"))}


def test_stake_accrue_claim_and_compound_on_a_real_node(world: dict[str, Any]) -> None:
    w3, deployment, token = world["w3"], world["deployment"], world["token"]
    staker, signer = world["buyer"], world["signer"]  # the buyer holds 1,000 TRACE
    who = staker.address.lower()
    vault = contract_at(w3, "TraceStakingVault", deployment.vault)
    # The treasury's own TRACE, out of which rewards are paid.
    transact(w3, token.functions.mint(signer.address, 1_000 * TRACE), signer)

    now = int(time.time())
    with world["engine"].begin() as conn:
        settings = service.PoolSettings("emission", None, RATE, 0, TRACE, 500 * TRACE, True)
        pool, _ = staking_saga.create_pool(conn, deployment, "anvil-pool", settings, "staff:test", now)
        service.fund_pool(conn, pool.id, 100 * TRACE, key="fund-anvil", actor="staff:test", now_s=now)
    _settle(world)
    assert vault.functions.pools(pool.id).call() == [0, TRACE, True, True]
    assert vault.functions.poolCap(pool.id).call() == 500 * TRACE

    transact(w3, token.functions.approve(vault.address, 100 * TRACE), staker)
    transact(w3, vault.functions.stake(pool.id, 40 * TRACE), staker)
    _settle(world)
    assert _position(world, pool.id, who)[0] == 40 * TRACE
    assert balance(world, service.stake_account(pool.id, who)) == 40 * TRACE
    assert balance(world, mirror_code(deployment.chain_id, deployment.vault)) == 40 * TRACE

    # 200 seconds of the pool's time later, the staker alone has earned 200 s of the rate.
    later = int(time.time()) + 200
    with world["engine"].connect() as conn:
        [reward] = service.rewards_of(conn, who, later)
    accrued = int(reward["accrued"])
    assert 200 * RATE <= accrued <= 200 * RATE + 10 * RATE  # the seconds the test itself took

    # Paid out: from the treasury to the staker, once.
    before = token.functions.balanceOf(staker.address).call()
    with world["engine"].begin() as conn:
        pay = staking_saga.enqueue_claim(conn, deployment, pool.id, who, 50 * RATE, "pay", 1, later)
    _settle(world)
    assert _outbox_statuses(world)[pay.outbox_key] == "confirmed"
    assert token.functions.balanceOf(staker.address).call() == before + 50 * RATE

    # Compounded: the treasury approves the vault once and stakes for the staker.
    with world["engine"].begin() as conn:
        compound = staking_saga.enqueue_claim(conn, deployment, pool.id, who, 30 * RATE, "compound", 2, later)
    _settle(world)
    statuses = _outbox_statuses(world)
    assert statuses[compound.outbox_key] == "confirmed"
    assert statuses[f"staking:approve:{deployment.chain_id}:{deployment.vault}"] == "confirmed"
    assert vault.functions.positions(pool.id, staker.address).call()[0] == 40 * TRACE + 30 * RATE
    assert _position(world, pool.id, who)[0] == 40 * TRACE + 30 * RATE
    assert balance(world, service.stake_account(pool.id, who)) == 40 * TRACE + 30 * RATE
    with world["engine"].connect() as conn:
        compounded = conn.execute(
            sa.text(
                "SELECT kind, chain_id FROM ledger_entries WHERE idempotency_key LIKE 'staking:compounded:%'"
            )
        ).all()
    # Booked once, from the confirmed Staked of the compounding transaction, with its chain reference.
    assert [tuple(r) for r in compounded] == [("staking.compounded", deployment.chain_id)]

    # An unstake on chain lowers the position and what the vault owes.
    transact(w3, vault.functions.unstake(pool.id, 10 * TRACE), staker)
    _settle(world)
    assert _position(world, pool.id, who)[0] == 30 * TRACE + 30 * RATE
    assert balance(world, service.stake_account(pool.id, who)) == 30 * TRACE + 30 * RATE
    assert vault.functions.totalStaked(pool.id).call() == 30 * TRACE + 30 * RATE

    assert_books_follow_the_chain(world)
    with world["engine"].connect() as conn:
        kinds = conn.execute(
            sa.text("SELECT kind FROM finance_exceptions WHERE kind <> 'unexplained_transfer'")
        ).all()
        suspense = (
            conn.execute(
                sa.text("SELECT details FROM finance_exceptions WHERE kind = 'unexplained_transfer'")
            )
            .scalars()
            .all()
        )
        report = check_ledger(conn)
    assert kinds == [], kinds
    # Only the treasury's own mint is unexplained (finance books the treasury's funds).
    assert [d["to"] for d in suspense] == [signer.address.lower()]
    assert report["ok"], report["breaks"]

    # Indexing the same chain again, and a duplicate of every handler, change nothing.
    with world["engine"].connect() as conn:
        moves = conn.execute(sa.text("SELECT count(*) FROM staking_moves")).scalar_one()
    world["indexer"].run_once()
    with world["engine"].connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM staking_moves")).scalar_one() == moves
    assert Web3.to_checksum_address(who) == staker.address
