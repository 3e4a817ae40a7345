"""`tracechain escrow` as finance runs it: list, show, dispute, a split decided by one shell user
and approved by another (the same user is refused), history, sweep. The chain is not needed:
the escrow's funding is applied as the indexer would apply a confirmed event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from contracts.deployment import Deployment
from ledger import custody, db
from ledger.commands import ChainRef
from ledger.engine import post_batch
from ledger.escrow import attestation, service
from tests.conftest import APP_ROLE

BIN = Path(sys.executable).parent
TRACE = 10**18
DEPLOYMENT = Deployment(
    chain_id=31337,
    start_block=0,
    token="0x" + "10" * 20,
    escrow="0x" + "20" * 20,
    vault="0x" + "30" * 20,
    treasury="0x" + "40" * 20,
    fee_wallet="0x" + "50" * 20,
)
BUYER, SELLER = "0x" + "a1" * 20, "0x" + "b2" * 20


def _run(args: list[str], env: dict[str, str], user: str = "alice") -> subprocess.CompletedProcess[str]:
    full = (
        {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
        | env
        | {"USER": user, "LOGNAME": user}
    )
    return subprocess.run(
        [str(BIN / "tracechain"), *args], env=full, capture_output=True, text=True, timeout=120, check=False
    )


def _funded_escrow(url: str) -> service.Escrow:
    engine = db.make_engine(url, role=APP_ROLE, pool_size=1)
    _, pubkey, pop = attestation.generate_attestor(b"cli-attestor".ljust(32, b"-"))
    deadline = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    try:
        with engine.begin() as conn:
            attestor, _ = service.register_attestor(conn, "cli", pubkey, pop)
            escrow, _ = service.create_escrow(
                conn,
                service.NewEscrow(
                    key="cli-1",
                    chain_id=DEPLOYMENT.chain_id,
                    contract=DEPLOYMENT.escrow,
                    buyer=BUYER,
                    seller=SELLER,
                    amount=100 * TRACE,
                    fee_bps=250,
                    deadline=deadline,
                    delivery_ref="BOL-cli-1",
                    attestor_ids=(attestor,),
                    threshold=1,
                ),
                "staff:test",
            )
            chain = ChainRef(DEPLOYMENT.chain_id, "0x" + "ee" * 32, 1, 10, "0x" + "dd" * 32)
            funding = service.Funding(
                chain, DEPLOYMENT.escrow, escrow.id, BUYER, SELLER, 100 * TRACE, deadline
            )
            # As the indexer books it: the tokens into the escrow contract's mirror, owed to the escrow.
            custody.ensure_chart(conn, DEPLOYMENT.chain_id, DEPLOYMENT.custody)
            transfer = custody.TokenTransfer(chain, BUYER, DEPLOYMENT.escrow, 100 * TRACE)
            booking = custody.book_custody_transfer(
                transfer, DEPLOYMENT.custody, service.escrow_account(escrow.id)
            )
            assert booking is not None
            [booked] = post_batch(conn, [booking.entry])
            assert booked.status == "created", booked.reason
            assert service.record_funding(conn, funding) == "funded"
        with engine.connect() as conn:
            return service.get_escrow(conn, escrow.id)
    finally:
        engine.dispose()


def test_finance_disputes_and_splits_from_the_shell(fresh_db_url: str, tmp_path: Path) -> None:
    DEPLOYMENT.save(tmp_path / "deployment.json")
    env = {
        "TRACE_DATABASE_URL": fresh_db_url,
        "TRACE_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "TRACE_DATA_DIR": str(tmp_path),
        "TRACE_ESCROW_APPROVAL_ABOVE": str(10 * TRACE),
        "TRACE_LOG_LEVEL": "WARNING",
    }
    escrow = _funded_escrow(fresh_db_url)
    listed = _run(["escrow", "list", "--status", "funded"], env)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [escrow.id]
    shown = json.loads(_run(["escrow", "show", escrow.id], env).stdout)
    assert (shown["status"], shown["remaining"]) == ("funded", str(100 * TRACE))

    # A split before a dispute is refused (exit 1), and so is a release before delivery.
    early = _run(["escrow", "resolve", escrow.id, "--seller", "1", "--buyer", "0", "--fee", "0"], env)
    assert early.returncode == 1 and "escrow_transition_refused" in early.stderr
    assert _run(["escrow", "release", escrow.id], env).returncode == 1
    opened = _run(["escrow", "dispute", escrow.id, "--reason", "short delivery"], env)
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["party"] == "staff"
    # A bad amount is bad usage (exit 2) and writes nothing.
    bad = _run(["escrow", "resolve", escrow.id, "--seller", "-5", "--buyer", "0", "--fee", "0"], env)
    assert bad.returncode == 2
    split = ["--seller", str(70 * TRACE), "--buyer", str(28 * TRACE), "--fee", str(2 * TRACE)]
    decided = _run(["escrow", "resolve", escrow.id, *split], env)
    assert decided.returncode == 0, decided.stderr
    resolution: dict[str, Any] = json.loads(decided.stdout)
    assert (resolution["status"], resolution["decided_by"]) == ("awaiting_approval", "cli:alice")
    same_user = _run(["escrow", "approve", str(resolution["id"])], env)
    assert same_user.returncode == 1 and "four_eyes" in same_user.stderr
    approved = _run(["escrow", "approve", str(resolution["id"])], env, user="bob")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] == "executing"

    history = json.loads(_run(["escrow", "history", escrow.id], env).stdout)
    assert history["escrow"]["status"] == "resolving"
    assert sorted(tx["action"] for tx in history["chain_txs"]) == [
        "escrow.extend_deadline",
        "escrow.refund",
        "escrow.release",
    ]
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=1)
    try:
        with engine.connect() as conn:
            actions = conn.execute(
                sa.text("SELECT actor, action FROM audit_log WHERE action LIKE 'escrow.%' ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(a) for a in actions] == [
        ("cli:alice", "escrow.dispute"),
        ("cli:alice", "escrow.resolve"),
        ("cli:bob", "escrow.approve"),
    ]
    swept = _run(["escrow", "sweep"], env)
    assert swept.returncode == 0, swept.stderr
    assert json.loads(swept.stdout)["expired"] == 0
