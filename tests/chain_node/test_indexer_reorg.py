"""Reorgs on a real node (anvil, snapshot and revert): a shallow one never reaches the ledger,
a deep one is compensated, and the custody mirror equals balanceOf afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from web3 import Web3

from contracts.anvil import AnvilNode
from contracts.bindings import transact
from contracts.client import ChainClient
from contracts.events import LogDecoder
from ledger import custody, db
from ledger.accounts import get_account
from tests.books import assert_books_balance
from tests.chainkit import token_deployment
from tests.conftest import APP_ROLE
from workers.indexer import Indexer

CONFIRMATIONS = 2
TRACE = 10**18


@pytest.fixture
def world(anvil: AnvilNode, fresh_db_url: str) -> Iterator[dict[str, Any]]:
    snapshot = anvil.snapshot()
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    accounts = [Account.from_key(k) for k in anvil.private_keys[:6]]
    token, deployment = token_deployment(w3, accounts, 100 * TRACE)
    user, escrow = accounts[1], accounts[2]
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=2)
    indexer = Indexer(
        engine, ChainClient(w3), deployment, LogDecoder(), confirmations=CONFIRMATIONS, window_max=100
    )
    try:
        yield {"w3": w3, "token": token, "user": user, "escrow": escrow, "engine": engine, "indexer": indexer}
    finally:
        engine.dispose()
        anvil.revert(snapshot)


def _mirror(world: dict[str, Any]) -> int:
    with world["engine"].connect() as conn:
        account = get_account(conn, custody.mirror_code(world["indexer"].chain_id, world["escrow"].address))
    return account.balance


def _on_chain(world: dict[str, Any]) -> int:
    return int(world["token"].functions.balanceOf(world["escrow"].address).call())


def test_shallow_reorg_on_anvil_never_reaches_the_ledger(anvil: AnvilNode, world: dict[str, Any]) -> None:
    w3, token, user, escrow = world["w3"], world["token"], world["user"], world["escrow"]
    world["indexer"].run_once()
    fork = anvil.snapshot()
    transact(w3, token.functions.transfer(escrow.address, 7 * TRACE), user)
    assert world["indexer"].run_once().events_stored == 1  # seen, not yet confirmed
    anvil.revert(fork)
    transact(w3, token.functions.transfer(escrow.address, 3 * TRACE), user)
    anvil.mine(CONFIRMATIONS + 1)
    report = world["indexer"].run_once()
    assert (report.reorgs, report.orphaned, report.compensated) == (1, 1, 0)
    assert _mirror(world) == _on_chain(world) == 3 * TRACE


def test_deep_reorg_on_anvil_is_compensated(anvil: AnvilNode, world: dict[str, Any]) -> None:
    w3, token, user, escrow = world["w3"], world["token"], world["user"], world["escrow"]
    fork = anvil.snapshot()
    transact(w3, token.functions.transfer(escrow.address, 7 * TRACE), user)
    anvil.mine(CONFIRMATIONS)
    assert world["indexer"].run_once().entries_booked == 1
    assert _mirror(world) == 7 * TRACE
    anvil.revert(fork)
    transact(w3, token.functions.transfer(escrow.address, 2 * TRACE), user)
    anvil.mine(CONFIRMATIONS + 4)
    report = world["indexer"].run_once()
    assert report.reorgs == 1
    assert report.compensated == 1
    assert report.entries_booked == 1
    assert _mirror(world) == _on_chain(world) == 2 * TRACE
    with world["engine"].connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions ORDER BY id")).scalars().all()
    assert kinds.count("reorg_compensated") == 1
    assert_books_balance(world["engine"])
