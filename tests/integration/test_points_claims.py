"""Claims on real PostgreSQL (the chain side is in tests/chain_node/test_points_claims.py): the
points hold, the mint hold and the outbox row in one commit; idempotency; signed claims;
refusals that write nothing."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from eth_account import Account

from ledger import accounts, custody
from ledger.errors import Conflict, InvalidInput, LedgerError, NotFound
from ledger.escrow import party
from ledger.points import claims, expiry, ingest, statements
from tests.points_kit import PointsWorld, make_world, points_of, points_tables

KEY = "0x" + "31" * 32
OTHER_KEY = "0x" + "32" * 32
WALLET = Account.from_key(KEY).address.lower()
CHAIN = claims.Chain(31337, "0x" + "70" * 20, "0x" + "51" * 20)
RATE = Decimal(100)  # 100 points per TRACE


@pytest.fixture
def world(app_engine: sa.Engine, unique: str) -> PointsWorld:
    w = make_world(app_engine, unique, wallet=WALLET)
    with app_engine.begin() as conn:
        # alice: 20 x 15 = 300 points that never expire
        ingest.ingest(conn, [w.event(f"e{i}", w.alice, w.checkpoint) for i in range(20)])
    return w


def _claim(engine: sa.Engine, world: PointsWorld, points: int, key: str) -> tuple[claims.Claim, str]:
    with engine.begin() as conn:
        return claims.create_claim(conn, CHAIN, world.alice, points, key, RATE, "tests")


def test_a_claim_holds_points_and_mint_and_queues_the_mint_in_one_commit(
    app_engine: sa.Engine, world: PointsWorld, unique: str
) -> None:
    claim, status = _claim(app_engine, world, 250, f"{unique}-c1")
    assert status == "created" and claim.status == "pending"
    assert (claim.points, claim.trace_amount, claim.wallet) == (250, 25 * 10**17, WALLET)
    assert points_of(app_engine, world.alice) == (300, 0, 250)
    with app_engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT action, to_address, signer, data, status, hold_keys FROM chain_outbox WHERE key = :k"
            ),
            {"k": claim.outbox_key},
        ).one()
        minted = accounts.get_account(conn, custody.minted_code(CHAIN.chain_id))
        balance = statements.balance(conn, world.alice)
        assert statements.lots_consistent(conn, world.alice)
    assert (row.action, row.to_address, row.signer, row.status) == (
        "points.mint",
        CHAIN.token,
        CHAIN.signer,
        "queued",
    )
    assert bytes(row.data) == claims.mint_calldata(WALLET, 25 * 10**17)
    assert list(row.hold_keys) == [f"points:claim:{claim.id}:points", f"points:claim:{claim.id}:mint"]
    assert minted.credits_pending >= 25 * 10**17
    assert (balance.available, balance.held, balance.claimable) == (50, 250, 50)


def test_the_rest_of_a_claim_stays_as_points(app_engine: sa.Engine, world: PointsWorld, unique: str) -> None:
    with app_engine.begin() as conn:
        claim, _ = claims.create_claim(conn, CHAIN, world.alice, 7, f"{unique}-odd", Decimal(3), "tests")
    # 7 points at 3 per TRACE: floor(7/3 TRACE) paid, costing ceil(that x 3) = 7 points.
    assert claim.trace_amount == 7 * 10**18 // 3 and claim.points == 7
    with app_engine.begin() as conn:
        claim, _ = claims.create_claim(
            conn, CHAIN, world.alice, 4, f"{unique}-tiny", Decimal(3 * 10**18), "t"
        )
    assert (claim.trace_amount, claim.points, claim.requested_points) == (1, 3, 4)
    assert points_of(app_engine, world.alice) == (300, 0, 10)


def test_a_claim_is_idempotent_on_its_key(app_engine: sa.Engine, world: PointsWorld, unique: str) -> None:
    first, _ = _claim(app_engine, world, 100, f"{unique}-c")
    before = points_tables(app_engine, world.alice)
    again, status = _claim(app_engine, world, 100, f"{unique}-c")
    assert (status, again.id) == ("exists", first.id)
    with pytest.raises(Conflict, match="another claim"):
        _claim(app_engine, world, 101, f"{unique}-c")
    assert points_tables(app_engine, world.alice) == before


@pytest.mark.parametrize(
    ("points", "error", "code"),
    [
        (301, LedgerError, "insufficient_points"),
        (0, InvalidInput, "invalid_input"),
        (2**256, InvalidInput, "invalid_input"),
    ],
)
def test_a_refused_claim_writes_nothing(
    app_engine: sa.Engine, world: PointsWorld, unique: str, points: int, error: type[LedgerError], code: str
) -> None:
    before = points_tables(app_engine, world.alice)
    with pytest.raises(error) as info:
        _claim(app_engine, world, points, f"{unique}-x")
    assert info.value.code == code
    assert points_tables(app_engine, world.alice) == before


def test_no_wallet_no_claim_and_unknown_participants_are_not_found(
    app_engine: sa.Engine, world: PointsWorld
) -> None:
    with app_engine.begin() as conn, pytest.raises(LedgerError) as info:
        claims.create_claim(conn, CHAIN, world.bob, 1, "k-bob", RATE, "tests")
    assert info.value.code == "no_wallet"
    with app_engine.begin() as conn, pytest.raises(NotFound):
        claims.create_claim(conn, CHAIN, "nobody-here", 1, "k-nobody", RATE, "tests")


def test_points_past_their_expiry_cannot_be_claimed(
    app_engine: sa.Engine, world: PointsWorld, unique: str
) -> None:
    with app_engine.begin() as conn:
        ingest.ingest(conn, [world.event("x1", world.alice, world.expiring)])
        expires = conn.execute(
            sa.text("SELECT max(expires_at) FROM points_lots WHERE participant_id = :p"), {"p": world.alice}
        ).scalar_one()
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    with pytest.raises(LedgerError, match="300 claimable"):
        _claim(app_engine, world, 305, f"{unique}-late")


def _signed(
    world: PointsWorld, points: int, nonce: int, key: str = KEY
) -> tuple[claims.ClaimPointsRequest, str]:
    request = claims.ClaimPointsRequest(world.alice, points, nonce, int(time.time()) + 600)
    return request, party.sign(request, key, CHAIN.chain_id, CHAIN.token)  # type: ignore[arg-type]


def test_a_signed_claim_by_the_wallet_is_accepted_once(app_engine: sa.Engine, world: PointsWorld) -> None:
    request, signature = _signed(world, 100, 7)
    now = datetime.now(UTC)
    with app_engine.begin() as conn:
        claim, status = claims.create_signed_claim(conn, CHAIN, request, signature, RATE, now)
    assert (
        status == "created" and claim.key == f"party:{WALLET}:7" and claim.requested_by == f"party:{WALLET}"
    )
    with app_engine.begin() as conn:
        again, status = claims.create_signed_claim(conn, CHAIN, request, signature, RATE, now)
    assert (again.id, status) == (claim.id, "exists")
    before = points_tables(app_engine, world.alice)
    other, other_signature = _signed(world, 50, 7)
    with app_engine.begin() as conn, pytest.raises(Conflict) as info:
        claims.create_signed_claim(conn, CHAIN, other, other_signature, RATE, now)
    assert info.value.code == "nonce_replayed"
    assert points_tables(app_engine, world.alice) == before


@pytest.mark.parametrize("attack", ["other_key", "tampered", "expired", "garbage"])
def test_a_forged_or_stale_signed_claim_writes_nothing(
    app_engine: sa.Engine, world: PointsWorld, attack: str
) -> None:
    request, signature = _signed(world, 100, 8, OTHER_KEY if attack == "other_key" else KEY)
    now = datetime.now(UTC)
    if attack == "tampered":
        request = claims.ClaimPointsRequest(world.alice, 300, request.nonce, request.expiry)
    if attack == "expired":
        now += timedelta(hours=1)
    if attack == "garbage":
        signature = "0x1234"
    before = points_tables(app_engine, world.alice)
    with app_engine.begin() as conn, pytest.raises(InvalidInput):
        claims.create_signed_claim(conn, CHAIN, request, signature, RATE, now)
    assert points_tables(app_engine, world.alice) == before
    with app_engine.connect() as conn:
        used = conn.execute(sa.text("SELECT count(*) FROM party_nonces WHERE address = :a AND nonce = '8'"),
                            {"a": WALLET}).scalar_one()  # fmt: skip
    assert used == 0


def test_concurrent_claims_and_the_sweep_never_take_more_than_is_there(
    app_engine: sa.Engine, world: PointsWorld, unique: str
) -> None:
    with app_engine.begin() as conn:
        ingest.ingest(
            conn, [world.event(f"x{i}", world.alice, world.expiring) for i in range(4)]
        )  # 20, expiring
    results: list[str] = []
    lock = threading.Lock()

    def claim(n: int) -> None:
        try:
            _claim(app_engine, world, 90, f"{unique}-race-{n}")
            outcome = "claimed"
        except LedgerError as exc:
            outcome = exc.code
        with lock:
            results.append(outcome)

    def sweep() -> None:
        for _ in range(10):
            with app_engine.begin() as conn:
                expiry.expire_points(conn)
            time.sleep(0.1)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(5)] + [threading.Thread(target=sweep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # 300 unexpiring points pay for three claims of 90; the 20 expiring ones cannot make a fourth.
    assert sorted(results) == ["claimed"] * 3 + ["insufficient_points"] * 2
    credits, debits, held = points_of(app_engine, world.alice)
    assert held == 270 and credits == 320 and credits - debits - held >= 0
    with app_engine.connect() as conn:
        assert statements.lots_consistent(conn, world.alice)
