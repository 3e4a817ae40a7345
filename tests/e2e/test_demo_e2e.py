"""The whole product end to end: `tracechain dev` runs the cluster (admin API under gunicorn,
worker, sender, beat) on the machine's PostgreSQL and Redis against anvil, and `tracechain demo`
drives it through a day: points earned and claimed, a treasury top-up, stakes and reward claims,
an escrow released, one expired, one disputed and split, and one unexplained transfer to the
escrow contract. The day reconciles: every transfer matched, the one open exception is that
transfer, the proof of reserves covers every custody address, and the books balance."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import redis
import sqlalchemy as sa
from web3 import Web3

from contracts.anvil import start_anvil
from contracts.bindings import contract_at
from contracts.deployment import Deployment
from ledger import db
from tests.books import assert_books_balance
from tests.conftest import APP_ROLE, Databases
from tests.e2e.kit import own_redis_db
from tests.integration.test_dev import TRACECHAIN, DevProcess, _free_port

REDIS_DB = 13  # this module's own Redis database
DEMO_TIMEOUT_S = 600


def test_a_day_on_the_cluster_reconciles(
    databases: Databases, template_db: str, redis_url: str, tmp_path: Path
) -> None:
    broker = own_redis_db(redis_url, REDIS_DB)
    redis.Redis.from_url(broker).flushdb()
    database_url = databases.url(databases.create(template=template_db))
    with start_anvil(block_time_s=1.0) as anvil:
        deployer, signer, fees = anvil.accounts[:3]
        overrides = {
            "TRACE_DATABASE_URL": database_url,
            "TRACE_REDIS_URL": broker,
            "TRACE_RPC_URL": anvil.url,
            "TRACE_DEPLOYER_KEY": anvil.private_keys[0],
            "TRACE_SIGNER_KEY": anvil.private_keys[1],
            "TRACE_FEE_ADDRESS": fees.address,
            "TRACE_API_WORKERS": "2",
            "TRACE_CONFIRMATIONS": "1",
            "TRACE_INDEXER_INTERVAL_S": "0.5",
            "TRACE_SENDER_INTERVAL_S": "0.5",
            "TRACE_ESCROW_SWEEP_INTERVAL_S": "1",
            "TRACE_STAKING_TICK_INTERVAL_S": "2",
        }
        dev = DevProcess(tmp_path / "data", _free_port(), _free_port(), overrides)
        try:
            fields = dev.wait_ready()
            assert fields["Chain"] == anvil.url
            assert fields["Treasury"].lower() == signer.address.lower() != deployer.address.lower()
            day = subprocess.run(
                [str(TRACECHAIN), "demo", "--json", "--wait", "180"],
                env=dev.env,
                capture_output=True,
                text=True,
                timeout=DEMO_TIMEOUT_S,
                check=False,
            )
            narrative = day.stderr
            assert day.returncode == 0, f"{narrative}\n--- cluster ---\n{dev.log()}"
            summary = json.loads(day.stdout)
        finally:
            dev.close()
        assert dev.process.returncode == 0, dev.log()

        # What the demo says it saw...
        assert summary["ok"] is True and all(summary["checks"].values()), summary["checks"]
        assert {name: e["status"] for name, e in summary["escrows"].items()} == {
            "release": "released",
            "expire": "refunded",
            "dispute": "resolved",
        }
        run = summary["reconciliation"]
        assert run["counts"]["matched"] == run["transfers_checked"] > 0
        assert run["counts"]["chain_only"] == run["counts"]["ledger_only"] == run["counts"]["mismatched"] == 0
        stray = summary["unexplained_transfer"]
        [exception] = summary["exceptions"]
        assert (exception["kind"], exception["tx_hash"]) == ("unexplained_transfer", stray["tx_hash"])
        assert exception["details"]["amount"] == stray["amount"]
        reserves = summary["reserves"]
        assert reserves["solvent"] is True
        by_role = {r["role"]: r for r in reserves["addresses"].values()}
        assert set(by_role) == {"escrow", "vault", "treasury", "fee_wallet"}
        # The stray tokens are the escrow contract's cover: it owes nothing more than its escrows.
        assert by_role["escrow"]["cover"] == stray["amount"]
        assert "The day reconciles: every check holds." in narrative
        assert "Open exceptions raised during the day: 1\n" in narrative

        # ... and what the chain and the database say themselves.
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        deployment = Deployment.load(tmp_path / "data" / "deployment.json")
        token = contract_at(w3, "TraceToken", deployment.token)
        for address, line in reserves["addresses"].items():
            held = int(
                token.functions.balanceOf(Web3.to_checksum_address(address)).call(
                    block_identifier=reserves["block"]
                )
            )
            assert held == int(line["on_chain"]) == int(line["ledger_mirror"]), line
    engine = db.make_engine(database_url, role=APP_ROLE, pool_size=1)
    try:
        assert_books_balance(engine)
        with engine.connect() as conn:
            open_exceptions = conn.execute(
                sa.text("SELECT kind, tx_hash FROM finance_exceptions WHERE status = 'open'")
            ).all()
            failed = conn.execute(
                sa.text("SELECT count(*) FROM chain_outbox WHERE status = 'failed'")
            ).scalar_one()
            live_demo_keys = conn.execute(
                sa.text(
                    "SELECT count(*) FROM api_keys"
                    " WHERE label LIKE 'tracechain demo %' AND revoked_at IS NULL"
                )
            ).scalar_one()
        assert [tuple(e) for e in open_exceptions] == [("unexplained_transfer", stray["tx_hash"])]
        assert failed == 0
        assert live_demo_keys == 0  # the day's staff keys were revoked at its end
    finally:
        engine.dispose()
        redis.Redis.from_url(broker).flushdb()


def test_the_demo_without_a_cluster_says_what_is_missing(tmp_path: Path) -> None:
    env = {"TRACE_DATA_DIR": str(tmp_path), "TRACE_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [str(TRACECHAIN), "demo"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "no usable deployment record" in result.stderr
