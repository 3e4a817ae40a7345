"""`tracechain staking` from a shell: pools created, funded, changed and listed; a stake booked
as the indexer would book the vault's confirmed event; rewards, ticks and the liability report;
bad input is bad usage (exit 2) and a refused request exit 1, both writing nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ledger import db
from ledger.commands import ChainRef
from ledger.custody import ensure_chart
from ledger.staking import service
from tests.conftest import APP_ROLE
from tests.integration.test_escrow_cli import DEPLOYMENT, TRACE, _run

STAKER = "0x" + "c3" * 20


def _counts(url: str) -> tuple[Any, ...]:
    engine = db.make_engine(url, role=APP_ROLE, pool_size=1)
    try:
        with engine.connect() as conn:
            return tuple(
                conn.execute(
                    sa.text(
                        "SELECT (SELECT count(*) FROM staking_pools), (SELECT count(*) FROM staking_moves),"
                        " (SELECT count(*) FROM chain_outbox), (SELECT count(*) FROM ledger_entries),"
                        " (SELECT count(*) FROM audit_log)"
                    )
                ).one()
            )
    finally:
        engine.dispose()


def _stake(url: str, pool_id: int, amount: int) -> None:
    engine = db.make_engine(url, role=APP_ROLE, pool_size=1)
    try:
        with engine.begin() as conn:
            ensure_chart(conn, DEPLOYMENT.chain_id, DEPLOYMENT.custody)
            chain = ChainRef(DEPLOYMENT.chain_id, "0x" + "5c" * 32, 1, 10, "0x" + "dd" * 32)
            event = service.StakeEvent(chain, pool_id, STAKER, amount, amount, 0, True)
            assert service.apply_stake_event(conn, DEPLOYMENT.vault, event, 0) == "applied"
    finally:
        engine.dispose()


def test_finance_runs_pools_from_the_shell(fresh_db_url: str, tmp_path: Path) -> None:
    DEPLOYMENT.save(tmp_path / "deployment.json")
    env = {
        "TRACE_DATABASE_URL": fresh_db_url,
        "TRACE_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "TRACE_DATA_DIR": str(tmp_path),
        "TRACE_LOG_LEVEL": "WARNING",
    }
    created = _run(
        [
            "staking",
            "create",
            "silver",
            "--kind",
            "emission",
            "--rate",
            str(TRACE),
            "--lock-seconds",
            "3600",
            "--min-stake",
            "1",
        ],
        env,
    )
    assert created.returncode == 0, created.stderr
    pool = json.loads(created.stdout)
    assert (pool["result"], pool["kind"], pool["rate_per_s"], pool["lock_seconds"]) == (
        "created",
        "emission",
        str(TRACE),
        3600,
    )
    again = json.loads(
        _run(
            [
                "staking",
                "create",
                "silver",
                "--kind",
                "emission",
                "--rate",
                str(TRACE),
                "--lock-seconds",
                "3600",
                "--min-stake",
                "1",
            ],
            env,
        ).stdout
    )
    assert (again["id"], again["result"]) == (pool["id"], "exists")

    before = _counts(fresh_db_url)
    for bad in (
        ["staking", "create", "x", "--kind", "compound", "--rate", "1"],
        ["staking", "create", "x", "--kind", "emission", "--rate", "-1"],
        ["staking", "create", "x", "--kind", "emission", "--rate", str(2**256)],
        ["staking", "create", "x", "--kind", "emission", "--apr-bps", "5"],
        ["staking", "fund", str(pool["id"]), "--amount", "0", "--key", "k"],
        ["staking", "fund", "0", "--amount", "1", "--key", "k"],
        ["staking", "rewards", "not-an-address"],
    ):
        result = _run(bad, env)
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
    conflict = _run(["staking", "create", "silver", "--kind", "emission", "--rate", "2"], env)
    assert conflict.returncode == 1 and "pool_conflict" in conflict.stderr
    missing = _run(["staking", "fund", "99999", "--amount", "1", "--key", "k"], env)
    assert missing.returncode == 1 and "pool_not_found" in missing.stderr
    assert _counts(fresh_db_url) == before

    funded = _run(["staking", "fund", str(pool["id"]), "--amount", str(1000 * TRACE), "--key", "f-1"], env)
    assert funded.returncode == 0, funded.stderr
    assert json.loads(funded.stdout)["result"] == "created"
    assert (
        json.loads(
            _run(
                ["staking", "fund", str(pool["id"]), "--amount", str(1000 * TRACE), "--key", "f-1"], env
            ).stdout
        )["result"]
        == "exists"
    )

    _stake(fresh_db_url, pool["id"], 5 * TRACE)
    ticked = _run(["staking", "tick"], env)
    assert ticked.returncode == 0, ticked.stderr
    assert json.loads(ticked.stdout)["pools"] == 1
    rewards = json.loads(_run(["staking", "rewards", STAKER.upper().replace("0X", "0x")], env).stdout)
    [position] = rewards["pools"]
    assert position["stake"] == str(5 * TRACE) and int(position["accrued"]) > 0

    changed = _run(["staking", "change", str(pool["id"]), "--rate", str(2 * TRACE), "--inactive"], env)
    assert changed.returncode == 0, changed.stderr
    assert (json.loads(changed.stdout)["rate_per_s"], json.loads(changed.stdout)["active"]) == (
        str(2 * TRACE),
        False,
    )
    listed = [json.loads(line) for line in _run(["staking", "list"], env).stdout.splitlines()]
    assert [p["id"] for p in listed] == [pool["id"]]
    assert json.loads(_run(["staking", "show", str(pool["id"])], env).stdout)["active"] is False
    report = json.loads(_run(["staking", "liabilities"], env).stdout)
    [line] = report["pools"]
    assert line["funded"] == str(1000 * TRACE) and int(line["emitted"]) > 0
    assert int(line["accrued_unpaid"]) + int(line["remainder"]) == int(line["emitted"])

    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=1)
    try:
        with engine.connect() as conn:
            actions = conn.execute(
                sa.text("SELECT actor, action FROM audit_log WHERE action LIKE 'staking.%' ORDER BY id")
            ).all()
            mirrors = (
                conn.execute(
                    sa.text(
                        "SELECT key FROM chain_outbox WHERE action = 'staking.configure_pool' ORDER BY id"
                    )
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert [tuple(a) for a in actions] == [
        ("cli:alice", "staking.pool.create"),
        ("cli:alice", "staking.pool.fund"),
        ("cli:alice", "staking.pool.change"),
    ]
    assert mirrors == [f"staking:configure:{pool['id']}:1", f"staking:configure:{pool['id']}:2"]
