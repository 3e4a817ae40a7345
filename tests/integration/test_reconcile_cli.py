"""`tracechain reconcile`, `reconcile report` and `reconcile reserves` as a user runs them, against
the embedded dev chain served over HTTP and a real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3

from contracts.bindings import contract_at, transact
from contracts.devchain import DevChain, DevChainServer

BIN = Path(sys.executable).parent
TRACE = 10**18


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tracechain"), *args],
        check=False,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def platform(
    fresh_db_url: str, tmp_path: Path
) -> Iterator[tuple[DevChainServer, dict[str, str], dict[str, Any]]]:
    with DevChainServer(DevChain(), "127.0.0.1", 0) as server:
        deployer, signer, fees = server.chain.accounts[:3]
        env = {
            "TRACE_RPC_URL": server.url,
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
        yield server, env, json.loads(created.stdout)


def test_reconcile_report_and_reserves_from_the_shell(
    platform: tuple[DevChainServer, dict[str, str], dict[str, Any]],
) -> None:
    server, env, record = platform
    _deployer, signer, _fees, user = server.chain.accounts[:4]
    w3 = Web3(Web3.HTTPProvider(server.url))
    token = contract_at(w3, "TraceToken", record["token"])
    # Before the indexer has followed a block there is nothing to compare: bad usage, nothing stored.
    early = _run(["reconcile"], env)
    assert early.returncode == 2
    assert "has not handled any block" in early.stderr

    # The treasury is funded by a mint (nothing in the books explains it: suspense); a user sends
    # TRACE to the escrow contract unasked.
    transact(w3, token.functions.mint(signer.address, 500 * TRACE), Account.from_key(signer.private_key))
    transact(w3, token.functions.mint(user.address, 50 * TRACE), Account.from_key(signer.private_key))
    transact(
        w3,
        token.functions.transfer(Web3.to_checksum_address(record["escrow"]), 8 * TRACE),
        Account.from_key(user.private_key),
    )
    assert _run(["index", "--once"], env).returncode == 0

    run = _run(["reconcile"], env)
    # The custody transfers are booked (the unasked one to suspense, with its own exception); the
    # mint to the user went round the books, so it is a break: exit 1.
    assert run.returncode == 1, run.stderr
    result = json.loads(run.stdout)
    assert result["counts"] == {"matched": 2, "chain_only": 1, "ledger_only": 0, "mismatched": 0}
    assert [(b["class"], b["details"].get("scope")) for b in result["breaks"]] == [
        ("chain_only", "mint"),
        ("mint_drift", None),
    ]
    assert result["balances"][record["escrow"]] == {
        "ledger": str(8 * TRACE),
        "chain": str(8 * TRACE),
        "drift": "0",
    }
    assert result["minted"] == {"ledger": "0", "chain": str(50 * TRACE), "drift": str(50 * TRACE)}
    assert "found 2 break(s)" in run.stderr

    report = _run(["reconcile", "report"], env)
    assert report.returncode == 0, report.stderr
    stored = json.loads(report.stdout)
    assert stored["run_id"] == result["run_id"]
    assert sorted(e["kind"] for e in stored["open_exceptions"]) == [
        "recon_chain_only",
        "recon_mint_drift",
        "unexplained_transfer",  # the treasury's funding mint
        "unexplained_transfer",  # the unasked transfer to the escrow contract
    ]
    summary = _run(["reconcile", "report", "--format", "csv"], env)
    assert dict(csv.reader(io.StringIO(summary.stdout)))["chain_only"] == "1"
    breaks = list(
        csv.DictReader(
            io.StringIO(_run(["reconcile", "report", "--format", "csv", "--part", "breaks"], env).stdout)
        )
    )
    assert [b["class"] for b in breaks] == ["chain_only", "mint_drift"]
    queue = list(
        csv.DictReader(
            io.StringIO(_run(["reconcile", "report", "--format", "csv", "--part", "exceptions"], env).stdout)
        )
    )
    assert len(queue) == 4

    reserves = _run(["reconcile", "reserves"], env)
    assert reserves.returncode == 0, reserves.stderr
    statement = json.loads(reserves.stdout)
    assert statement["solvent"] is True
    assert statement["addresses"][record["escrow"]]["on_chain"] == str(8 * TRACE)
    assert statement["addresses"][record["treasury"]]["on_chain"] == str(500 * TRACE)

    # A range the books have not followed is bad usage and stores nothing.
    beyond = _run(["reconcile", "--to-block", str(10**6)], env)
    assert beyond.returncode == 2
    assert "beyond the last confirmed block" in beyond.stderr
    missing = _run(["reconcile", "report", "--run", "999"], env)
    assert missing.returncode == 1
    assert "no reconciliation run 999" in missing.stderr
    latest = json.loads(_run(["reconcile", "report"], env).stdout)
    assert latest["run_id"] == result["run_id"]
