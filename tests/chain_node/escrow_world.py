"""An escrow world on anvil for the saga tests: the platform deployed, attestors registered, the
indexer and the sender wired to a fresh database, and helpers to create and fund an escrow."""

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
from tests.conftest import APP_ROLE
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
            "signer": signer,
            "deployer": deployer,
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


def create_and_fund(
    world: dict[str, Any], key: str, amount: int, deadline_s: int = 5 * 86_400
) -> service.Escrow:
    """Create an escrow of ``amount`` due in ``deadline_s`` (chain time), fund it from the buyer,
    and index it to ``funded``."""
    w3, deployment, anvil = world["w3"], world["deployment"], world["anvil"]
    buyer, seller = world["buyer"], world["seller"]
    now = datetime.fromtimestamp(int(w3.eth.get_block("latest")["timestamp"]), UTC)
    deadline = (now + timedelta(seconds=deadline_s)).replace(microsecond=0)
    with world["engine"].begin() as conn:
        escrow, _ = service.create_escrow(
            conn,
            service.NewEscrow(
                key=key,
                chain_id=deployment.chain_id,
                contract=deployment.escrow,
                buyer=buyer.address,
                seller=seller.address,
                amount=amount,
                fee_bps=250,
                deadline=deadline,
                delivery_ref=f"BOL-{key}",
                attestor_ids=world["attestors"],
                threshold=2,
            ),
            "staff:test",
        )
    contract = contract_at(w3, "TraceEscrow", deployment.escrow)
    transact(w3, world["token"].functions.approve(contract.address, amount), buyer)
    fund = contract.functions.fund(
        bytes.fromhex(escrow.id[2:]), seller.address, amount, int(deadline.timestamp())
    )
    transact(w3, fund, buyer)
    anvil.mine(1)
    world["indexer"].run_once()
    return escrow_of(world, escrow.id)


def escrow_of(world: dict[str, Any], escrow_id: str) -> service.Escrow:
    with world["engine"].connect() as conn:
        return service.get_escrow(conn, escrow_id)


def balance(world: dict[str, Any], code: str) -> int:
    with world["engine"].connect() as conn:
        return get_account(conn, code).balance


def run_until_settled(world: dict[str, Any], escrow_id: str, status: str, rounds: int = 12) -> service.Escrow:
    """Sender, a block, indexer, until the escrow reaches ``status`` and no chain action is open."""
    for _ in range(rounds):
        world["sender"].run_once()
        world["anvil"].mine(1)
        world["indexer"].run_once()
        with world["engine"].connect() as conn:
            unsettled = conn.execute(
                sa.text("SELECT count(*) FROM chain_outbox WHERE status NOT IN ('confirmed', 'failed')")
            ).scalar_one()
        if escrow_of(world, escrow_id).status == status and unsettled == 0:
            break
    return escrow_of(world, escrow_id)


def assert_books_follow_the_chain(world: dict[str, Any]) -> None:
    """Every custody mirror equals balanceOf, the clearing account is empty, no hold is open."""
    deployment, token = world["deployment"], world["token"]
    for address in deployment.custody:
        on_chain = token.functions.balanceOf(Web3.to_checksum_address(address)).call()
        assert balance(world, custody.mirror_code(deployment.chain_id, address)) == on_chain, address
    assert balance(world, custody.clearing_code(deployment.chain_id)) == 0
    with world["engine"].connect() as conn:
        open_holds = conn.execute(
            sa.text("SELECT count(*) FROM ledger_accounts WHERE debits_pending <> 0 OR credits_pending <> 0")
        ).scalar_one()
    assert open_holds == 0
