"""Escrow funding from the chain to the books (py-evm, real PostgreSQL): a matching funding moves the
escrow to funded and books the escrow contract's mirror against the escrow's own account; a
mismatched or unknown funding ends in a defined state and an exception, never in lost tokens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from web3 import EthereumTesterProvider, Web3

from contracts.client import ChainClient
from contracts.deploy import deploy_platform
from contracts.deployment import Deployment
from contracts.events import LogDecoder
from ledger import custody, db
from ledger.accounts import get_account
from ledger.errors import Conflict, InvalidInput
from ledger.escrow import attestation, service
from tests.books import assert_books_balance
from tests.conftest import APP_ROLE
from workers.escrow_saga import sweep
from workers.indexer import Indexer

TRACE = 10**18
CONFIRMATIONS = 2
# Three attestors (secret key, public key, proof of possession), made once: key checks are slow.
ATTESTORS = {
    name: attestation.generate_attestor(name.encode().ljust(32, b"."))
    for name in ("carrier", "customs", "port")
}
FAST = attestation.verifier("milagro")


@dataclass
class World:
    w3: Web3
    deployment: Deployment
    token: Any
    escrow: Any
    engine: sa.Engine
    buyer: str
    seller: str
    attestor_ids: tuple[int, ...]

    def indexer(self) -> Indexer:
        return Indexer(
            self.engine,
            ChainClient(self.w3),
            self.deployment,
            LogDecoder(),
            confirmations=CONFIRMATIONS,
            window_max=100,
        )

    def deadline(self, days: int = 7) -> datetime:
        now = datetime.fromtimestamp(int(self.w3.eth.get_block("latest")["timestamp"]), UTC)
        return (now + timedelta(days=days)).replace(microsecond=0)

    def create(
        self, key: str, amount: int, deadline: datetime | None = None, **overrides: Any
    ) -> service.Escrow:
        fields: dict[str, Any] = {
            "key": key,
            "chain_id": self.deployment.chain_id,
            "contract": self.deployment.escrow,
            "buyer": self.buyer,
            "seller": self.seller,
            "amount": amount,
            "fee_bps": 250,
            "deadline": deadline or self.deadline(),
            "delivery_ref": f"delivery-{key}",
            "attestor_ids": self.attestor_ids,
            "threshold": 2,
        }
        fields.update(overrides)
        with self.engine.begin() as conn:
            escrow, _ = service.create_escrow(conn, service.NewEscrow(**fields), "staff:test")
        return escrow

    def fund(self, escrow_id: str, amount: int, deadline: datetime, seller: str | None = None) -> None:
        self.token.functions.approve(self.escrow.address, amount).transact({"from": self.buyer})
        self.escrow.functions.fund(
            bytes.fromhex(escrow_id[2:]), seller or self.seller, amount, int(deadline.timestamp())
        ).transact({"from": self.buyer})
        self.w3.testing.mine(CONFIRMATIONS)

    def balance(self, code: str) -> int:
        with self.engine.connect() as conn:
            return get_account(conn, code).balance

    def exceptions(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT kind FROM finance_exceptions ORDER BY id")).scalars())


@pytest.fixture
def world(fresh_db_url: str) -> Iterator[World]:
    w3 = Web3(EthereumTesterProvider())
    admin, signer, fees, buyer, seller = w3.eth.accounts[:5]
    deployment = deploy_platform(w3, admin, signer=signer, fee_wallet=fees)
    token = w3.eth.contract(address=Web3.to_checksum_address(deployment.token), abi=_abi("TraceToken"))
    escrow = w3.eth.contract(address=Web3.to_checksum_address(deployment.escrow), abi=_abi("TraceEscrow"))
    token.functions.mint(buyer, 1_000 * TRACE).transact({"from": signer})
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=2)
    with engine.begin() as conn:
        ids = tuple(
            service.register_attestor(conn, name, pk, pop)[0] for name, (_, pk, pop) in ATTESTORS.items()
        )
    yield World(w3, deployment, token, escrow, engine, buyer, seller, ids)
    engine.dispose()


def _abi(name: str) -> Any:
    from contracts.artifacts import load_artifact

    return load_artifact(name).abi


def test_a_matching_funding_moves_the_escrow_to_funded_and_books_its_account(world: World) -> None:
    escrow = world.create("order-1", 100 * TRACE)
    assert escrow.status == "awaiting_funding"
    world.fund(escrow.id, 100 * TRACE, escrow.deadline)
    world.indexer().run_once()
    with world.engine.connect() as conn:
        funded = service.get_escrow(conn, escrow.id)
        moves = [(h["from_status"], h["to_status"]) for h in service.history(conn, escrow.id)]
    assert funded.status == "funded"
    assert funded.funded_amount == funded.remaining == 100 * TRACE
    assert moves == [(None, "awaiting_funding"), ("awaiting_funding", "funded")]
    mirror = custody.mirror_code(world.deployment.chain_id, world.deployment.escrow)
    assert (
        world.balance(mirror) == world.token.functions.balanceOf(world.escrow.address).call() == 100 * TRACE
    )
    assert world.balance(service.escrow_account(escrow.id)) == 100 * TRACE
    assert world.exceptions() == []
    # The indexer running again changes nothing.
    world.indexer().run_once()
    assert world.balance(service.escrow_account(escrow.id)) == 100 * TRACE
    assert_books_balance(world.engine)


def test_underfunding_ends_in_funding_exception_with_the_tokens_owed_to_the_escrow(world: World) -> None:
    escrow = world.create("order-2", 100 * TRACE)
    world.fund(escrow.id, 60 * TRACE, escrow.deadline)
    world.indexer().run_once()
    with world.engine.connect() as conn:
        state = service.get_escrow(conn, escrow.id)
    assert state.status == "funding_exception"
    assert state.funded_amount == 60 * TRACE
    assert world.balance(service.escrow_account(escrow.id)) == 60 * TRACE
    assert world.exceptions() == ["escrow_funding_mismatch"]


def test_funding_an_unknown_escrow_goes_to_suspense_and_raises_exceptions(world: World) -> None:
    unknown = "0x" + "ab" * 32
    world.fund(unknown, 5 * TRACE, world.deadline())
    world.indexer().run_once()
    assert world.balance(custody.suspense_code(world.deployment.chain_id)) == 5 * TRACE
    assert sorted(world.exceptions()) == ["escrow_funding_unknown", "unexplained_transfer"]


def test_creation_is_idempotent_and_refuses_bad_input(world: World) -> None:
    deadline = world.deadline()
    first = world.create("order-3", 10 * TRACE, deadline)
    again = world.create("order-3", 10 * TRACE, deadline)
    assert again.id == first.id
    with pytest.raises(Conflict):
        world.create("order-3", 11 * TRACE, deadline)
    bad: list[dict[str, Any]] = [
        {"amount": 0},
        {"amount": -1},
        {"amount": 2**256},
        {"fee_bps": 10_001},
        {"seller": world.buyer},
        {"buyer": "0x1234"},
        {"threshold": 4},
        {"threshold": 0},
        {"attestor_ids": ()},
        {"attestor_ids": (999_999, world.attestor_ids[0])},
        {"deadline": datetime(2000, 1, 1, tzinfo=UTC)},
        {"deadline": deadline.replace(tzinfo=None)},
        {"delivery_ref": ""},
    ]
    for i, override in enumerate(bad):
        fields: dict[str, Any] = {"amount": 10 * TRACE, "deadline": deadline, **override}
        with pytest.raises(InvalidInput):
            world.create(f"bad-{i}", fields.pop("amount"), fields.pop("deadline"), **fields)
    with world.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM escrows")).scalar_one() == 1


def test_attestations_one_by_one_confirm_delivery_at_the_threshold(world: World) -> None:
    escrow = world.create("order-9", 40 * TRACE)
    world.fund(escrow.id, 40 * TRACE, escrow.deadline)
    world.indexer().run_once()
    with world.engine.connect() as conn:
        message = service.delivery_message_of(service.get_escrow(conn, escrow.id))
    carrier, customs, port = world.attestor_ids
    signatures = {
        name: attestation.sign_delivery(secret, message) for name, (secret, _, _) in ATTESTORS.items()
    }
    with world.engine.begin() as conn:
        first = service.attest(conn, escrow.id, carrier, signatures["carrier"], FAST, "attestor:carrier")
    assert (first.status, first.escrow_status, first.attestations) == ("created", "funded", 1)
    with world.engine.begin() as conn:
        again = service.attest(conn, escrow.id, carrier, signatures["carrier"], FAST, "attestor:carrier")
    assert (again.status, again.attestations) == ("exists", 1)
    # A signature by another attestor's key, or over another escrow, is refused and stores nothing.
    for attestor_id, signature in ((customs, signatures["carrier"]), (customs, b"\x00" * 96)):
        with pytest.raises(InvalidInput), world.engine.begin() as conn:
            service.attest(conn, escrow.id, attestor_id, signature, FAST, "attestor:x")
    with world.engine.begin() as conn:
        done = service.attest(conn, escrow.id, port, signatures["port"], FAST, "attestor:port")
    assert (done.escrow_status, done.attestations, done.threshold) == ("delivery_confirmed", 2, 2)
    with world.engine.connect() as conn:
        proof = conn.execute(
            sa.text("SELECT release_proof, proof_signers FROM escrows WHERE id = :id"), {"id": escrow.id}
        ).one()
        stored = service.get_escrow(conn, escrow.id)
    assert stored.has_release_proof
    assert sorted(int(s) for s in proof.proof_signers) == sorted([carrier, port])
    # The stored aggregate verifies with the reference verifier too.
    keys = [ATTESTORS["carrier"][1], ATTESTORS["port"][1]]
    assert attestation.verifier("py_ecc").fast_aggregate_verify(keys, message, bytes(proof.release_proof))


def test_a_funding_after_the_escrow_expired_is_refunded_by_the_sweep(world: World) -> None:
    deadline = world.deadline(days=1)
    escrow = world.create("late-1", 40 * TRACE, deadline)
    # Our clock passes the deadline before the chain's does: the unfunded escrow expires.
    after = deadline + timedelta(seconds=1)
    first = sweep(world.engine, world.deployment, after)
    assert (first.expired, first.refunds_started) == (1, 0)
    # The buyer's funding still lands on chain (its clock is behind): booked, not lost.
    world.fund(escrow.id, 40 * TRACE, deadline)
    world.indexer().run_once()
    late = _escrow(world, escrow.id)
    assert (late.status, late.funded_amount) == ("expired", 40 * TRACE)
    assert world.balance(service.escrow_account(escrow.id)) == 40 * TRACE
    assert "escrow_funding_mismatch" in world.exceptions()
    # The next sweep sends it back to the buyer through the refund saga, once.
    second = sweep(world.engine, world.deployment, after)
    assert (second.expired, second.refunds_started) == (0, 1)
    assert _escrow(world, escrow.id).status == "refunding"
    assert sweep(world.engine, world.deployment, after).refunds_started == 0
    with world.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT action, metadata->>'amount' FROM chain_outbox WHERE metadata->>'escrow_id' = :e"),
            {"e": escrow.id},
        ).all()
    assert [tuple(r) for r in rows] == [("escrow.refund", str(40 * TRACE))]


def _escrow(world: World, escrow_id: str) -> service.Escrow:
    with world.engine.connect() as conn:
        return service.get_escrow(conn, escrow_id)
