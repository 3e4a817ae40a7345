"""`tracechain exceptions` as finance runs it: the queue, assign, note, a write-off proposed by one
shell user and approved by another (the proposer is refused), a manual match, bad usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from ledger import db
from ledger.accounts import create_account, create_asset
from ledger.commands import Leg, NewEntry
from ledger.engine import post_batch
from ledger.exceptions_queue import open_exception
from tests.conftest import APP_ROLE

BIN = Path(sys.executable).parent


def _run(args: list[str], url: str, user: str = "ann") -> subprocess.CompletedProcess[str]:
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
        | {"TRACE_DATABASE_URL": url, "TRACE_LOG_LEVEL": "WARNING"}
        | {"USER": user, "LOGNAME": user}
    )
    return subprocess.run(
        [str(BIN / "tracechain"), "exceptions", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_working_the_queue_from_the_shell(fresh_db_url: str) -> None:
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=1)
    try:
        with engine.begin() as conn:
            create_asset(conn, "TRACE", 18)
            create_account(conn, "suspense:chain:1", "TRACE", "liability")
            create_account(conn, "chain:1:custody", "TRACE", "asset")
            create_account(conn, "revenue:unclaimed", "TRACE", "revenue")
            post_batch(conn, [NewEntry("in", (Leg("chain:1:custody", "suspense:chain:1", 40),))])
            open_exception(conn, "unexplained:a", "unexplained_transfer", {"amount": "40"})
            open_exception(conn, "unexplained:b", "unexplained_transfer", {"amount": "1"})

        listed = _run(["list", "--status", "open"], fresh_db_url)
        assert listed.returncode == 0, listed.stderr
        assert [e["key"] for e in json.loads(listed.stdout)] == ["unexplained:a", "unexplained:b"]
        assert json.loads(_run(["assign", "1", "ben"], fresh_db_url).stdout)["assignee"] == "ben"
        assert (
            json.loads(_run(["note", "1", "sender is a known buyer"], fresh_db_url).stdout)["notes"][0][
                "author"
            ]
            == "cli:ann"
        )

        proposed = _run(
            [
                "writeoff",
                "1",
                "--debit",
                "suspense:chain:1",
                "--credit",
                "revenue:unclaimed",
                "--amount",
                "40",
                "--reason",
                "unclaimed",
            ],
            fresh_db_url,
        )
        assert proposed.returncode == 0, proposed.stderr
        wid = str(json.loads(proposed.stdout)["id"])
        own = _run(["approve", wid], fresh_db_url, user="ann")
        assert own.returncode == 1
        assert "four_eyes" in own.stderr
        approved = _run(["approve", wid], fresh_db_url, user="ben")
        assert approved.returncode == 0, approved.stderr
        assert json.loads(approved.stdout)["decided_by"] == "cli:ben"
        shown = json.loads(_run(["show", "1"], fresh_db_url).stdout)
        assert (shown["status"], shown["resolution"]) == ("resolved", "write_off")

        matched = _run(["match", "2", "--note", "dust returned by hand"], fresh_db_url)
        assert json.loads(matched.stdout)["resolution"] == "manual_match"

        bad = _run(
            ["writeoff", "2", "--debit", "a", "--credit", "b", "--amount", "ten", "--reason", "r"],
            fresh_db_url,
        )
        assert bad.returncode == 2
        missing = _run(["show", "99"], fresh_db_url)
        assert missing.returncode == 1
        assert "no exception 99" in missing.stderr
        with engine.connect() as conn:
            actions = conn.execute(sa.text("SELECT action, actor FROM audit_log ORDER BY id")).all()
        assert [tuple(a) for a in actions] == [
            ("exception.assign", "cli:ann"),
            ("exception.note", "cli:ann"),
            ("writeoff.propose", "cli:ann"),
            ("writeoff.approve", "cli:ben"),
            ("exception.match", "cli:ann"),
        ]
    finally:
        engine.dispose()
