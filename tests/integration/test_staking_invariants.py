"""The staking invariants, enforced by PostgreSQL itself: raw SQL that tries to break each fails.

The attacks run as the application role (a few as the owner), each in a transaction that is
rolled back; each asserts the SQLSTATE (and constraint) that refused it and that the staking
tables are exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import db
from ledger.commands import ChainRef
from ledger.custody import ensure_chart
from ledger.staking import service
from tests.conftest import APP_ROLE, Databases
from tests.integration.test_escrow_invariants import accepted, refused

CHAIN_ID = 31337
VAULT = "0x" + "5a" * 20
STAKER = "0x" + "5b" * 20
UINT256_LIMIT = 2**256
CHECK_VIOLATION = "23514"
UNIQUE_VIOLATION = "23505"
INSUFFICIENT_PRIVILEGE = "42501"
TABLES = ("staking_pools", "staking_positions", "staking_moves", "staking_claims")


@dataclass
class Books:
    app: sa.Engine
    owner: sa.Engine
    pool_id: int

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        with self.owner.connect() as conn:
            return {
                t: sorted(tuple(map(repr, row)) for row in conn.execute(sa.text(f"SELECT * FROM {t}")))
                for t in TABLES
            }


@pytest.fixture(scope="module")
def books(databases: Databases, template_db: str) -> Iterator[Books]:
    name = databases.create(template=template_db)
    url = databases.url(name)
    app = db.make_engine(url, role=APP_ROLE, pool_size=1)
    with app.begin() as conn:
        ensure_chart(conn, CHAIN_ID, [VAULT])
        pool, _ = service.create_pool(
            conn,
            "invariants",
            service.PoolSettings("emission", None, 10**18, 0, 0, None, True),
            chain_id=CHAIN_ID,
            vault=VAULT,
            actor="staff:test",
            now_s=1_000,
        )
        service.fund_pool(conn, pool.id, 10**21, key="fund-inv", actor="staff:test", now_s=1_000)
        chain = ChainRef(CHAIN_ID, "0x" + "ab" * 32, 0, 10, "0x" + "cd" * 32)
        event = service.StakeEvent(chain, pool.id, STAKER, 10**18, 10**18, 5_000, True)
        assert service.apply_stake_event(conn, VAULT, event, 1_000) == "applied"
        service.tick_pool(conn, pool.id, 1_100)
        service.reserve_claim(conn, pool.id, STAKER, 10, actor=STAKER, now_s=1_100, details={})
        conn.execute(
            sa.text(
                "INSERT INTO staking_claims (pool_id, staker, mode, amount, nonce, outbox_key)"
                " VALUES (:p, :s, 'pay', 10, 'n-1', 'staking:claim:inv')"
            ),
            {"p": pool.id, "s": STAKER},
        )
    owner = db.make_engine(url, role=None, pool_size=1)
    try:
        yield Books(app, owner, pool.id)
    finally:
        owner.dispose()
        app.dispose()
        databases.drop(name)


def test_well_formed_raw_writes_are_accepted(books: Books) -> None:
    """The controls: the refusals below are for the reason named, not missing grants."""
    assert accepted(books.app, "UPDATE staking_pools SET acc = acc + 1, last_tick_s = last_tick_s + 1") == 1
    assert accepted(books.app, "UPDATE staking_positions SET stake = 0, accrued = accrued + 1") == 1
    assert (
        accepted(
            books.app,
            "INSERT INTO staking_moves (pool_id, kind, actor) VALUES (:p, 'funded', 'raw')",
            {"p": books.pool_id},
        )
        == 1
    )


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        ("UPDATE staking_pools SET acc = acc - 1", "staking_pool_forward"),
        ("UPDATE staking_pools SET last_tick_s = last_tick_s - 1", "staking_pool_forward"),
        ("UPDATE staking_pools SET emitted = emitted - 1", "staking_pool_forward"),
        ("UPDATE staking_pools SET tick_seq = tick_seq - 1", "staking_pool_forward"),
        ("UPDATE staking_pools SET slack = -1", "staking_pools_slack_check"),
        ("UPDATE staking_pools SET total_staked = -1", "staking_pools_total_staked_check"),
        (f"UPDATE staking_pools SET total_staked = {UINT256_LIMIT}", "staking_pools_total_staked_check"),
        ("UPDATE staking_pools SET rate_per_s = NULL", "rate_of_kind"),
        ("UPDATE staking_pools SET apr_bps = 100", "rate_of_kind"),
        ("UPDATE staking_pools SET lock_seconds = 18446744073709551616", "staking_pools_lock_seconds_check"),
        ("UPDATE staking_positions SET snapshot = snapshot - 1", "staking_position_snapshot"),
        (
            "UPDATE staking_positions SET snapshot = (SELECT acc + 1 FROM staking_pools)",
            "staking_position_snapshot",
        ),
        ("UPDATE staking_positions SET stake = -1", "staking_positions_stake_check"),
        ("UPDATE staking_positions SET accrued = -1", "staking_positions_accrued_check"),
        (f"UPDATE staking_positions SET accrued = {UINT256_LIMIT}", "staking_positions_accrued_check"),
        ("UPDATE staking_positions SET staker = 'alice'", None),
    ],
)
def test_pool_and_position_rows_refuse_impossible_values(
    books: Books, sql: str, constraint: str | None
) -> None:
    before = books.state()
    error = refused(books.app, sql)
    if constraint is None:
        assert error.sqlstate == INSUFFICIENT_PRIVILEGE
    else:
        assert error.sqlstate == CHECK_VIOLATION, error
        assert error.diag.constraint_name == constraint
    assert books.state() == before


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE staking_moves SET amount = 1",
        "DELETE FROM staking_moves",
        "TRUNCATE staking_moves",
        "UPDATE staking_claims SET amount = 1",
        "DELETE FROM staking_claims",
        "TRUNCATE staking_claims",
        "DELETE FROM staking_positions",
        "DELETE FROM staking_pools",
        "UPDATE staking_pools SET kind = 'fixed_apr'",
        "UPDATE staking_pools SET vault = '0x0000000000000000000000000000000000000000'",
        "UPDATE staking_positions SET pool_id = 2",
    ],
)
def test_history_is_append_only_and_identities_are_fixed(books: Books, sql: str) -> None:
    before = books.state()
    assert refused(books.app, sql).sqlstate == INSUFFICIENT_PRIVILEGE
    assert books.state() == before


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE staking_moves SET amount = 1",
        "DELETE FROM staking_claims",
        "TRUNCATE staking_moves",
        "TRUNCATE staking_claims",
    ],
)
def test_even_the_owner_cannot_rewrite_history(books: Books, sql: str) -> None:
    before = books.state()
    assert refused(books.owner, sql).sqlstate == INSUFFICIENT_PRIVILEGE
    assert books.state() == before


def test_the_owner_cannot_turn_a_pool_back_or_change_its_kind(books: Books) -> None:
    before = books.state()
    for sql in (
        "UPDATE staking_pools SET acc = 0",
        "UPDATE staking_pools SET kind = 'fixed_apr', apr_bps = 1, rate_per_s = NULL",
    ):
        error = refused(books.owner, sql)
        assert (error.sqlstate, error.diag.constraint_name) == (CHECK_VIOLATION, "staking_pool_forward")
    assert books.state() == before


@pytest.mark.parametrize(
    ("sql", "state"),
    [
        (
            "INSERT INTO staking_claims (pool_id, staker, mode, amount, nonce, outbox_key)"
            " VALUES (:p, :s, 'pay', 5, 'n-1', 'staking:claim:other')",
            UNIQUE_VIOLATION,
        ),
        (
            "INSERT INTO staking_claims (pool_id, staker, mode, amount, nonce, outbox_key)"
            " VALUES (:p, :s, 'pay', 0, 'n-2', 'staking:claim:zero')",
            CHECK_VIOLATION,
        ),
        (
            "INSERT INTO staking_claims (pool_id, staker, mode, amount, nonce, outbox_key)"
            " VALUES (:p, :s, 'gift', 5, 'n-3', 'staking:claim:gift')",
            CHECK_VIOLATION,
        ),
        (
            "INSERT INTO staking_moves (pool_id, kind, amount, actor) VALUES (:p, 'funded', -5, 'raw')",
            CHECK_VIOLATION,
        ),
        (
            "INSERT INTO staking_positions (pool_id, staker, stake, snapshot, accrued, unlock_at_s)"
            " VALUES (:p, '0x" + "77" * 20 + "', 1, 10^60, 0, 0)",
            CHECK_VIOLATION,
        ),
    ],
)
def test_claims_moves_and_positions_refuse_bad_rows(books: Books, sql: str, state: str) -> None:
    before = books.state()
    assert refused(books.app, sql, {"p": books.pool_id, "s": STAKER}).sqlstate == state
    assert books.state() == before
