"""`tracechain treasury` from a shell: a top-up held, queued and audited under the shell user, the
same key again the same top-up; bad input is bad usage (exit 2) and a conflict exit 1, both
writing nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ledger import db
from tests.conftest import APP_ROLE
from tests.integration.test_escrow_cli import DEPLOYMENT, TRACE, _run


def _counts(url: str) -> tuple[Any, ...]:
    engine = db.make_engine(url, role=APP_ROLE, pool_size=1)
    try:
        with engine.connect() as conn:
            return tuple(
                conn.execute(
                    sa.text(
                        "SELECT (SELECT count(*) FROM chain_outbox), (SELECT count(*) FROM ledger_entries),"
                        " (SELECT count(*) FROM audit_log)"
                    )
                ).one()
            )
    finally:
        engine.dispose()


def test_an_admin_tops_up_the_treasury_from_the_shell(fresh_db_url: str, tmp_path: Path) -> None:
    DEPLOYMENT.save(tmp_path / "deployment.json")
    env = {
        "TRACE_DATABASE_URL": fresh_db_url,
        "TRACE_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "TRACE_DATA_DIR": str(tmp_path),
        "TRACE_LOG_LEVEL": "WARNING",
    }
    minted = _run(["treasury", "mint", "--amount", str(40 * TRACE), "--key", "q1"], env)
    assert minted.returncode == 0, minted.stderr
    top_up = json.loads(minted.stdout)
    assert (top_up["result"], top_up["status"], top_up["amount"]) == ("created", "pending", str(40 * TRACE))
    assert top_up["treasury"] == DEPLOYMENT.treasury
    again = _run(["treasury", "mint", "--amount", str(40 * TRACE), "--key", "q1"], env)
    assert json.loads(again.stdout)["result"] == "exists"
    shown = _run(["treasury", "show", "q1"], env)
    assert json.loads(shown.stdout)["key"] == "q1"
    before = _counts(fresh_db_url)
    assert before[2] == 1  # one audit row: the top-up, by cli:alice
    for bad in (
        ["--amount", "-5", "--key", "q2"],
        ["--amount", "1.5", "--key", "q2"],
        ["--amount", str(2**256), "--key", "q2"],
    ):
        refused = _run(["treasury", "mint", *bad], env)
        assert refused.returncode == 2, refused.stderr
        assert "amount" in refused.stderr
    conflict = _run(["treasury", "mint", "--amount", str(41 * TRACE), "--key", "q1"], env)
    assert conflict.returncode == 1 and "other content" in conflict.stderr
    unknown = _run(["treasury", "show", "q-none"], env)
    assert unknown.returncode == 1 and "q-none" in unknown.stderr
    assert _counts(fresh_db_url) == before
