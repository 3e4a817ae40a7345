"""Fund -> attest -> release on anvil, through the indexer and the sender, with real PostgreSQL:
the seller and the fee wallet are paid once, every mirror equals balanceOf, no hold stays open."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from web3 import Web3

from contracts.anvil import AnvilNode
from contracts.bindings import contract_at, transact
from contracts.client import ChainClient
from contracts.deploy import deploy_platform
from contracts.events import LogDecoder
from ledger import custody, db
from ledger.accounts import get_account
from ledger.escrow import attestation, service
from ledger.escrow.states import TransitionRefused
from tests.books import assert_books_balance
from tests.conftest import APP_ROLE
from workers.escrow_saga import start_release
from workers.indexer import Indexer
from workers.sender import Sender

TRACE = 10**18
ATTESTORS = {n: attestation.generate_attestor(n.encode().ljust(32, b"-")) for n in ("carrier", "customs")}
FAST = attestation.verifier("milagro")


@pytest.fixture
def world(anvil: AnvilNode, fresh_db_url: str) -> Iterator[dict[str, Any]]:
    snapshot = anvil.snapshot()
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    deployer, signer, fees, buyer, seller = (Account.from_key(k) for k in anvil.private_keys[:5])
    deployment = deploy_platform(w3, deployer, signer=signer.address, fee_wallet=fees.address)
    token = contract_at(w3, "TraceToken", deployment.token)
    transact(w3, token.functions.mint(buyer.address, 1_000 * TRACE), signer)
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=3)
    with engine.begin() as conn:
        ids = tuple(service.register_attestor(conn, n, pk, pop)[0] for n, (_, pk, pop) in ATTESTORS.items())
    indexer = Indexer(engine, ChainClient(w3), deployment, LogDecoder(), confirmations=1, window_max=500)
    sender = Sender(
        engine, w3, signer, deployment.chain_id, confirmations=1, bump_after_s=60, max_in_flight=16
    )
    try:
        yield {
            "w3": w3,
            "anvil": anvil,
            "deployment": deployment,
            "token": token,
            "buyer": buyer,
            "seller": seller,
            "fees": fees,
            "engine": engine,
            "indexer": indexer,
            "sender": sender,
            "attestors": ids,
        }
    finally:
        engine.dispose()
        anvil.revert(snapshot)


def _balance(world: dict[str, Any], code: str) -> int:
    with world["engine"].connect() as conn:
        return get_account(conn, code).balance


def _escrow(world: dict[str, Any], escrow_id: str) -> service.Escrow:
    with world["engine"].connect() as conn:
        return service.get_escrow(conn, escrow_id)


def test_fund_attest_release_pays_once_and_leaves_the_books_matching_the_chain(world: dict[str, Any]) -> None:
    w3, deployment, token, anvil = world["w3"], world["deployment"], world["token"], world["anvil"]
    buyer, seller, fees = world["buyer"], world["seller"], world["fees"]
    now = datetime.fromtimestamp(int(w3.eth.get_block("latest")["timestamp"]), UTC)
    deadline = (now + timedelta(days=5)).replace(microsecond=0)
    with world["engine"].begin() as conn:
        escrow, _ = service.create_escrow(
            conn,
            service.NewEscrow(
                key="po-77",
                chain_id=deployment.chain_id,
                contract=deployment.escrow,
                buyer=buyer.address,
                seller=seller.address,
                amount=200 * TRACE,
                fee_bps=250,
                deadline=deadline,
                delivery_ref="BOL-77",
                attestor_ids=world["attestors"],
                threshold=2,
            ),
            "staff:test",
        )
    contract = contract_at(w3, "TraceEscrow", deployment.escrow)
    transact(w3, token.functions.approve(contract.address, 200 * TRACE), buyer)
    transact(
        w3,
        contract.functions.fund(
            bytes.fromhex(escrow.id[2:]), seller.address, 200 * TRACE, int(deadline.timestamp())
        ),
        buyer,
    )
    anvil.mine(1)
    world["indexer"].run_once()
    assert _escrow(world, escrow.id).status == "funded"
    # A release before delivery is confirmed is refused, and writes nothing.
    with pytest.raises(TransitionRefused):
        start_release(world["engine"], deployment, escrow.id, "staff:test")
    message = service.delivery_message_of(_escrow(world, escrow.id))
    for attestor_id, (secret, _, _) in zip(world["attestors"], ATTESTORS.values(), strict=True):
        with world["engine"].begin() as conn:
            service.attest(
                conn, escrow.id, attestor_id, attestation.sign_delivery(secret, message), FAST, "a"
            )
    assert _escrow(world, escrow.id).status == "delivery_confirmed"

    start_release(world["engine"], deployment, escrow.id, "staff:test")
    assert _escrow(world, escrow.id).status == "releasing"
    for _ in range(10):
        world["sender"].run_once()
        anvil.mine(1)
        world["indexer"].run_once()
        with world["engine"].connect() as conn:
            unsettled = conn.execute(
                sa.text("SELECT count(*) FROM chain_outbox WHERE status NOT IN ('confirmed', 'failed')")
            ).scalar_one()
        if _escrow(world, escrow.id).status == "released" and unsettled == 0:
            break
    final = _escrow(world, escrow.id)
    assert final.status == "released"
    fee = 5 * TRACE  # 2.5 % of 200, rounded up (exact here)
    assert (final.released_amount, final.fee_amount, final.remaining) == (195 * TRACE, fee, 0)
    assert token.functions.balanceOf(seller.address).call() == 195 * TRACE
    assert token.functions.balanceOf(fees.address).call() == fee
    assert token.functions.balanceOf(contract.address).call() == 0
    chain_id = deployment.chain_id
    for address in deployment.custody:
        assert (
            _balance(world, custody.mirror_code(chain_id, address))
            == token.functions.balanceOf(Web3.to_checksum_address(address)).call()
        ), address
    assert _balance(world, service.escrow_account(escrow.id)) == 0
    assert _balance(world, service.fees_account()) == fee
    assert _balance(world, custody.clearing_code(chain_id)) == 0
    with world["engine"].connect() as conn:
        open_holds = conn.execute(
            sa.text("SELECT count(*) FROM ledger_accounts WHERE debits_pending <> 0 OR credits_pending <> 0")
        ).scalar_one()
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions")).scalars().all()
    assert open_holds == 0
    # Minting to the buyer touches no custody address: nothing at all is left for finance.
    assert kinds == []
    assert_books_balance(world["engine"])
