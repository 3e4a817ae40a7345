"""Treasury top-ups on anvil, through the real sender, indexer and PostgreSQL: the mint lands once,
its hold posts on the confirmed receipt, the indexer books the transfer into the treasury mirror
against the clearing account, and reconciliation finds nothing to explain. A reverted mint voids
the hold and raises an exception; the same key again mints nothing more."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from web3 import Web3

from contracts.anvil import AnvilNode
from contracts.bindings import MINTER_ROLE, contract_at, transact
from contracts.client import ChainClient
from contracts.deploy import deploy_platform
from contracts.events import LogDecoder
from ledger import custody, db, treasury
from ledger.errors import Conflict, InvalidInput
from tests.books import assert_books_balance, totals
from tests.conftest import APP_ROLE
from workers.indexer import Indexer
from workers.reconcile import reconcile
from workers.sender import Sender

TRACE = 10**18


@pytest.fixture
def world(anvil: AnvilNode, fresh_db_url: str) -> Iterator[dict[str, Any]]:
    snapshot = anvil.snapshot()
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    deployer, signer, fees = (Account.from_key(k) for k in anvil.private_keys[:3])
    deployment = deploy_platform(w3, deployer, signer=signer.address, fee_wallet=fees.address)
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=3)
    try:
        yield {
            "w3": w3,
            "anvil": anvil,
            "deployment": deployment,
            "token": contract_at(w3, "TraceToken", deployment.token),
            "signer": signer,
            "deployer": deployer,
            "engine": engine,
            "indexer": Indexer(
                engine, ChainClient(w3), deployment, LogDecoder(), confirmations=1, window_max=500
            ),
            "sender": Sender(
                engine, w3, signer, deployment.chain_id, confirmations=1, bump_after_s=60, max_in_flight=16
            ),
        }
    finally:
        engine.dispose()
        anvil.revert(snapshot)


def _mint(world: dict[str, Any], amount: int, key: str) -> tuple[treasury.TopUp, str]:
    d = world["deployment"]
    with world["engine"].begin() as conn:
        return treasury.mint(conn, d.chain_id, d.token, d.treasury, amount, key=key)


def _settle(world: dict[str, Any], key: str, rounds: int = 8) -> treasury.TopUp:
    for _ in range(rounds):
        world["sender"].run_once()
        world["anvil"].mine(1)
        world["indexer"].run_once()
        with world["engine"].connect() as conn:
            top_up = treasury.get(conn, key)
        if top_up.status != "pending":
            return top_up
    return top_up


def _held(world: dict[str, Any]) -> int:
    return int(
        world["token"].functions.balanceOf(Web3.to_checksum_address(world["deployment"].treasury)).call()
    )


def _exception_kinds(world: dict[str, Any]) -> list[str]:
    with world["engine"].connect() as conn:
        return list(conn.execute(sa.text("SELECT kind FROM finance_exceptions ORDER BY id")).scalars())


def test_a_top_up_mints_once_and_the_books_follow_the_chain(world: dict[str, Any]) -> None:
    d = world["deployment"]
    top_up, status = _mint(world, 500 * TRACE, "t1")
    assert (status, top_up.status, top_up.amount) == ("created", "pending", 500 * TRACE)
    assert _mint(world, 500 * TRACE, "t1")[1] == "exists"  # the same request again
    minted = _settle(world, "t1")
    assert minted.status == "minted" and minted.tx_hash is not None
    assert _held(world) == 500 * TRACE
    # Two more passes: the indexer books the confirmed transfer; nothing goes out twice.
    for _ in range(2):
        world["sender"].run_once()
        world["anvil"].mine(1)
        world["indexer"].run_once()
    assert _held(world) == 500 * TRACE
    mirror = custody.mirror_code(d.chain_id, d.treasury)
    assert totals(world["engine"], mirror) == (500 * TRACE, 0, 0, 0)
    assert totals(world["engine"], treasury.issued_code(d.chain_id)) == (0, 500 * TRACE, 0, 0)
    clearing = totals(world["engine"], custody.clearing_code(d.chain_id))
    assert clearing[0] == clearing[1] == 500 * TRACE and clearing[2:] == (0, 0)
    assert _exception_kinds(world) == []
    report = reconcile(world["engine"], world["w3"], d)
    assert report.ok and report.breaks == ()
    assert report.counts["matched"] >= 1
    assert report.balances[d.treasury].drift == 0
    assert_books_balance(world["engine"])


def test_a_key_reused_for_another_amount_or_bad_input_writes_nothing(world: dict[str, Any]) -> None:
    _mint(world, 10 * TRACE, "t-conflict")
    with world["engine"].connect() as conn:
        before = conn.execute(sa.text("SELECT count(*) FROM chain_outbox")).scalar_one()
    with pytest.raises(Conflict, match="other content"):
        _mint(world, 11 * TRACE, "t-conflict")
    for amount in (0, -1, 2**256, True):
        with pytest.raises(InvalidInput):
            _mint(world, amount, "t-bad")
    with pytest.raises(InvalidInput):
        _mint(world, TRACE, "")
    with world["engine"].connect() as conn:
        after = conn.execute(sa.text("SELECT count(*) FROM chain_outbox")).scalar_one()
        missing = conn.execute(
            sa.text("SELECT count(*) FROM ledger_entries WHERE idempotency_key = 'treasury:mint:t-bad'")
        ).scalar_one()
    assert after == before and missing == 0
    assert totals(world["engine"], treasury.issued_code(world["deployment"].chain_id)) == (
        0,
        0,
        0,
        10 * TRACE,
    )


def test_a_reverted_top_up_voids_its_hold_and_raises_an_exception(world: dict[str, Any]) -> None:
    w3, token = world["w3"], world["token"]
    transact(w3, token.functions.revokeRole(MINTER_ROLE, world["signer"].address), world["deployer"])
    _mint(world, 7 * TRACE, "t-revert")
    failed = _settle(world, "t-revert")
    assert failed.status == "failed" and _held(world) == 0
    d = world["deployment"]
    assert totals(world["engine"], treasury.issued_code(d.chain_id)) == (0, 0, 0, 0)
    assert totals(world["engine"], custody.clearing_code(d.chain_id)) == (0, 0, 0, 0)
    assert _exception_kinds(world) == ["chain_action_failed"]
    assert_books_balance(world["engine"])
