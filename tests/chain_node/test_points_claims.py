"""Claims on anvil, through the real sender and PostgreSQL: a claim mints TRACE to the wallet once
and posts its holds on the confirmed receipt; a reverted mint voids both holds, raises an exception
and gives the points back; a signed claim sent again mints nothing more."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from web3 import Web3

from contracts.anvil import AnvilNode
from contracts.bindings import MINTER_ROLE, contract_at, transact
from contracts.deploy import deploy_platform
from ledger import custody, db
from ledger.errors import InvalidInput
from ledger.escrow import party
from ledger.points import claims, expiry, ingest, rules, statements
from tests.books import assert_books_balance, totals
from tests.conftest import APP_ROLE
from workers.sender import Sender

TRACE = 10**18
RATE = Decimal(100)  # points per TRACE


@pytest.fixture
def world(anvil: AnvilNode, fresh_db_url: str) -> Iterator[dict[str, Any]]:
    snapshot = anvil.snapshot()
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    deployer, signer, fees, participant = (Account.from_key(k) for k in anvil.private_keys[:4])
    deployment = deploy_platform(w3, deployer, signer=signer.address, fee_wallet=fees.address)
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=3)
    with engine.begin() as conn:
        rule = rules.add_rule_version(conn, rules.NewRule("checkpoint", 50), "tests")
        rules.set_participant(conn, "acme", "gold", participant.address, "tests")
    events = [
        {"source": "s", "event_id": f"e{i}", "participant": "acme", "type": "checkpoint",
         "occurred_at": rule.effective_at.isoformat()}
        for i in range(20)
    ]  # fmt: skip
    with engine.begin() as conn:
        assert ingest.ingest(conn, events).points == 1000
    sender = Sender(
        engine, w3, signer, deployment.chain_id, confirmations=1, bump_after_s=60, max_in_flight=16
    )
    try:
        yield {
            "w3": w3,
            "anvil": anvil,
            "deployment": deployment,
            "token": contract_at(w3, "TraceToken", deployment.token),
            "participant": participant,
            "signer": signer,
            "deployer": deployer,
            "engine": engine,
            "sender": sender,
            "chain": claims.Chain(deployment.chain_id, deployment.token, deployment.treasury),
        }
    finally:
        engine.dispose()
        anvil.revert(snapshot)


def _claim(world: dict[str, Any], points: int, key: str) -> claims.Claim:
    with world["engine"].begin() as conn:
        claim, _ = claims.create_claim(conn, world["chain"], "acme", points, key, RATE, "tests")
    return claim


def _settle(world: dict[str, Any], claim_id: int, rounds: int = 8) -> claims.Claim:
    for _ in range(rounds):
        world["sender"].run_once()
        world["anvil"].mine(1)
        with world["engine"].connect() as conn:
            claim = claims.get_claim(conn, claim_id)
        if claim.status != "pending":
            return claim
    return claim


def _minted_to(world: dict[str, Any]) -> int:
    return int(world["token"].functions.balanceOf(world["participant"].address).call())


def test_a_claim_mints_once_and_posts_both_holds_on_the_confirmed_receipt(world: dict[str, Any]) -> None:
    claim = _claim(world, 250, "c1")
    assert claim.status == "pending" and _minted_to(world) == 0
    paid = _settle(world, claim.id)
    assert paid.status == "paid" and paid.tx_hash is not None
    assert _minted_to(world) == 25 * TRACE // 10
    chain_id = world["deployment"].chain_id
    # points:acme paid 250 points to points:redeemed; the mint is booked, no hold left open.
    assert totals(world["engine"], "points:acme") == (250, 1000, 0, 0)
    assert totals(world["engine"], custody.minted_code(chain_id)) == (0, 25 * TRACE // 10, 0, 0)
    assert totals(world["engine"], claims.CLAIMS_EXPENSE) == (25 * TRACE // 10, 0, 0, 0)
    with world["engine"].connect() as conn:
        assert statements.lots_consistent(conn, "acme")
        assert statements.balance(conn, "acme").available == 750
        exceptions = conn.execute(sa.text("SELECT count(*) FROM finance_exceptions")).scalar_one()
    assert exceptions == 0
    # The sender again finds nothing to do: the mint went out once.
    for _ in range(3):
        world["sender"].run_once()
        world["anvil"].mine(1)
    assert _minted_to(world) == 25 * TRACE // 10
    assert_books_balance(world["engine"])


def test_a_reverted_mint_voids_the_claim_and_gives_the_points_back(world: dict[str, Any]) -> None:
    token, w3 = world["token"], world["w3"]
    transact(w3, token.functions.revokeRole(MINTER_ROLE, world["signer"].address), world["deployer"])
    claim = _claim(world, 400, "c-revert")
    failed = _settle(world, claim.id)
    assert failed.status == "failed" and _minted_to(world) == 0
    assert totals(world["engine"], "points:acme") == (0, 1000, 0, 0)
    assert totals(world["engine"], custody.minted_code(world["deployment"].chain_id)) == (0, 0, 0, 0)
    with world["engine"].connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions")).scalars().all()
        balance = statements.balance(conn, "acme")
        assert statements.lots_consistent(conn, "acme")
    assert kinds == ["chain_action_failed"]
    assert (balance.available, balance.claimable) == (1000, 1000)
    # With the role back, the participant claims again and is paid.
    transact(w3, token.functions.grantRole(MINTER_ROLE, world["signer"].address), world["deployer"])
    again = _settle(world, _claim(world, 1000, "c-again").id)
    assert again.status == "paid" and _minted_to(world) == 10 * TRACE
    assert totals(world["engine"], "points:acme") == (1000, 1000, 0, 0)
    assert_books_balance(world["engine"])


def test_a_signed_claim_sent_twice_mints_once_and_a_forged_one_nothing(world: dict[str, Any]) -> None:
    chain, participant = world["chain"], world["participant"]
    request = claims.ClaimPointsRequest("acme", 100, 1, int(time.time()) + 600)
    signature = party.sign(request, participant.key, chain.chain_id, chain.token)  # type: ignore[arg-type]
    for _ in range(2):
        with world["engine"].begin() as conn:
            claim, _ = claims.create_signed_claim(conn, chain, request, signature, RATE, datetime.now(UTC))
        assert _settle(world, claim.id).status == "paid"
    assert _minted_to(world) == TRACE
    forged_request = claims.ClaimPointsRequest("acme", 900, 2, int(time.time()) + 600)
    stranger = Account.from_key(world["anvil"].private_keys[5])
    forged = party.sign(forged_request, stranger.key, chain.chain_id, chain.token)  # type: ignore[arg-type]
    with world["engine"].begin() as conn, pytest.raises(InvalidInput, match="not signed by"):
        claims.create_signed_claim(conn, chain, forged_request, forged, RATE, datetime.now(UTC))
    world["sender"].run_once()
    world["anvil"].mine(1)
    assert _minted_to(world) == TRACE
    assert totals(world["engine"], "points:acme") == (100, 1000, 0, 0)


def test_a_mint_orphaned_before_its_confirmation_is_sent_again_and_paid_once(world: dict[str, Any]) -> None:
    anvil, w3 = world["anvil"], world["w3"]
    # Two confirmations, and a transaction not seen for a moment is sent again (fee bump).
    sender = Sender(
        world["engine"], w3, world["signer"], world["deployment"].chain_id,
        confirmations=2, bump_after_s=0, max_in_flight=16,
    )  # fmt: skip
    claim = _claim(world, 300, "c-orphan")
    fork = anvil.snapshot()
    sender.run_once()  # signed, broadcast, mined at once (anvil mines a block per transaction)
    assert _minted_to(world) == 3 * TRACE
    with world["engine"].connect() as conn:
        assert claims.get_claim(conn, claim.id).status == "pending"  # not yet two blocks deep
    # The mint's block leaves the canonical chain: a longer fork without it.
    anvil.revert(fork)
    anvil.mine(3)
    assert _minted_to(world) == 0
    with world["engine"].connect() as conn:
        assert claims.get_claim(conn, claim.id).status == "pending"
    for _ in range(8):
        sender.run_once()
        anvil.mine(1)
        with world["engine"].connect() as conn:
            if claims.get_claim(conn, claim.id).status != "pending":
                break
    with world["engine"].connect() as conn:
        final = claims.get_claim(conn, claim.id)
    assert final.status == "paid"
    assert _minted_to(world) == 3 * TRACE  # minted once, on the canonical chain
    assert totals(world["engine"], "points:acme") == (300, 1000, 0, 0)
    assert_books_balance(world["engine"])


def test_points_a_failed_claim_returns_to_an_expired_lot_are_swept_and_the_lot_settles(
    world: dict[str, Any],
) -> None:
    token, w3, engine = world["token"], world["w3"], world["engine"]
    with engine.begin() as conn:
        rule = rules.add_rule_version(conn, rules.NewRule("brief", 30, expires_after_s=1), "tests")
    event = {"source": "s", "event_id": "b1", "participant": "acme", "type": "brief"}
    with engine.begin() as conn:
        ingest.ingest(conn, [{**event, "occurred_at": rule.effective_at.isoformat()}])
        lot_id, expires = conn.execute(
            sa.text("SELECT id, expires_at FROM points_lots WHERE expires_at IS NOT NULL")
        ).one()
    transact(w3, token.functions.revokeRole(MINTER_ROLE, world["signer"].address), world["deployer"])
    claim = _claim(world, 30, "c-brief")  # takes the expiring lot first
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
    with engine.begin() as conn:
        first = expiry.expire_points(conn)
    # The lot is past its expiry but its points are held by the pending claim: nothing to expire,
    # and the lot is not settled.
    assert (first.examined, first.lots) == (1, 0)
    assert _settle(world, claim.id).status == "failed"
    with engine.begin() as conn:
        second = expiry.expire_points(conn)
        settled = conn.execute(
            sa.text("SELECT settled FROM points_lots WHERE id = :i"), {"i": lot_id}
        ).scalar_one()
        keys = conn.execute(sa.text("SELECT entry_key FROM points_expiries")).scalars().all()
        assert statements.lots_consistent(conn, "acme")
    assert (second.lots, second.points, settled, keys) == (1, 30, True, [f"points:expire:{lot_id}"])
    with engine.begin() as conn:
        assert expiry.expire_points(conn).examined == 0  # settled: never read again
    assert totals(engine, "points:acme") == (30, 1030, 0, 0)
    assert_books_balance(engine)
