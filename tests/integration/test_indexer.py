"""The indexer against py-evm in process and a real PostgreSQL: custody mirrors follow the chain,
suspense and exceptions for unexplained transfers, resumption, shallow and deep reorgs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from web3 import EthereumTesterProvider, Web3

from contracts.artifacts import load_artifact
from contracts.client import ChainClient
from contracts.deployment import Deployment
from contracts.events import LogDecoder
from ledger import custody, db
from ledger.accounts import get_account
from tests.books import assert_books_balance
from tests.conftest import APP_ROLE
from workers import locks
from workers.indexer import Indexer

CONFIRMATIONS = 3
TRACE = 10**18


@dataclass
class Setup:
    w3: Web3
    token: Any
    deployment: Deployment
    engine: sa.Engine
    admin: str
    users: list[str]

    def indexer(self, window_max: int = 50) -> Indexer:
        return Indexer(
            self.engine,
            ChainClient(self.w3),
            self.deployment,
            LogDecoder(),
            confirmations=CONFIRMATIONS,
            window_max=window_max,
        )

    def transfer(self, sender: str, recipient: str, amount: int) -> None:
        self.token.functions.transfer(recipient, amount).transact({"from": sender})

    def mine(self, blocks: int) -> None:
        self.w3.testing.mine(blocks)

    def mirror(self, address: str) -> int:
        with self.engine.connect() as conn:
            account = get_account(conn, custody.mirror_code(self.deployment.chain_id, address.lower()))
        return account.balance

    def balance_of(self, address: str) -> int:
        return int(self.token.functions.balanceOf(address).call())

    def exceptions(self, kind: str) -> list[Any]:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT key, details FROM finance_exceptions WHERE kind = :k ORDER BY id"),
                {"k": kind},
            ).all()


@pytest.fixture
def setup(fresh_db_url: str) -> Iterator[Setup]:
    w3 = Web3(EthereumTesterProvider())
    accounts = list(w3.eth.accounts)
    admin = accounts[0]
    artifact = load_artifact("TraceToken")
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    receipt = w3.eth.wait_for_transaction_receipt(
        factory.constructor("Trace", "TRACE", admin).transact({"from": admin})
    )
    token = w3.eth.contract(address=receipt["contractAddress"], abi=artifact.abi)
    minter = token.functions.MINTER_ROLE().call()
    token.functions.grantRole(minter, admin).transact({"from": admin})
    users = accounts[1:5]
    for user in users:
        token.functions.mint(user, 1_000 * TRACE).transact({"from": admin})
    # Custody addresses: the escrow and vault stand-ins are plain accounts here; only the
    # token's Transfer logs matter to the mirrors.
    deployment = Deployment(
        chain_id=int(w3.eth.chain_id),
        start_block=int(receipt["blockNumber"]),
        token=str(token.address),
        escrow=accounts[5],
        vault=accounts[6],
        treasury=accounts[7],
        fee_wallet=accounts[8],
    )
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=3)
    yield Setup(w3, token, deployment, engine, admin, users)
    engine.dispose()


def _custody_matches_chain(s: Setup) -> None:
    for address in s.deployment.custody:
        assert s.mirror(address) == s.balance_of(Web3.to_checksum_address(address)), address


def test_mirrors_follow_confirmed_transfers_and_unexplained_ones_go_to_suspense(setup: Setup) -> None:
    s = setup
    escrow, treasury = (Web3.to_checksum_address(a) for a in (s.deployment.escrow, s.deployment.treasury))
    s.transfer(s.users[0], escrow, 5 * TRACE)
    s.transfer(s.users[1], treasury, 7 * TRACE)
    s.transfer(s.users[2], s.users[3], 1 * TRACE)  # touches no custody address
    report = s.indexer().run_once()
    # Nothing is confirmed yet: stored, not booked.
    assert report.events_stored >= 3
    assert report.entries_booked == 0
    assert s.mirror(escrow) == 0
    s.mine(CONFIRMATIONS)
    report = s.indexer().run_once()
    assert report.entries_booked == 2
    _custody_matches_chain(s)
    assert s.mirror(escrow) == 5 * TRACE
    with s.engine.connect() as conn:
        suspense = get_account(conn, custody.suspense_code(s.deployment.chain_id))
    assert suspense.balance == 12 * TRACE
    unexplained = s.exceptions("unexplained_transfer")
    assert len(unexplained) == 2
    assert {row.details["amount"] for row in unexplained} == {str(5 * TRACE), str(7 * TRACE)}
    assert_books_balance(s.engine)


def test_outflows_and_moves_between_custody_addresses(setup: Setup) -> None:
    s = setup
    treasury, fees = (Web3.to_checksum_address(a) for a in (s.deployment.treasury, s.deployment.fee_wallet))
    s.transfer(s.users[0], treasury, 10 * TRACE)
    s.transfer(treasury, fees, 3 * TRACE)
    s.transfer(treasury, s.users[1], 4 * TRACE)
    s.mine(CONFIRMATIONS)
    s.indexer().run_once()
    _custody_matches_chain(s)
    assert s.mirror(treasury) == 3 * TRACE
    assert s.mirror(fees) == 3 * TRACE
    with s.engine.connect() as conn:
        suspense = get_account(conn, custody.suspense_code(s.deployment.chain_id))
    assert suspense.balance == 10 * TRACE - 4 * TRACE
    assert len(s.exceptions("unexplained_transfer")) == 3


def test_a_second_run_books_nothing_new_and_a_small_window_resumes_where_it_stopped(setup: Setup) -> None:
    s = setup
    escrow = Web3.to_checksum_address(s.deployment.escrow)
    for i in range(6):
        s.transfer(s.users[i % 4], escrow, (i + 1) * TRACE)
    s.mine(CONFIRMATIONS)
    indexer = s.indexer(window_max=2)
    first = indexer.run_once(max_windows=2)  # stops part way, as a crash would
    assert first.windows == 2
    with s.engine.connect() as conn:
        cursor = conn.execute(sa.text("SELECT indexed_block FROM chain_cursors")).scalar_one()
    assert cursor < s.w3.eth.block_number
    rest = indexer.run_once()
    assert rest.events_stored > 0
    _custody_matches_chain(s)
    again = s.indexer().run_once()
    assert again.events_stored == 0
    assert again.entries_booked == 0
    assert s.mirror(escrow) == 21 * TRACE
    with s.engine.connect() as conn:
        booked = conn.execute(
            sa.text("SELECT count(*) FROM ledger_entries WHERE kind = 'chain.suspense'")
        ).scalar_one()
    assert booked == 6


def test_one_indexer_per_chain(setup: Setup) -> None:
    s = setup
    holder = s.indexer()
    with s.engine.connect() as conn:
        assert conn.execute(
            sa.text("SELECT pg_try_advisory_lock(:n, :k)"),
            {"n": locks.INDEXER_LOCKS, "k": s.deployment.chain_id % 2**31},
        ).scalar_one()
        report = holder.run_once()
        assert report.skipped_locked
        conn.execute(sa.text("SELECT pg_advisory_unlock_all()"))
    assert not s.indexer().run_once().skipped_locked


def test_a_shallow_reorg_never_reaches_the_ledger(setup: Setup) -> None:
    s = setup
    escrow = Web3.to_checksum_address(s.deployment.escrow)
    s.indexer().run_once()
    snapshot = s.w3.testing.snapshot()
    s.transfer(s.users[0], escrow, 9 * TRACE)  # will be orphaned before it is confirmed
    stored = s.indexer().run_once()
    assert stored.events_stored == 1
    assert stored.entries_booked == 0
    s.w3.testing.revert(snapshot)
    s.transfer(s.users[1], escrow, 2 * TRACE)
    s.mine(CONFIRMATIONS + 1)
    report = s.indexer().run_once()
    assert report.reorgs == 1
    assert report.orphaned == 1
    assert report.compensated == 0
    _custody_matches_chain(s)
    assert s.mirror(escrow) == 2 * TRACE
    assert s.exceptions("reorg_compensated") == []
    with s.engine.connect() as conn:
        statuses = dict(
            conn.execute(sa.text("SELECT status, count(*) FROM chain_events GROUP BY status")).all()
        )
    assert statuses["orphaned"] == 1


def test_a_deep_reorg_is_compensated_by_a_reversal_and_an_exception(setup: Setup) -> None:
    s = setup
    escrow = Web3.to_checksum_address(s.deployment.escrow)
    s.transfer(s.users[0], escrow, 1 * TRACE)
    s.mine(CONFIRMATIONS)
    s.indexer().run_once()
    snapshot = s.w3.testing.snapshot()
    s.transfer(s.users[1], escrow, 9 * TRACE)  # booked, then orphaned by a longer chain
    s.mine(CONFIRMATIONS)
    booked = s.indexer().run_once()
    assert booked.entries_booked == 1
    assert s.mirror(escrow) == 10 * TRACE
    s.w3.testing.revert(snapshot)
    s.transfer(s.users[2], escrow, 4 * TRACE)
    s.mine(CONFIRMATIONS + 3)
    report = s.indexer().run_once()
    assert report.reorgs == 1
    assert report.compensated == 1
    _custody_matches_chain(s)
    assert s.mirror(escrow) == 5 * TRACE
    compensated = s.exceptions("reorg_compensated")
    assert len(compensated) == 1
    with s.engine.connect() as conn:
        reversal = conn.execute(
            sa.text(
                "SELECT r.idempotency_key, r.block_hash FROM ledger_entries r"
                " JOIN ledger_entries e ON e.id = r.reverses_entry_id"
            )
        ).one()
    assert reversal.idempotency_key.startswith("reorg:chain:")
    # Running again after the reorg changes nothing.
    again = s.indexer().run_once()
    assert (again.compensated, again.entries_booked, again.reorgs) == (0, 0, 0)
    assert_books_balance(s.engine)


def test_a_transaction_reincluded_after_a_deep_reorg_is_booked_again_under_a_new_key(setup: Setup) -> None:
    s = setup
    escrow = Web3.to_checksum_address(s.deployment.escrow)
    s.indexer().run_once()
    snapshot = s.w3.testing.snapshot()
    tx = s.token.functions.transfer(escrow, 3 * TRACE).build_transaction(
        {"from": s.users[0], "nonce": s.w3.eth.get_transaction_count(s.users[0])}
    )
    tx_hash = s.w3.eth.send_transaction(tx)
    s.mine(CONFIRMATIONS)
    s.indexer().run_once()
    assert s.mirror(escrow) == 3 * TRACE
    s.w3.testing.revert(snapshot)
    s.mine(2)  # a different history of empty blocks, then the same transaction again
    assert s.w3.eth.send_transaction(tx) == tx_hash
    s.mine(CONFIRMATIONS + 2)
    report = s.indexer().run_once()
    assert report.compensated == 1
    assert report.entries_booked == 1
    _custody_matches_chain(s)
    with s.engine.connect() as conn:
        keys = (
            conn.execute(
                sa.text("SELECT idempotency_key FROM ledger_entries WHERE tx_hash = :h ORDER BY id"),
                {"h": "0x" + bytes(tx_hash).hex()},
            )
            .scalars()
            .all()
        )
    base = f"chain:{s.deployment.chain_id}:0x{bytes(tx_hash).hex()}:0"
    assert keys == [base, f"reorg:{base}", f"{base}:g1"]


def test_a_rollback_below_the_deployment_restarts_at_its_first_block(setup: Setup) -> None:
    # A chain that started over (the dev chain after a restart) can share no block with what was
    # stored, down to before the deployment: the cursor goes back to the deployment's first block.
    s = setup
    s.transfer(s.users[0], Web3.to_checksum_address(s.deployment.escrow), 3 * TRACE)
    s.mine(CONFIRMATIONS)
    indexer = s.indexer()
    indexer.run_once()
    assert s.mirror(s.deployment.escrow) == 3 * TRACE
    report = indexer.run_once()
    indexer._roll_back(s.deployment.start_block - 5, report)
    with s.engine.connect() as conn:
        cursor = conn.execute(
            sa.text("SELECT indexed_block, handled_block FROM chain_cursors WHERE chain_id = :c"),
            {"c": s.deployment.chain_id},
        ).one()
    assert tuple(cursor) == (s.deployment.start_block - 1, s.deployment.start_block - 1)
    assert s.mirror(s.deployment.escrow) == 0  # compensated
    indexer.run_once()
    _custody_matches_chain(s)
    assert_books_balance(s.engine)
