"""The indexer's log window shrinks when the node refuses a request (too many results) and
grows again when quiet; nothing is skipped either way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from eth_account import Account
from web3 import Web3

from contracts.bindings import transact
from contracts.client import ChainClient
from contracts.devchain import DevChain, DevChainServer
from contracts.events import LogDecoder
from ledger import custody, db
from ledger.accounts import get_account
from tests.chainkit import token_deployment
from tests.conftest import APP_ROLE
from workers.indexer import Indexer

MAX_LOGS = 4


@pytest.fixture
def chain() -> Iterator[DevChainServer]:
    with DevChainServer(DevChain(max_logs=MAX_LOGS), "127.0.0.1", 0) as server:
        yield server


def test_window_shrinks_on_a_refused_request_and_reads_everything(
    chain: DevChainServer, fresh_db_url: str
) -> None:
    w3 = Web3(Web3.HTTPProvider(chain.url))
    accounts = [Account.from_key(a.private_key) for a in chain.chain.accounts[:6]]
    token, deployment = token_deployment(w3, accounts, 100)
    user, escrow = accounts[1], accounts[2]
    for amount in range(1, 13):  # twelve transfers into custody, one block each
        transact(w3, token.functions.transfer(escrow.address, amount), user)
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=2)
    try:
        indexer = Indexer(engine, ChainClient(w3), deployment, LogDecoder(), confirmations=0, window_max=1000)
        report = indexer.run_once()
        assert report.shrinks > 0
        # Two role grants (deployment, minter), the mint, the twelve transfers.
        assert report.events_stored == 2 + 1 + 12
        with engine.connect() as conn:
            mirror = get_account(conn, custody.mirror_code(deployment.chain_id, deployment.escrow))
            window = conn.execute(sa.text("SELECT window_blocks FROM chain_cursors")).scalar_one()
        assert mirror.balance == token.functions.balanceOf(escrow.address).call() == sum(range(1, 13))
        # Quiet windows let it grow again.
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        indexer.run_once()
        with engine.connect() as conn:
            grown = conn.execute(sa.text("SELECT window_blocks FROM chain_cursors")).scalar_one()
        assert grown > window
    finally:
        engine.dispose()
