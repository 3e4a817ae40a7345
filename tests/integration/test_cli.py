"""The `tracechain` command line against a real PostgreSQL: import/export, reports, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from admin_api.cli import main
from ledger import db

TX = "0x" + "ab" * 32
BLOCK = "0x" + "cd" * 32
TRACECHAIN = Path(sys.executable).with_name("tracechain")

Run = Callable[..., Result]


def _jsonl(lines: Sequence[dict[str, Any] | str]) -> str:
    return "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)


def _entry(key: str, debit: str, credit: str, amount: str, **extra: Any) -> dict[str, Any]:
    leg: dict[str, Any] = {"debit": debit, "credit": credit, "amount": amount}
    leg.update({k: extra.pop(k) for k in ("asset", "pending", "timeout_s") if k in extra})
    return {"type": "entry", "key": key, "transfers": [leg], **extra}


def _chain(block: int, log_index: int = 0) -> dict[str, Any]:
    return {"chain_id": 1, "tx_hash": TX, "log_index": log_index, "block_number": block, "block_hash": BLOCK}


CUSTODY = "chain:1:0x00000000000000000000000000000000000000aa"

SAMPLE: list[dict[str, Any] | str] = [
    {"type": "asset", "code": "TRACE", "scale": 18},
    {"type": "asset", "code": "PTS", "scale": 0},
    {"type": "account", "code": "treasury", "asset": "TRACE", "kind": "equity"},
    {"type": "account", "code": CUSTODY, "asset": "TRACE", "kind": "asset"},
    {
        "type": "account",
        "code": "user:alice",
        "asset": "TRACE",
        "kind": "liability",
        "flags": ["debits_must_not_exceed_credits"],
    },
    {
        "type": "account",
        "code": "user:bob",
        "asset": "TRACE",
        "kind": "liability",
        "flags": ["debits_must_not_exceed_credits"],
        "metadata": {"tier": "gold"},
    },
    {"type": "account", "code": "points:issued", "asset": "PTS", "kind": "equity"},
    {"type": "account", "code": "points:alice", "asset": "PTS", "kind": "liability"},
    _entry("fund", "treasury", "user:alice", "1000000000000000000", asset="TRACE", metadata={"why": "grant"}),
    _entry("mirror-1", CUSTODY, "treasury", "500", chain=_chain(10)),
    _entry("mirror-2", CUSTODY, "treasury", "250", chain=_chain(20, 3)),
    _entry("hold-1", "user:alice", "user:bob", "300", pending=True, timeout_s=3600),
    {"type": "post", "key": "post-1", "pending_key": "hold-1", "amount": "100"},
    _entry("hold-2", "user:alice", "user:bob", "50", pending=True),
    {"type": "void", "key": "void-2", "pending_key": "hold-2"},
    _entry("pay-bob", "user:alice", "user:bob", "40", kind="payment", effective_at="2026-01-01T00:00:00Z"),
    {"type": "reverse", "key": "undo-pay-bob", "entry_key": "pay-bob"},
    _entry("points", "points:issued", "points:alice", "12"),
]
SAMPLE_CREATED = len(SAMPLE)


@pytest.fixture
def run() -> Run:
    """Invoke the CLI in-process; ``db`` names the database (TRACE_DATABASE_URL)."""

    def invoke(args: Sequence[str], db: str, input: str | bytes | None = None, **env: str) -> Result:
        runner = CliRunner()
        return runner.invoke(
            main,
            list(args),
            input=input,
            env={"TRACE_DATABASE_URL": db, "TRACE_LOG_LEVEL": "WARNING", **env},
            catch_exceptions=False,
        )

    return invoke


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.jsonl"
    path.write_text(_jsonl(SAMPLE))
    return path


@pytest.fixture
def booked(run: Run, sample: Path, fresh_db_url: str) -> str:
    """A fresh database holding the sample ledger."""
    result = run(["ledger", "import", str(sample)], fresh_db_url)
    assert result.exit_code == 0, result.output
    return fresh_db_url


def _records(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def _state(url: str) -> dict[str, Any]:
    """Every account's definition and totals, plus row counts: what an import may change."""
    with psycopg.connect(db.libpq_url(url)) as conn:
        accounts = conn.execute(
            "SELECT a.code, s.code, a.kind, a.debits_must_not_exceed_credits,"
            " a.credits_must_not_exceed_debits, a.closed, a.debits_posted::text, a.credits_posted::text,"
            " a.debits_pending::text, a.credits_pending::text, a.metadata::text"
            " FROM ledger_accounts a JOIN ledger_assets s ON s.id = a.asset_id ORDER BY a.code"
        ).fetchall()
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM ledger_assets), (SELECT count(*) FROM ledger_entries),"
            " (SELECT count(*) FROM ledger_transfers)"
        ).fetchone()
    return {"accounts": accounts, "counts": counts}


# --- import ----------------------------------------------------------------------------------


def test_import_reports_each_line_and_rerun_creates_nothing(
    run: Run, sample: Path, fresh_db_url: str
) -> None:
    first = run(["ledger", "import", str(sample)], fresh_db_url)
    assert first.exit_code == 0, first.output
    records = _records(first)
    assert records[-1] == {"summary": {"created": SAMPLE_CREATED, "exists": 0, "rejected": 0}}
    assert [r["line"] for r in records[:-1]] == list(range(1, SAMPLE_CREATED + 1))
    assert records[0] == {"line": 1, "status": "created", "code": "TRACE"}
    assert records[8]["key"] == "fund" and records[8]["status"] == "created"
    state = _state(fresh_db_url)
    alice = next(a for a in state["accounts"] if a[0] == "user:alice")
    # funded 10^18; hold of 300 posted 100; hold of 50 voided; 40 paid and reversed.
    assert alice[6:10] == ("140", "1000000000000000040", "0", "0")

    again = run(["ledger", "import", str(sample)], fresh_db_url)
    assert again.exit_code == 0
    assert _records(again)[-1] == {"summary": {"created": 0, "exists": SAMPLE_CREATED, "rejected": 0}}
    assert all(r["status"] == "exists" for r in _records(again)[:-1])
    assert _state(fresh_db_url) == state


def test_import_from_stdin(run: Run, fresh_db_url: str) -> None:
    # A batch size above the engine's own limit is a configuration error: usage, nothing booked.
    refused = run(
        ["ledger", "import", "-"], fresh_db_url, input=_jsonl(SAMPLE[:9]), TRACE_ENGINE_BATCH_MAX="100000"
    )
    assert refused.exit_code == 2
    assert "TRACE_ENGINE_BATCH_MAX" in refused.output
    result = run(["ledger", "import", "-"], fresh_db_url, input=_jsonl(SAMPLE[:9]))
    assert result.exit_code == 0, result.output
    assert _records(result)[-1]["summary"]["created"] == 9
    balance = run(["ledger", "balance", "user:alice"], fresh_db_url)
    assert json.loads(balance.stdout)["balance"] == "1000000000000000000"


def test_bad_lines_are_rejected_with_a_reason_and_write_nothing(run: Run, booked: str) -> None:
    before = _state(booked)
    bad: list[tuple[str, str]] = [
        ('{"type":"entry","key":"x1"', "malformed JSON"),
        ('["entry"]', "must be a JSON object"),
        (json.dumps(_entry("x2", "treasury", "user:alice", "5") | {"memo": "hi"}), "unknown field(s) memo"),
        ('{"type":"asset","code":"USD","scale":"2"}', "scale must be an integer"),
        (
            '{"type":"entry","key":"x3","transfers":[{"debit":"treasury","credit":"user:alice","amount":5}]}',
            "got int",
        ),
        (
            '{"type":"entry","key":"x4","transfers":[{"debit":"treasury","credit":"user:alice","amount":5.0}]}',
            "floating-point",
        ),
        (json.dumps(_entry("x5", "treasury", "user:alice", "-5")), "base-unit digits"),
        (json.dumps(_entry("x6", "treasury", "user:alice", "0")), "greater than zero"),
        (json.dumps(_entry("x7", "treasury", "user:alice", str(2**256))), "below 2^256"),
        (json.dumps(_entry("x8", "treasury", "nobody", "5")), "does not exist"),
        (json.dumps(_entry("x9", "user:bob", "user:alice", "999999")), "debits above its credits"),
        (json.dumps(_entry("x10", "treasury", "points:alice", "5")), "different assets"),
        (json.dumps(_entry("fund", "treasury", "user:alice", "7")), "already used for a different entry"),
        (json.dumps({"type": "post", "key": "x11", "pending_key": "hold-1"}), "already posted"),
        (json.dumps({"type": "expire", "key": "x12", "pending_key": "nothing"}), "no hold"),
        (json.dumps({"type": "account", "code": "user:alice", "asset": "TRACE", "kind": "asset"}), "exists"),
    ]
    data = "".join(text + "\n" for text, _ in bad).encode() + b'{"type":"asset","code":"\xff"}\n'
    result = run(["ledger", "import", "-"], booked, input=data)
    assert result.exit_code == 1
    records = _records(result)
    assert records[-1] == {"summary": {"created": 0, "exists": 0, "rejected": len(bad) + 1}}
    for (_text, reason), record in zip(bad, records, strict=False):
        assert record["status"] == "rejected"
        assert reason in record["reason"], (reason, record)
    assert "not UTF-8" in records[len(bad)]["reason"]
    assert records[2]["key"] == "x2"  # the key of a line that did not parse, to find it by
    assert _state(booked) == before


# --- export ----------------------------------------------------------------------------------


def test_export_then_import_into_a_fresh_database_reproduces_the_books(
    run: Run, booked: str, tmp_path: Path, databases: Any, template_db: str
) -> None:
    # One hold that expires (its expiry is exported as a void), one that stays open,
    # and a closed account.
    extra = [
        _entry("hold-x", "user:alice", "user:bob", "70", pending=True, timeout_s=1),
        _entry("hold-open", "user:alice", "user:bob", "9", pending=True, timeout_s=7200),
        {"type": "account", "code": "user:gone", "asset": "TRACE", "kind": "liability"},
        {"type": "close", "code": "user:gone"},
    ]
    assert run(["ledger", "import", "-"], booked, input=_jsonl(extra)).exit_code == 0
    time.sleep(1.1)
    assert json.loads(run(["ledger", "expire"], booked).stdout)["expired"] == 1

    exported = tmp_path / "books.jsonl"
    result = run(["ledger", "export", "--output", str(exported)], booked)
    assert result.exit_code == 0, result.output
    lines = exported.read_text().splitlines()
    assert json.loads(result.stdout) == {"output": str(exported), "lines": len(lines)}

    target = databases.url(databases.create(template=template_db))
    imported = run(["ledger", "import", str(exported)], target)
    assert imported.exit_code == 0, imported.output
    assert _records(imported)[-1]["summary"] == {"created": len(lines), "exists": 0, "rejected": 0}
    assert _state(target) == _state(booked)
    check = run(["ledger", "check"], target)
    assert check.exit_code == 0 and json.loads(check.stdout)["ok"] is True
    # The copy exports to the very same file.
    assert run(["ledger", "export"], target).stdout.splitlines() == lines


# --- reports ---------------------------------------------------------------------------------


def test_balance_now_as_of_and_at_block(run: Run, booked: str) -> None:
    result = run(["ledger", "balance", CUSTODY], booked)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["balance"] == "750"
    at_15 = json.loads(run(["ledger", "balance", CUSTODY, "--at-block", "15"], booked).stdout)
    assert at_15["balance"] == "500" and at_15["at_block"] == 15
    assert json.loads(run(["ledger", "balance", CUSTODY, "--at-block", "9"], booked).stdout)["balance"] == "0"

    with psycopg.connect(db.libpq_url(booked)) as conn:
        between = conn.execute("SELECT now()").fetchone()
    assert between is not None
    more = run(
        ["ledger", "import", "-"], booked, input=_jsonl([_entry("later", "treasury", "user:bob", "5")])
    )
    assert more.exit_code == 0
    then = json.loads(
        run(["ledger", "balance", "user:bob", "--as-of", between[0].isoformat()], booked).stdout
    )
    now = json.loads(run(["ledger", "balance", "user:bob"], booked).stdout)
    assert (then["balance"], now["balance"]) == ("100", "105")
    early = run(["ledger", "balance", "user:bob", "--as-of", "2000-01-01T00:00:00Z"], booked)
    assert json.loads(early.stdout)["balance"] == "0"


def test_balance_of_an_unknown_account_fails(run: Run, booked: str) -> None:
    result = run(["ledger", "balance", "user:nobody"], booked)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "account 'user:nobody' does not exist" in result.stderr


def test_statement_json_pages_and_table(run: Run, booked: str) -> None:
    full = json.loads(run(["ledger", "statement", "user:bob"], booked).stdout)
    kinds = [line["transfer_kind"] for line in full["lines"]]
    assert kinds == ["pending", "post_pending", "pending", "void_pending", "posted", "posted"]
    assert [line["balance_after"] for line in full["lines"]] == ["0", "100", "100", "100", "140", "100"]
    assert full["closing_balance"] == "100" and full["next_after_id"] is None

    page = json.loads(run(["ledger", "statement", "user:bob", "--limit", "2"], booked).stdout)
    assert [ln["entry_key"] for ln in page["lines"]] == ["hold-1", "post-1"]
    rest = run(["ledger", "statement", "user:bob", "--after-id", str(page["next_after_id"])], booked)
    assert [ln["entry_key"] for ln in json.loads(rest.stdout)["lines"]] == [
        "hold-2",
        "void-2",
        "pay-bob",
        "undo-pay-bob",
    ]
    window = run(["ledger", "statement", "user:bob", "--to", "2000-01-01T00:00:00+00:00"], booked)
    assert json.loads(window.stdout)["lines"] == []

    table = run(["ledger", "statement", "user:bob", "--format", "table"], booked)
    assert table.exit_code == 0
    assert "Statement of user:bob" in table.stdout
    assert "undo-pay-bob" in table.stdout and "0.000000000000000100" in table.stdout


def test_check_passes_then_fails_after_a_balance_is_tampered_with(run: Run, booked: str) -> None:
    ok = run(["ledger", "check"], booked)
    assert ok.exit_code == 0
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["entries"] == SAMPLE_CREATED - 8
    assert report["trial_balance"]["TRACE"]["balanced"] is True

    # The superuser can get past the balance guard trigger; the check must notice.
    with psycopg.connect(db.libpq_url(booked), autocommit=True) as conn:
        conn.execute("ALTER TABLE ledger_accounts DISABLE TRIGGER ledger_accounts_balances_by_transfers")
        conn.execute("UPDATE ledger_accounts SET credits_posted = credits_posted + 1 WHERE code = 'user:bob'")
        conn.execute("ALTER TABLE ledger_accounts ENABLE TRIGGER ledger_accounts_balances_by_transfers")
    broken = run(["ledger", "check"], booked)
    assert broken.exit_code == 1
    report = json.loads(broken.stdout)
    assert report["ok"] is False
    kinds = {b["kind"] for b in report["breaks"]}
    assert {"balance_differs_from_transfers", "trial_balance"} <= kinds
    assert any(b.get("account") == "user:bob" for b in report["breaks"])


def test_expire_releases_timed_out_holds(run: Run, booked: str) -> None:
    hold = _entry("short", "user:alice", "user:bob", "60", pending=True, timeout_s=1)
    assert run(["ledger", "import", "-"], booked, input=_jsonl([hold])).exit_code == 0
    assert json.loads(run(["ledger", "balance", "user:alice"], booked).stdout)["debits_pending"] == "60"
    early = run(["ledger", "expire"], booked)
    assert early.exit_code == 0 and json.loads(early.stdout)["expired"] == 0
    time.sleep(1.1)
    result = run(["ledger", "expire"], booked)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"expired": 1, "exists": 0, "rejected": 0, "rejections": []}
    assert json.loads(run(["ledger", "balance", "user:alice"], booked).stdout)["debits_pending"] == "0"
    assert json.loads(run(["ledger", "expire"], booked).stdout)["expired"] == 0


def test_apikey_create_prints_the_key_once_and_stores_a_hash(run: Run, fresh_db_url: str) -> None:
    result = run(["apikey", "create", "--role", "finance", "--label", "month end"], fresh_db_url)
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    assert created["role"] == "finance" and created["label"] == "month end"
    assert created["key"].startswith(f"tc_{created['prefix']}_")
    with psycopg.connect(db.libpq_url(fresh_db_url)) as conn:
        rows = conn.execute("SELECT prefix, role, label, secret_hash FROM api_keys").fetchall()
        audited = conn.execute("SELECT actor, action FROM audit_log").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(created["prefix"], "finance", "month end")]
    secret = created["key"].rsplit("_", 1)[1]
    assert secret.encode() not in bytes(rows[0][3])
    assert [a[1] for a in audited] == ["api_key.create"] and audited[0][0].startswith("cli:")

    listed = json.loads(run(["apikey", "list"], fresh_db_url).stdout)
    assert [k["prefix"] for k in listed] == [created["prefix"]] and "key" not in listed[0]
    assert run(["apikey", "revoke", created["prefix"]], fresh_db_url).exit_code == 0
    assert run(["apikey", "revoke", created["prefix"]], fresh_db_url).exit_code == 1


# --- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["no-such-command"], {}),
        (["ledger", "balance"], {}),
        (["ledger", "balance", "user:bob", "--as-of", "2026-01-01T00:00:00"], {}),
        (["ledger", "balance", "user:bob", "--as-of", "tuesday"], {}),
        (["ledger", "balance", "user:bob", "--at-block", "-1"], {}),
        (["ledger", "balance", "user:bob", "--at-block", "1", "--as-of", "2026-01-01T00:00:00Z"], {}),
        (["ledger", "statement", "user:bob", "--limit", "0"], {}),
        (["ledger", "statement", "user:bob", "--format", "xml"], {}),
        (["ledger", "import", "/no/such/file.jsonl"], {}),
        (["apikey", "create", "--role", "root"], {}),
        (["apikey", "create", "--role", "admin", "--label", "bad\x00label"], {}),
        (["apikey", "revoke", "not-a-prefix"], {}),
        (["ledger", "check"], {"TRACE_API_PORT": "eighty"}),
    ],
)
def test_bad_usage_exits_2(run: Run, db_url: str, args: list[str], env: dict[str, str]) -> None:
    before = _state(db_url)
    result = run(args, db_url, **env)
    assert result.exit_code == 2, result.output
    assert "Error" in result.stderr
    assert _state(db_url) == before


def test_commands_refuse_a_database_that_is_not_migrated(run: Run, databases: Any) -> None:
    url = databases.url(databases.create())
    result = run(["ledger", "check"], url)
    assert result.exit_code == 1
    assert "tracechain db upgrade" in result.stderr
    current = run(["db", "current"], url)
    assert current.exit_code == 0
    assert json.loads(current.stdout) == {"revision": None, "head": db.head_revision(), "at_head": False}

    upgraded = run(["db", "upgrade"], url)
    assert upgraded.exit_code == 0
    assert json.loads(upgraded.stdout) == {"revision": db.head_revision()}
    assert json.loads(run(["db", "current"], url).stdout)["at_head"] is True
    assert run(["ledger", "check"], url).exit_code == 0


def test_unreachable_database_fails_cleanly(run: Run) -> None:
    result = run(["ledger", "check"], "postgresql://postgres:secret@127.0.0.1:1/nothing")
    assert result.exit_code == 1
    assert "cannot use the database" in result.stderr and "secret" not in result.stderr


# --- the installed console script ------------------------------------------------------------


def _script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TRACECHAIN), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_console_script_imports_and_checks(sample: Path, fresh_db_url: str) -> None:
    env = {**os.environ, "TRACE_DATABASE_URL": fresh_db_url, "TRACE_LOG_LEVEL": "INFO"}
    env.pop("TRACE_DATA_DIR", None)
    bad = sample.with_name("bad.jsonl")
    bad.write_text(sample.read_text() + '{"type":"entry","key":"oops"}\n')
    imported = _script(env, "ledger", "import", str(bad))
    assert imported.returncode == 1, imported.stderr
    lines = [json.loads(line) for line in imported.stdout.splitlines()]
    assert lines[-1] == {"summary": {"created": SAMPLE_CREATED, "exists": 0, "rejected": 1}}
    assert lines[-2]["reason"] == "entry line is missing transfers"
    # Logs are JSON lines on stderr, apart from the results on stdout.
    events = [json.loads(line) for line in imported.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "ledger.imported" for e in events)

    checked = _script(env, "ledger", "check")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True

    with sa.create_engine(db.sqlalchemy_url(fresh_db_url)).connect() as conn:
        conn.execute(
            sa.text("ALTER TABLE ledger_accounts DISABLE TRIGGER ledger_accounts_balances_by_transfers")
        )
        conn.execute(sa.text("UPDATE ledger_accounts SET debits_pending = 1 WHERE code = 'treasury'"))
        conn.commit()
    broken = _script(env, "ledger", "check")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["ok"] is False
