"""Party nonces in PostgreSQL: a fresh nonce is spent, the same signed request again is a retry
answered with the same target, any other request under a spent nonce is a replay, and two
transactions racing for one nonce never both win."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import db
from ledger.errors import Conflict, InvalidInput
from ledger.escrow import party
from tests.books import wait_for_lock_waiters
from tests.conftest import APP_ROLE

BUYER = "0x" + "b1" * 20
SELLER = "0x" + "5e" * 20
DIGEST_A = "0x" + "a" * 64
DIGEST_B = "0x" + "b" * 64
ESCROW = "0x" + "e1" * 32


@pytest.fixture
def engine(fresh_db_url: str) -> Iterator[sa.Engine]:
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=3)
    yield engine
    engine.dispose()


def rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every used nonce, sorted in Python (the database's collation orders text its own way)."""
    with engine.connect() as conn:
        result = conn.execute(sa.text("SELECT address, nonce, action, digest, target FROM party_nonces"))
        return sorted(tuple(r) for r in result)


def use(engine: sa.Engine, address: str, nonce: int, digest: str, target: str = ESCROW) -> str | None:
    """Spend a nonce in a transaction of its own, committed unless it raises."""
    with engine.begin() as conn:
        return party.use_nonce(conn, address, nonce, "escrow.create", digest, target)


def test_a_fresh_nonce_is_spent_and_remembers_the_request(engine: sa.Engine) -> None:
    assert (
        use(engine, BUYER.upper().replace("0X", "0x"), 2**256 - 1, DIGEST_A.upper().replace("0X", "0x"))
        is None
    )
    assert rows(engine) == [(BUYER, str(2**256 - 1), "escrow.create", DIGEST_A, ESCROW)]


def test_the_same_signed_request_again_gets_the_earlier_target(engine: sa.Engine) -> None:
    assert use(engine, BUYER, 0, DIGEST_A, target=ESCROW) is None
    # The retry does not know what the first request made; it is told.
    assert use(engine, BUYER, 0, DIGEST_A, target="something else") == ESCROW
    assert use(engine, BUYER, 0, DIGEST_A, target=ESCROW) == ESCROW
    assert rows(engine) == [(BUYER, "0", "escrow.create", DIGEST_A, ESCROW)]


def test_another_request_under_a_spent_nonce_is_a_replay_and_writes_nothing(engine: sa.Engine) -> None:
    assert use(engine, BUYER, 5, DIGEST_A) is None
    with engine.begin() as conn:
        with pytest.raises(Conflict) as refused:
            party.use_nonce(conn, BUYER, 5, "dispute.open", DIGEST_B, "dispute:1")
        assert refused.value.code == "nonce_replayed"
        # The refusal leaves the transaction usable: the caller decides what to do with it.
        assert conn.execute(sa.text("SELECT count(*) FROM party_nonces")).scalar_one() == 1
    assert rows(engine) == [(BUYER, "5", "escrow.create", DIGEST_A, ESCROW)]


def test_the_same_nonce_of_another_address_is_its_own(engine: sa.Engine) -> None:
    assert use(engine, BUYER, 9, DIGEST_A) is None
    assert use(engine, SELLER, 9, DIGEST_B, target="dispute:4") is None
    assert use(engine, BUYER, 10, DIGEST_B) is None
    assert rows(engine) == sorted(
        [
            (BUYER, "9", "escrow.create", DIGEST_A, ESCROW),
            (SELLER, "9", "escrow.create", DIGEST_B, "dispute:4"),
            (BUYER, "10", "escrow.create", DIGEST_B, ESCROW),
        ]
    )


def test_a_nonce_spent_in_a_rolled_back_transaction_is_still_fresh(engine: sa.Engine) -> None:
    with engine.connect() as conn, conn.begin() as transaction:
        assert party.use_nonce(conn, BUYER, 3, "escrow.create", DIGEST_A, ESCROW) is None
        transaction.rollback()
    assert use(engine, BUYER, 3, DIGEST_B) is None
    assert rows(engine) == [(BUYER, "3", "escrow.create", DIGEST_B, ESCROW)]


@pytest.mark.parametrize(
    ("address", "nonce", "action", "digest", "target", "message"),
    [
        ("0x1234", 1, "escrow.create", DIGEST_A, ESCROW, "not an address"),
        (BUYER, -1, "escrow.create", DIGEST_A, ESCROW, "nonce"),
        (BUYER, 2**256, "escrow.create", DIGEST_A, ESCROW, "nonce"),
        (BUYER, True, "escrow.create", DIGEST_A, ESCROW, "nonce must be an integer"),
        (BUYER, "1", "escrow.create", DIGEST_A, ESCROW, "nonce must be an integer"),
        (BUYER, 1, "", DIGEST_A, ESCROW, "action"),
        (BUYER, 1, "escrow.create", "0x" + "a" * 63, ESCROW, "digest"),
        (BUYER, 1, "escrow.create", "a" * 64, ESCROW, "digest"),
        (BUYER, 1, "escrow.create", DIGEST_A, "", "target"),
        (BUYER, 1, "escrow.create", DIGEST_A, "t" * 201, "target"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    engine: sa.Engine, address: Any, nonce: Any, action: Any, digest: Any, target: Any, message: str
) -> None:
    with engine.begin() as conn, pytest.raises(InvalidInput, match=message):
        party.use_nonce(conn, address, nonce, action, digest, target)
    assert rows(engine) == []


def test_a_signed_request_spends_its_nonce_under_its_digest(engine: sa.Engine) -> None:
    request = party.OpenDisputeRequest(
        escrow_id=ESCROW, reason="never arrived", nonce=11, expiry=2_000_000_000
    )
    digest = request.digest(31337, "0x" + "c0" * 20)
    with engine.begin() as conn:
        assert party.use_nonce(conn, BUYER, request.nonce, "dispute.open", digest, "dispute:7") is None
    with engine.begin() as conn:
        assert party.use_nonce(conn, BUYER, request.nonce, "dispute.open", digest, "dispute:8") == "dispute:7"
    other_chain = request.digest(31338, "0x" + "c0" * 20)
    with engine.begin() as conn, pytest.raises(Conflict, match="already used"):
        party.use_nonce(conn, BUYER, request.nonce, "dispute.open", other_chain, "dispute:9")


# --- two transactions racing for one nonce -------------------------------------------------------


def race(engine: sa.Engine, url: str, second_digest: str, first_ends: str) -> dict[str, Any]:
    """The first transaction spends nonce 7 and holds it; a second one, in a thread, tries the same
    nonce and blocks on the primary key; then the first ends (``commit`` or ``rollback``).

    The first transaction always ends, whatever fails, and the second cannot wait longer than its
    lock timeout, so the test cannot hang. Returns the second's ``result`` or ``error``.
    """
    outcome: dict[str, Any] = {}

    def second() -> None:
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("SET LOCAL lock_timeout = '60s'"))
                outcome["result"] = party.use_nonce(conn, BUYER, 7, "escrow.create", second_digest, "second")
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=second, daemon=True)
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            assert party.use_nonce(conn, BUYER, 7, "escrow.create", DIGEST_A, "first") is None
            thread.start()
            wait_for_lock_waiters(url, 1)
            # Still waiting: nothing decides the second until the first ends.
            assert outcome == {}
        finally:
            if first_ends == "commit":
                transaction.commit()
            else:
                transaction.rollback()
    thread.join(timeout=90)
    assert not thread.is_alive(), "the second transaction never ended"
    return outcome


def test_racing_for_a_nonce_with_another_request_the_first_to_commit_wins(
    engine: sa.Engine, fresh_db_url: str
) -> None:
    outcome = race(engine, fresh_db_url, DIGEST_B, "commit")
    assert "result" not in outcome
    assert isinstance(outcome["error"], Conflict)
    assert outcome["error"].code == "nonce_replayed"
    assert rows(engine) == [(BUYER, "7", "escrow.create", DIGEST_A, "first")]


def test_racing_with_the_same_request_the_second_is_told_the_first_target(
    engine: sa.Engine, fresh_db_url: str
) -> None:
    outcome = race(engine, fresh_db_url, DIGEST_A, "commit")
    assert outcome == {"result": "first"}
    assert rows(engine) == [(BUYER, "7", "escrow.create", DIGEST_A, "first")]


def test_when_the_first_rolls_back_the_waiting_request_spends_the_nonce(
    engine: sa.Engine, fresh_db_url: str
) -> None:
    outcome = race(engine, fresh_db_url, DIGEST_B, "rollback")
    assert outcome == {"result": None}
    assert rows(engine) == [(BUYER, "7", "escrow.create", DIGEST_B, "second")]
