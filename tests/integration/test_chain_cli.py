"""`tracechain deploy` and `tracechain index --once` as a user runs them, against the embedded dev
chain served over HTTP and a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from web3 import Web3

from contracts.bindings import MINTER_ROLE, contract_at, transact
from contracts.devchain import DevChain, DevChainServer
from ledger import custody, db
from ledger.accounts import get_account
from tests.conftest import APP_ROLE

BIN = Path(sys.executable).parent
TRACE = 10**18


@pytest.fixture
def chain() -> Iterator[DevChainServer]:
    with DevChainServer(DevChain(), "127.0.0.1", 0) as server:
        yield server


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tracechain"), *args],
        check=False,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deploy_once_then_index_an_unexplained_transfer(
    chain: DevChainServer, fresh_db_url: str, tmp_path: Path
) -> None:
    deployer, signer, fees, user = chain.chain.accounts[:4]
    env = {
        "TRACE_RPC_URL": chain.url,
        "TRACE_DATABASE_URL": fresh_db_url,
        "TRACE_DEPLOYER_KEY": deployer.private_key,
        "TRACE_SIGNER_KEY": signer.private_key,
        "TRACE_FEE_ADDRESS": fees.address,
        "TRACE_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "TRACE_CONFIRMATIONS": "0",
        "TRACE_DATA_DIR": str(tmp_path),
        "TRACE_LOG_LEVEL": "WARNING",
    }
    created = _run(["deploy"], env)
    assert created.returncode == 0, created.stderr
    record: dict[str, Any] = json.loads(created.stdout)
    assert record["status"] == "created"
    assert record["treasury"] == signer.address.lower()
    assert record["fee_wallet"] == fees.address.lower()
    # The key never shows in what the command prints.
    assert signer.private_key[2:] not in created.stdout + created.stderr
    again = _run(["deploy"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "exists"
    assert json.loads(again.stdout)["token"] == record["token"]

    w3 = Web3(Web3.HTTPProvider(chain.url))
    token = contract_at(w3, "TraceToken", record["token"])
    escrow = contract_at(w3, "TraceEscrow", record["escrow"])
    assert token.functions.hasRole(MINTER_ROLE, signer.address).call()
    assert escrow.functions.feeRecipient().call() == fees.address
    platform = Account.from_key(signer.private_key)
    transact(w3, token.functions.mint(user.address, 50 * TRACE), platform)
    transact(w3, token.functions.transfer(escrow.address, 8 * TRACE), Account.from_key(user.private_key))

    indexed = _run(["index", "--once"], env)
    assert indexed.returncode == 0, indexed.stderr
    report = json.loads(indexed.stdout)
    assert report["entries_booked"] == 1
    assert report["exceptions_raised"] == 1
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=1)
    try:
        with engine.connect() as conn:
            mirror = get_account(conn, custody.mirror_code(record["chain_id"], record["escrow"]))
            kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions")).scalars().all()
        assert mirror.balance == token.functions.balanceOf(escrow.address).call() == 8 * TRACE
        assert kinds == ["unexplained_transfer"]
    finally:
        engine.dispose()
    # A second pass finds nothing new.
    second = json.loads(_run(["index", "--once"], env).stdout)
    assert (second["entries_booked"], second["events_stored"]) == (0, 0)


def test_deploy_without_a_key_is_a_usage_error(chain: DevChainServer, tmp_path: Path) -> None:
    result = _run(
        ["deploy"],
        {
            "TRACE_RPC_URL": chain.url,
            "TRACE_SIGNER_KEY": "",
            "TRACE_DEPLOYER_KEY": "not-a-key",
            "TRACE_DEPLOYMENT_FILE": str(tmp_path / "d.json"),
        },
    )
    assert result.returncode == 2
    assert "TRACE_DEPLOYER_KEY is not a 32-byte hex private key" in result.stderr
    assert not (tmp_path / "d.json").exists()
