"""JSON Lines import and export of the ledger: parsing, batching, round trips."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import db
from ledger.check import check_ledger
from ledger.commands import NewEntry, Resolve, Reverse
from ledger.errors import InvalidInput
from ledger.expiry import expire_holds
from ledger.jsonl import (
    AccountLine,
    AssetLine,
    CloseLine,
    export_lines,
    import_lines,
    parse_line,
    read_lines,
)
from ledger.posting import Poster
from tests.conftest import APP_ROLE

TX = "0x" + "ab" * 32
BLOCK = "0x" + "cd" * 32


@pytest.fixture
def engine(fresh_db_url: str) -> Iterator[sa.Engine]:
    eng = db.make_engine(fresh_db_url, role=APP_ROLE)
    yield eng
    eng.dispose()


def _jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines).encode()


def _import(engine: sa.Engine, data: bytes, batch_max: int = 2000) -> list[dict[str, Any]]:
    return list(import_lines(engine, read_lines(io.BytesIO(data)), batch_max=batch_max))


def _accounts(engine: sa.Engine) -> dict[str, tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT a.code, s.code, a.kind, a.debits_must_not_exceed_credits,"
                " a.credits_must_not_exceed_debits, a.closed, a.debits_posted, a.credits_posted,"
                " a.debits_pending, a.credits_pending, a.metadata"
                " FROM ledger_accounts a JOIN ledger_assets s ON s.id = a.asset_id"
            )
        )
        return {r[0]: tuple(r[1:]) for r in rows}


BASE = [
    {"type": "asset", "code": "TRACE", "scale": 18},
    {"type": "account", "code": "treasury", "asset": "TRACE", "kind": "equity"},
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
]


# --- parse_line ------------------------------------------------------------------------------


def test_parse_line_builds_definitions_and_commands() -> None:
    assert parse_line('{"type":"asset","code":"TRACE","scale":18}') == AssetLine("TRACE", 18)
    account = parse_line(json.dumps(BASE[3]))
    assert account == AccountLine(
        "user:bob", "TRACE", "liability", ("debits_must_not_exceed_credits",), {"tier": "gold"}
    )
    assert parse_line('{"type":"close","code":"user:bob"}') == CloseLine("user:bob")

    entry = parse_line(
        json.dumps(
            {
                "type": "entry",
                "key": "k-1",
                "kind": "reward",
                "transfers": [
                    {"debit": "a", "credit": "b", "amount": "1000000000000000000", "asset": "TRACE"},
                    {"debit": "a", "credit": "c", "amount": "7"},
                ],
                "metadata": {"n": 1},
                "effective_at": "2026-01-01T00:00:00Z",
                "chain": {
                    "chain_id": 1,
                    "tx_hash": TX,
                    "log_index": 2,
                    "block_number": 9,
                    "block_hash": BLOCK,
                },
            }
        )
    )
    assert isinstance(entry, NewEntry)
    assert entry.kind == "reward" and [leg.amount for leg in entry.legs] == [10**18, 7]
    assert entry.effective_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert entry.chain is not None and entry.chain.block_number == 9

    hold = parse_line(
        '{"type":"entry","key":"h","transfers":[{"debit":"a","credit":"b","amount":"5",'
        '"pending":true,"timeout_s":60}]}'
    )
    assert isinstance(hold, NewEntry) and hold.legs[0].pending and hold.legs[0].timeout_s == 60

    post = parse_line('{"type":"post","key":"p","pending_key":"h","amount":"3"}')
    assert post == Resolve("p", "h", "post", 3)
    assert parse_line('{"type":"void","key":"v","pending_key":"h"}') == Resolve("v", "h", "void")
    assert parse_line('{"type":"expire","key":"x","pending_key":"h"}') == Resolve("x", "h", "expire")
    assert parse_line('{"type":"reverse","key":"r","entry_key":"k-1"}') == Reverse("r", "k-1")


ENTRY = '{{"type":"entry","key":"k","transfers":[{{"debit":"a","credit":"b","amount":{amount}}}]}}'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "malformed JSON"),
        ('{"type":"asset","code":"TRACE","scale":18', "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type":"asset","code":"TRACE","scale":18,"extra":1}', "unknown field(s) extra"),
        ('{"type":"asset","code":"TRACE"}', "missing scale"),
        ('{"type":"asset","code":"TRACE","scale":"18"}', "scale must be an integer"),
        ('{"type":"asset","code":"TRACE","scale":true}', "scale must be an integer"),
        ('{"type":"asset","code":"trace","scale":18}', "asset code"),
        ('{"type":"asset","code":"TRACE","code":"PTS","scale":1}', "appears twice"),
        ('{"type":"wire","key":"k"}', "type must be one of"),
        ('{"key":"k"}', "type must be one of"),
        (ENTRY.format(amount="100"), "got int"),
        (ENTRY.format(amount="1.5"), "floating-point"),
        (ENTRY.format(amount="1e3"), "floating-point"),
        (ENTRY.format(amount='"-5"'), "base-unit digits"),
        (ENTRY.format(amount='"0"'), "greater than zero"),
        (ENTRY.format(amount='"1.0"'), "base-unit digits"),
        (ENTRY.format(amount=f'"{2**256}"'), "below 2^256"),
        (ENTRY.format(amount="NaN"), "not valid JSON"),
        (ENTRY.format(amount='"12"').replace('"b"', '"a"'), "two different accounts"),
        ('{"type":"entry","key":"k","transfers":[]}', "non-empty list"),
        ('{"type":"entry","key":"k","transfers":{}}', "non-empty list"),
        ('{"type":"entry","key":"","transfers":[{"debit":"a","credit":"b","amount":"1"}]}', "key must"),
        (
            '{"type":"entry","key":"k","transfers":[{"debit":"a","credit":"b","amount":"1","fee":"1"}]}',
            "unknown field(s) fee",
        ),
        (
            '{"type":"entry","key":"k","effective_at":"2026-01-01T00:00:00",'
            '"transfers":[{"debit":"a","credit":"b","amount":"1"}]}',
            "time zone",
        ),
        (
            '{"type":"entry","key":"k","effective_at":"yesterday",'
            '"transfers":[{"debit":"a","credit":"b","amount":"1"}]}',
            "ISO 8601",
        ),
        (
            '{"type":"entry","key":"k","metadata":{"rate":0.5},'
            '"transfers":[{"debit":"a","credit":"b","amount":"1"}]}',
            "floating-point",
        ),
        (
            '{"type":"entry","key":"k","metadata":[],"transfers":[{"debit":"a","credit":"b","amount":"1"}]}',
            "metadata must be a JSON object",
        ),
        (
            '{"type":"entry","key":"k","transfers":[{"debit":"a","credit":"b","amount":"1","timeout_s":5}]}',
            "only to a pending transfer",
        ),
        (
            '{"type":"entry","key":"k","transfers":[{"debit":"a","credit":"b","amount":"1","pending":"yes"}]}',
            "pending must be true or false",
        ),
        (
            '{"type":"entry","key":"k","chain":{"chain_id":1},'
            '"transfers":[{"debit":"a","credit":"b","amount":"1"}]}',
            "chain is missing",
        ),
        ('{"type":"post","key":"p","pending_key":"h","amount":"0"}', "greater than zero"),
        ('{"type":"void","key":"v","pending_key":"h","amount":"1"}', "unknown field(s) amount"),
        ('{"type":"reverse","key":"r"}', "missing entry_key"),
        (
            '{"type":"account","code":"x","asset":"TRACE","kind":"liability","flags":"closed"}',
            "flags must be a list",
        ),
        ('{"type":"account","code":"x","asset":"TRACE","kind":"liability","flags":["frozen"]}', "frozen"),
        ('{"type":"account","code":"x","asset":"TRACE","kind":"cash"}', "kind must be one of"),
        ('{"type":"account","code":"has space","asset":"TRACE","kind":"asset"}', "account code"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_parse_line_rejects_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as excinfo:
        parse_line(text)
    assert reason in excinfo.value.message


def test_read_lines_bounds_line_length() -> None:
    data = b'{"a":1}\n' + b"x" * 50 + b"\n" + b"last-without-newline"
    assert list(read_lines(io.BytesIO(data), max_bytes=20)) == [
        (1, b'{"a":1}\n'),
        (2, None),
        (3, b"last-without-newline"),
    ]


# --- import_lines ----------------------------------------------------------------------------


def test_import_keeps_file_order_across_batches(engine: sa.Engine) -> None:
    grant = {
        "type": "entry",
        "key": "grant",
        "transfers": [{"debit": "treasury", "credit": "user:alice", "amount": "100"}],
    }
    lines = _jsonl(
        *BASE,
        grant,
        # A hold, its resolution and a reversal of that resolution, all in one engine batch.
        {
            "type": "entry",
            "key": "hold",
            "transfers": [{"debit": "user:alice", "credit": "user:bob", "amount": "40", "pending": True}],
        },
        {"type": "post", "key": "post", "pending_key": "hold", "amount": "30"},
        {"type": "reverse", "key": "undo", "entry_key": "post"},
        "garbage line",
        {"type": "account", "code": "user:carol", "asset": "TRACE", "kind": "liability"},
        {
            "type": "entry",
            "key": "to-carol",
            "transfers": [{"debit": "user:alice", "credit": "user:carol", "amount": "100"}],
        },
        {
            "type": "entry",
            "key": "too-much",
            "transfers": [{"debit": "user:alice", "credit": "user:carol", "amount": "1"}],
        },
    )
    results = _import(engine, lines, batch_max=4)
    assert [r["line"] for r in results] == list(range(1, 13))
    statuses = {r.get("key", r.get("code")): r["status"] for r in results if r["line"] != 9}
    assert statuses == {
        "TRACE": "created",
        "treasury": "created",
        "user:alice": "created",
        "user:bob": "created",
        "grant": "created",
        "hold": "created",
        "post": "created",
        "undo": "created",
        "user:carol": "created",
        "to-carol": "created",
        "too-much": "rejected",
    }
    assert results[8]["status"] == "rejected" and "malformed JSON" in results[8]["reason"]
    assert results[11]["error"] == "exceeds_credits"
    balances = _accounts(engine)
    # alice: +100, hold 40 of which 30 posted (then reversed back to alice), 100 to carol.
    assert balances["user:alice"][5:9] == (130, 130, 0, 0)
    assert balances["user:bob"][5:9] == (30, 30, 0, 0)
    assert balances["user:carol"][5:9] == (0, 100, 0, 0)

    again = _import(engine, lines, batch_max=4)
    assert [r["status"] for r in again if r["line"] not in (9, 12)] == ["exists"] * 10
    assert _accounts(engine) == balances


def test_large_import_is_booked_in_engine_batches(engine: sa.Engine) -> None:
    n = 4500
    entries = [
        {
            "type": "entry",
            "key": f"e-{i}",
            "transfers": [{"debit": "treasury", "credit": "user:alice", "amount": str(i + 1)}],
        }
        for i in range(n)
    ]
    results = _import(engine, _jsonl(*BASE, *entries), batch_max=2000)
    assert sum(r["status"] == "created" for r in results) == len(BASE) + n
    with engine.connect() as conn:
        # One engine batch books its entries in one transaction at one instant.
        batches = conn.execute(sa.text("SELECT count(DISTINCT posted_at) FROM ledger_entries")).scalar()
        total = conn.execute(
            sa.text("SELECT credits_posted FROM ledger_accounts WHERE code = 'user:alice'")
        ).scalar()
    assert batches == 3
    assert total == n * (n + 1) // 2


def test_definition_conflicts_are_rejected_alone(engine: sa.Engine) -> None:
    results = _import(
        engine,
        _jsonl(
            *BASE,
            {"type": "asset", "code": "TRACE", "scale": 6},
            {"type": "account", "code": "user:alice", "asset": "TRACE", "kind": "asset"},
            {"type": "account", "code": "user:dan", "asset": "NOPE", "kind": "asset"},
            {"type": "close", "code": "nobody"},
            {"type": "asset", "code": "PTS", "scale": 0},
        ),
    )
    assert [r["status"] for r in results] == ["created"] * 4 + ["rejected"] * 4 + ["created"]
    assert [r["error"] for r in results[4:8]] == [
        "asset_conflict",
        "account_conflict",
        "unknown_asset",
        "unknown_account",
    ]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT code, scale FROM ledger_assets ORDER BY id")).all() == [
            ("TRACE", 18),
            ("PTS", 0),
        ]


# --- export_lines ----------------------------------------------------------------------------


def test_export_round_trip_reproduces_every_balance(
    engine: sa.Engine, databases: Any, template_db: str
) -> None:
    grant = [{"debit": "treasury", "credit": "user:alice", "amount": "1000"}]
    chain = {"chain_id": 1, "tx_hash": TX, "log_index": 0, "block_number": 5, "block_hash": BLOCK}

    def hold(key: str, amount: str, timeout_s: int | None = None) -> dict[str, Any]:
        leg: dict[str, Any] = {"debit": "user:alice", "credit": "user:bob", "amount": amount, "pending": True}
        if timeout_s is not None:
            leg["timeout_s"] = timeout_s
        return {"type": "entry", "key": key, "transfers": [leg]}

    results = _import(
        engine,
        _jsonl(
            *BASE,
            {"type": "account", "code": "user:carol", "asset": "TRACE", "kind": "liability"},
            {"type": "entry", "key": "grant", "kind": "grant", "transfers": grant, "metadata": {"n": "1"}},
            {
                "type": "entry",
                "key": "dated",
                "transfers": [{"debit": "treasury", "credit": "user:carol", "amount": "9"}],
                "effective_at": "2025-12-31T23:00:00+01:00",
                "chain": chain,
            },
            hold("h-post", "300", 3600),
            {"type": "post", "key": "p", "pending_key": "h-post", "amount": "100"},
            hold("h-full", "20", 3600),
            {"type": "post", "key": "p-full", "pending_key": "h-full"},
            hold("h-void", "50"),
            {"type": "void", "key": "v", "pending_key": "h-void", "metadata": {"why": "cancelled"}},
            hold("h-expire", "70", 1),
            hold("h-open", "10", 7200),
            {"type": "reverse", "key": "undo-dated", "entry_key": "dated"},
            {
                "type": "entry",
                "key": "orphan",
                "transfers": [{"debit": "treasury", "credit": "user:bob", "amount": "4"}],
                "chain": chain,
            },
            {"type": "reverse", "key": "undo-orphan", "entry_key": "orphan", "chain": chain},
            {"type": "close", "code": "user:carol"},
        ),
    )
    assert all(r["status"] == "created" for r in results), results
    time.sleep(1.1)
    assert [r.status for r in expire_holds(Poster(engine))] == ["created"]

    with engine.connect() as conn:
        exported = list(export_lines(conn))
    by_key = {line.get("key"): line for line in exported}
    # A resolved hold loses its timeout; an open one keeps it; an expiry is re-booked as a void.
    assert "timeout_s" not in by_key["h-post"]["transfers"][0]
    assert by_key["h-open"]["transfers"][0]["timeout_s"] == 7200
    assert by_key["p"]["amount"] == "100" and "amount" not in by_key["p-full"]
    expiry = next(line for line in exported if str(line.get("key", "")).startswith("sys:expire:"))
    assert expiry["type"] == "void" and expiry["pending_key"] == "h-expire"
    assert by_key["dated"]["effective_at"] == "2025-12-31T22:00:00+00:00"
    assert by_key["dated"]["chain"] == chain
    assert by_key["undo-dated"] == {"type": "reverse", "key": "undo-dated", "entry_key": "dated"}
    assert by_key["undo-orphan"] == {
        "type": "reverse",
        "key": "undo-orphan",
        "entry_key": "orphan",
        "chain": chain,
    }
    assert exported[-1] == {"type": "close", "code": "user:carol"}

    target_url = databases.url(databases.create(template=template_db))
    target = db.make_engine(target_url, role=APP_ROLE)
    try:
        data = _jsonl(*exported)
        assert all(r["status"] == "created" for r in _import(target, data, batch_max=4))
        assert _accounts(target) == _accounts(engine)
        with target.connect() as conn:
            assert check_ledger(conn)["ok"]
            assert list(export_lines(conn)) == exported
        assert all(r["status"] == "exists" for r in _import(target, data))
    finally:
        target.dispose()
