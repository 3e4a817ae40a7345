"""The format checks of migration 0012 accept exactly what the checks they replaced accepted, and
PostgreSQL still enforces them: each is tried, as the application role, with a value that breaks it."""

from __future__ import annotations

import importlib
import re

import pytest
import sqlalchemy as sa

from ledger import db

cheap = importlib.import_module("ledger.migrations.versions.0012_cheap_format_checks")

# The checks as 0001-0010 wrote them.
OLD = {
    ("ledger_assets", "code"): "^[A-Z][A-Z0-9]{1,15}$",
    ("ledger_accounts", "code"): "^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,199}$",
    ("ledger_entries", "kind"): "^[a-z][a-z0-9_.:-]{0,63}$",
    ("finance_exceptions", "kind"): "^[a-z][a-z0-9_]{0,63}$",
    ("chain_outbox", "action"): "^[a-z][a-z0-9_.]{0,63}$",
    ("points_participants", "tier"): "^[a-z][a-z0-9_]{0,31}$",
    ("points_participants", "id"): "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}$",
    ("points_rules", "event_type"): "^[a-z][a-z0-9_.:-]{0,63}$",
}
HASH, ADDRESS = "^0x[0-9a-f]{64}$", "^0x[0-9a-f]{40}$"


def _old(table: str, column: str, length: str) -> str:
    return OLD.get((table, column)) or (HASH if length == "= 66" else ADDRESS)


def _candidates(old: str) -> list[str]:
    """Strings on both sides of the old pattern: each length around its bounds, every kind of
    character in and out of its classes, and what regexes get wrong (newlines, non-ASCII)."""
    first = re.search(r"\^(0x|\[[^\]]+\])", old)
    assert first is not None
    bounds = re.search(r"\{(\d+)(?:,(\d+))?\}", old)
    assert bounds is not None
    low, high = int(bounds.group(1)), int(bounds.group(2) or bounds.group(1))
    head = "0x" if first.group(1) == "0x" else next(c for c in "aA0" if re.fullmatch(first.group(1), c))
    body = next(c for c in "a0A" if re.fullmatch(old[first.end() : bounds.start()], c))
    out = ["", head, body, head + body]
    for n in {low - 1, low, low + 1, high - 1, high, high + 1, high + 50}:
        if n >= 0:
            out.append(head + body * n)
    base = head + body * max(low, 1)
    for bad in ("é", "\n", " ", "Z", "z", "-", ".", ":", "@", "/", "+", "_", "G", "ß", "\t", "0"):
        out += [base + bad, bad + base, head + bad + body * low]
    out += [base + "\n", base.upper(), base.lower(), "0X" + base[2:]]
    return out


@pytest.mark.parametrize(("table", "column", "pattern", "length"), cheap.CHECKS, ids=lambda v: str(v)[:30])
def test_each_rewritten_check_accepts_exactly_what_the_old_one_did(
    app_engine: sa.Engine, table: str, column: str, pattern: str, length: str
) -> None:
    old = _old(table, column, length)
    values = _candidates(old)
    with app_engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT s, s ~ :old, (s ~ {pattern} AND length(s) {length})"
                " FROM unnest(CAST(:values AS text[])) AS s"
            ),
            {"old": old, "values": values},
        ).all()
    differ = [r.s for r in rows if r[1] != r[2]]
    assert differ == [], f"{table}.{column}: {differ!r}"
    assert any(r[1] for r in rows) and not all(r[1] for r in rows)  # both sides tried


def test_the_database_carries_the_new_checks_under_the_old_names(app_engine: sa.Engine) -> None:
    with app_engine.connect() as conn:
        found = dict(
            conn.execute(
                sa.text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE contype = 'c' AND conname = ANY(:names)"
                ),
                {"names": [f"{t}_{c}_check" for t, c, _, _ in cheap.CHECKS]},
            ).all()
        )
        assert db.current_revision(conn) == cheap.revision
    assert len(found) == len(cheap.CHECKS)
    assert not [
        name for name, definition in found.items() if "{" in definition or "length(" not in definition
    ]


_ACCOUNT = (
    "INSERT INTO ledger_accounts (code, asset_id, kind) SELECT {}, id, 'asset' FROM ledger_assets LIMIT 1"
)
_ASSET = "INSERT INTO ledger_assets (code, scale) VALUES ({}, 2)"


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (_ACCOUNT.format("'bad code'"), "ledger_accounts_code_check"),
        (_ACCOUNT.format("repeat('a', 201)"), "ledger_accounts_code_check"),
        (_ACCOUNT.format("'-starts-badly'"), "ledger_accounts_code_check"),
        (_ASSET.format("'TOOLONGASSETCODE1'"), "ledger_assets_code_check"),
        (_ASSET.format("'X'"), "ledger_assets_code_check"),
    ],
)
def test_postgres_refuses_a_value_that_breaks_a_format_check(
    app_engine: sa.Engine, statement: str, constraint: str
) -> None:
    with app_engine.connect() as conn:
        conn.execute(
            sa.text("INSERT INTO ledger_assets (code, scale) VALUES ('FMT', 2) ON CONFLICT DO NOTHING")
        )
        with pytest.raises(sa.exc.IntegrityError, match=constraint):
            conn.execute(sa.text(statement))
        conn.rollback()
