"""The transaction sender against a real node (anvil) and a real PostgreSQL.

Outbox rows are ERC-20 transfers from the signing key (the treasury) with ledger holds; the
sender signs them with consecutive nonces, broadcasts, settles on confirmed receipts and bumps
fees of stuck transactions. Two crash tests check that every action still reaches the chain
exactly once, with no nonce gap: one lets in-process senders die right after each kind of node
request in turn (deterministic), the other SIGKILLs `tracechain send` at random moments.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import TransactionNotFound

from contracts.anvil import AnvilNode
from contracts.artifacts import load_artifact
from contracts.client import ChainClient, hex32
from contracts.deployment import Deployment
from contracts.events import LogDecoder
from ledger import custody, db, outbox
from ledger.accounts import create_account, get_account
from ledger.commands import Leg, NewEntry
from ledger.engine import post_batch
from ledger.errors import Conflict, InvalidInput, LedgerError
from ledger.outbox import ChainAction
from tests.books import assert_books_balance, wait_for_lock_waiters
from tests.conftest import APP_ROLE
from workers.indexer import Indexer
from workers.sender import Sender, SenderReport

TRACE = 10**18
GAS = 100_000
MINTED = 1_000_000 * TRACE
BUDGET = 100_000 * TRACE
BUDGET_ACCOUNT = "test:budget"
PAYABLE = "test:payable"
TRANSFER_TOPIC = keccak(text="Transfer(address,address,uint256)")
SENDER_LOCK_CLASS = 7_310_002  # workers.sender's advisory lock namespace
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Chain:
    """TraceToken on anvil; the signing key (dev account 1) is the treasury and holds MINTED."""

    node: AnvilNode
    w3: Web3
    token: Contract
    signer: LocalAccount
    deployment: Deployment
    mint_tx: str

    @property
    def chain_id(self) -> int:
        return self.deployment.chain_id

    def balance_of(self, address: str) -> int:
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(address)).call())

    def signer_nonce(self) -> int:
        return int(self.w3.eth.get_transaction_count(self.signer.address, "latest"))

    def transfers_from_signer(self) -> Counter[tuple[str, int]]:
        """(recipient, amount) of every token Transfer out of the signer's address, as mined."""
        sender_topic = "0x" + bytes(12).hex() + self.signer.address[2:].lower()
        logs = self.w3.eth.get_logs(
            {
                "fromBlock": self.deployment.start_block,
                "toBlock": "latest",
                "address": self.token.address,
                "topics": ["0x" + TRANSFER_TOPIC.hex(), sender_topic],
            }
        )
        return Counter(
            ("0x" + bytes(log["topics"][2])[-20:].hex(), int.from_bytes(log["data"])) for log in logs
        )


def _transact(w3: Web3, account: LocalAccount, built: dict[str, Any]) -> Any:
    signed = account.sign_transaction(built)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))
    assert receipt["status"] == 1
    return receipt


def _params(w3: Web3, account: LocalAccount) -> dict[str, Any]:
    return {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address)}


@pytest.fixture(scope="module")
def chain(anvil: AnvilNode) -> Chain:
    """TraceToken deployed by dev account 0 with plain web3; dev account 1 signs the outbox."""
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    admin, signer, escrow, vault, fees = anvil.accounts[:5]
    artifact = load_artifact("TraceToken")
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    deployed = _transact(
        w3, admin, factory.constructor("Trace", "TRACE", admin.address).build_transaction(_params(w3, admin))
    )
    token = w3.eth.contract(address=deployed["contractAddress"], abi=artifact.abi)
    minter = token.functions.MINTER_ROLE().call()
    _transact(
        w3, admin, token.functions.grantRole(minter, admin.address).build_transaction(_params(w3, admin))
    )
    minted = _transact(
        w3, admin, token.functions.mint(signer.address, MINTED).build_transaction(_params(w3, admin))
    )
    deployment = Deployment(
        chain_id=anvil.chain_id,
        start_block=int(deployed["blockNumber"]),
        token=str(token.address),
        escrow=escrow.address,
        vault=vault.address,
        treasury=signer.address,
        fee_wallet=fees.address,
    )
    return Chain(anvil, w3, token, signer, deployment, hex32(minted["transactionHash"]))


def _recipient(tag: str, index: int) -> str:
    """A fresh address that holds nothing: each test's recipients are its own."""
    return Web3.to_checksum_address(keccak(text=f"recipient:{tag}:{index}")[-20:])


@dataclass
class Books:
    """One test's database (ledger chart funded, outbox empty) next to the shared chain."""

    engine: sa.Engine
    chain: Chain
    url: str

    def action(self, key: str, recipient: str, amount: int, *, gas_limit: int = GAS) -> ChainAction:
        data = self.chain.token.functions.transfer(recipient, amount)._encode_transaction_data()
        return ChainAction(
            key=key,
            chain_id=self.chain.chain_id,
            signer=self.chain.signer.address,
            action="token.transfer",
            to_address=str(self.chain.token.address),
            data=bytes.fromhex(data[2:]),
            gas_limit=gas_limit,
            metadata={"recipient": recipient.lower(), "amount": str(amount)},
        )

    def hold(self, key: str, amount: int, account: str = PAYABLE) -> NewEntry:
        return NewEntry(
            key=f"hold:{key}",
            legs=(Leg(account, custody.clearing_code(self.chain.chain_id), amount, "TRACE", pending=True),),
        )

    def enqueue(self, action: ChainAction, holds: Sequence[NewEntry]) -> tuple[outbox.OutboxRow, str]:
        with self.engine.begin() as conn:
            return outbox.enqueue(conn, action, holds)

    def sender(
        self, *, confirmations: int = 1, bump_after_s: float = 3600, max_in_flight: int = 64
    ) -> Sender:
        return Sender(
            self.engine,
            self.chain.w3,
            self.chain.signer,
            self.chain.chain_id,
            confirmations=confirmations,
            bump_after_s=bump_after_s,
            max_in_flight=max_in_flight,
        )

    def settle_all(self, sender: Sender, max_passes: int = 20) -> list[SenderReport]:
        """Run passes, mining a block after each, until no row is open."""
        reports = []
        for _ in range(max_passes):
            reports.append(sender.run_once())
            if not self.open_rows():
                return reports
            self.chain.node.mine(1)
        raise AssertionError(f"rows still open after {max_passes} passes: {self.open_rows()[:5]}")

    def rows(self) -> Sequence[Any]:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT id, key, status, nonce, tx_hash, hold_keys, error FROM chain_outbox ORDER BY id"
                )
            ).all()

    def open_rows(self) -> list[Any]:
        return [r for r in self.rows() if r.status not in ("confirmed", "failed")]

    def attempts(self) -> Sequence[Any]:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT outbox_id, nonce, tx_hash, max_fee_per_gas, max_priority_fee_per_gas,"
                    " broadcast_at FROM chain_tx_attempts ORDER BY id"
                )
            ).all()

    def mined_by_nonce(self) -> dict[int, list[str]]:
        """For every nonce the outbox used, the hashes of its attempts the chain holds."""
        mined: dict[int, list[str]] = {}
        for attempt in self.attempts():
            mined.setdefault(int(attempt.nonce), [])
            try:
                receipt = self.chain.w3.eth.get_transaction_receipt(attempt.tx_hash)
            except TransactionNotFound:
                continue
            assert hex32(receipt["transactionHash"]) == attempt.tx_hash
            mined[int(attempt.nonce)].append(attempt.tx_hash)
        return mined

    def account(self, code: str) -> Any:
        with self.engine.connect() as conn:
            return get_account(conn, code)

    def entry_keys(self, prefix: str) -> set[str]:
        with self.engine.connect() as conn:
            return set(
                conn.execute(
                    sa.text("SELECT idempotency_key FROM ledger_entries WHERE idempotency_key LIKE :p"),
                    {"p": prefix + "%"},
                ).scalars()
            )

    def exceptions(self, kind: str) -> Sequence[Any]:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT key, tx_hash, details FROM finance_exceptions WHERE kind = :k ORDER BY id"),
                {"k": kind},
            ).all()

    def sender_lock_held(self) -> bool:
        with self.engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND classid = :c AND database = (SELECT oid FROM pg_database"
                        " WHERE datname = current_database())"
                    ),
                    {"c": SENDER_LOCK_CLASS},
                ).scalar_one()
            )


@pytest.fixture
def books(chain: Chain, fresh_db_url: str) -> Iterator[Books]:
    """A fresh database with the custody chart and ``test:payable`` funded with BUDGET; the chain
    goes back to the state after the module's deployment when the test ends."""
    snapshot = chain.node.snapshot()
    engine = db.make_engine(fresh_db_url, role=APP_ROLE, pool_size=4)
    with engine.begin() as conn:
        custody.ensure_chart(conn, chain.chain_id, chain.deployment.custody)
        create_account(conn, BUDGET_ACCOUNT, "TRACE", "equity")
        create_account(conn, PAYABLE, "TRACE", "liability", flags=["debits_must_not_exceed_credits"])
        [funded] = post_batch(
            conn, [NewEntry(key="test:fund", legs=(Leg(BUDGET_ACCOUNT, PAYABLE, BUDGET, "TRACE"),))]
        )
        assert funded.status == "created"
    try:
        yield Books(engine, chain, fresh_db_url)
    finally:
        engine.dispose()
        chain.node.set_automine(True)
        chain.node.revert(snapshot)


def _enqueue_transfers(b: Books, tag: str, count: int) -> dict[str, int]:
    """``count`` transfers to fresh recipients, each with its hold; returns recipient -> amount."""
    expected: dict[str, int] = {}
    for i in range(count):
        recipient, amount = _recipient(tag, i), (i + 1) * TRACE + i
        _, created = b.enqueue(b.action(f"{tag}:{i}", recipient, amount), [b.hold(f"{tag}:{i}", amount)])
        assert created == "created"
        expected[recipient.lower()] = amount
    return expected


def _assert_sent_exactly_once(b: Books, expected: Mapping[str, int], nonce_before: int) -> None:
    """Every row confirmed on its own nonce, every transfer mined once, every hold posted."""
    c = b.chain
    rows = b.rows()
    assert len(rows) == len(expected)
    assert {r.status for r in rows} == {"confirmed"}
    assert sorted(r.nonce for r in rows) == list(range(nonce_before, nonce_before + len(rows)))
    assert c.signer_nonce() == nonce_before + len(rows)
    for recipient, amount in expected.items():
        assert c.balance_of(recipient) == amount, recipient
    assert c.transfers_from_signer() == Counter(expected.items())
    # Only one signed version per nonce is on chain, and it is the one the row settled on.
    mined = b.mined_by_nonce()
    assert {nonce: len(hashes) for nonce, hashes in mined.items()} == {r.nonce: 1 for r in rows}
    assert {r.nonce: r.tx_hash for r in rows} == {nonce: hashes[0] for nonce, hashes in mined.items()}
    attempts_by_row: dict[int, set[int]] = {}
    for attempt in b.attempts():
        attempts_by_row.setdefault(attempt.outbox_id, set()).add(int(attempt.nonce))
    assert attempts_by_row == {r.id: {r.nonce} for r in rows}
    # Every hold posted: a resolution per hold, nothing pending anywhere.
    hold_keys = {k for r in rows for k in r.hold_keys}
    assert b.entry_keys("settle:hold:") == {f"settle:{k}" for k in hold_keys}
    for code in (PAYABLE, custody.clearing_code(c.chain_id)):
        account = b.account(code)
        assert (account.debits_pending, account.credits_pending) == (0, 0), code
    assert b.account(PAYABLE).balance == BUDGET - sum(expected.values())
    assert b.account(custody.clearing_code(c.chain_id)).credits_posted == sum(expected.values())


def test_queued_transfers_are_sent_once_each_and_the_mirrors_follow(books: Books) -> None:
    b, c = books, books.chain
    nonce_before = c.signer_nonce()
    expected = _enqueue_transfers(b, "happy", 30)
    treasury_before = c.balance_of(c.signer.address)
    reports = b.settle_all(b.sender(confirmations=1))
    assert sum(r.signed for r in reports) == 30
    assert sum(r.confirmed for r in reports) == 30
    assert sum(r.failed + r.bumped for r in reports) == 0
    _assert_sent_exactly_once(b, expected, nonce_before)
    assert c.balance_of(c.signer.address) == treasury_before - sum(expected.values())
    # A pass with nothing to do changes nothing.
    idle = b.sender(confirmations=1).run_once()
    assert (idle.signed, idle.broadcast, idle.confirmed, idle.in_flight) == (0, 0, 0, 0)

    indexer = Indexer(
        b.engine, ChainClient(c.w3), c.deployment, LogDecoder(), confirmations=1, window_max=1000
    )
    report = indexer.run_once()
    assert report.handled_block == c.node.block_number() - 1
    treasury = b.account(custody.mirror_code(c.chain_id, c.signer.address))
    assert treasury.balance == c.balance_of(c.signer.address)
    clearing = b.account(custody.clearing_code(c.chain_id))
    assert clearing.balance == 0
    assert clearing.debits_posted == clearing.credits_posted == sum(expected.values())
    # Our own transfers are explained by the outbox; only the mint into the treasury is not.
    unexplained = b.exceptions("unexplained_transfer")
    assert [row.tx_hash for row in unexplained] == [c.mint_tx]
    assert_books_balance(b.engine)


def test_two_concurrent_enqueues_of_one_action_book_it_once(books: Books) -> None:
    b = books
    action = b.action("race:0", _recipient("race", 0), 3 * TRACE)
    outcome: dict[str, Any] = {}

    def second() -> None:
        try:
            outcome["second"] = b.enqueue(action, [b.hold("race:0", 3 * TRACE)])
        except Exception as exc:
            outcome["error"] = exc

    with b.engine.connect() as conn:
        transaction = conn.begin()
        first, created = outbox.enqueue(conn, action, [b.hold("race:0", 3 * TRACE)])
        thread = threading.Thread(target=second)
        thread.start()
        # The second waits on the outbox key the first has not committed yet.
        wait_for_lock_waiters(b.url, 1)
        transaction.commit()
    thread.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert created == "created"
    assert outcome["second"] == (first, "exists")
    assert [r.key for r in b.rows()] == ["race:0"]
    assert b.account(PAYABLE).debits_pending == 3 * TRACE
    assert b.entry_keys("hold:") == {"hold:race:0"}


def test_enqueue_is_idempotent_and_refuses_what_the_ledger_refuses(books: Books) -> None:
    b = books
    recipient = _recipient("idem", 0)
    action = b.action("idem:0", recipient, 5 * TRACE)
    first, created = b.enqueue(action, [b.hold("idem:0", 5 * TRACE)])
    again, exists = b.enqueue(action, [b.hold("idem:0", 5 * TRACE)])
    assert (created, exists) == ("created", "exists")
    assert again == first
    with pytest.raises(Conflict) as conflict:
        b.enqueue(b.action("idem:0", recipient, 6 * TRACE), [b.hold("idem:0", 5 * TRACE)])
    assert conflict.value.code == "idempotency_conflict"
    with pytest.raises(Conflict):
        b.enqueue(action, [b.hold("idem:other", 5 * TRACE)])
    # The hold was booked once, with the first enqueue.
    assert b.account(PAYABLE).debits_pending == 5 * TRACE
    # Another action cannot lean on that hold: one reservation must not pay for two transfers.
    with pytest.raises(Conflict) as shared:
        b.enqueue(b.action("idem:1", _recipient("idem", 1), 5 * TRACE), [b.hold("idem:0", 5 * TRACE)])
    assert shared.value.code == "hold_exists"

    # A hold beyond what the payable account has left: the action is refused and nothing is written.
    too_much = BUDGET - 5 * TRACE + 1
    with pytest.raises(LedgerError) as refused:
        b.enqueue(b.action("idem:big", recipient, too_much), [b.hold("idem:big", too_much)])
    assert refused.value.code == "exceeds_credits"
    assert [r.key for r in b.rows()] == ["idem:0"]
    assert b.account(PAYABLE).debits_pending == 5 * TRACE
    assert b.entry_keys("hold:") == {"hold:idem:0"}

    # A hold must be one pending transfer.
    posted = NewEntry(
        key="hold:idem:posted",
        legs=(Leg(PAYABLE, custody.clearing_code(b.chain.chain_id), TRACE, "TRACE"),),
    )
    with pytest.raises(InvalidInput):
        b.enqueue(b.action("idem:posted", recipient, TRACE), [posted])
    with pytest.raises(InvalidInput):
        b.enqueue(
            b.action("idem:twice", recipient, TRACE), [b.hold("idem:t", TRACE), b.hold("idem:t", TRACE)]
        )
    # A hold that could time out before the transaction confirms could then not be posted.
    timed = NewEntry(
        key="hold:idem:timed",
        legs=(
            Leg(PAYABLE, custody.clearing_code(b.chain.chain_id), TRACE, "TRACE", pending=True, timeout_s=60),
        ),
    )
    with pytest.raises(InvalidInput):
        b.enqueue(b.action("idem:timed", recipient, TRACE), [timed])

    base = b.action("idem:bad", recipient, TRACE)
    bad_inputs: list[dict[str, Any]] = [
        {"value": -1},
        {"to_address": "0x1234"},
        {"signer": "not an address"},
        {"gas_limit": 20_999},
        {"gas_limit": 30_000_001},
        {"data": "0xa9059cbb"},
        {"chain_id": 0},
        {"action": "Token Transfer"},
        {"metadata": {"amount": 1.5}},
    ]
    for change in bad_inputs:
        fields = {
            name: getattr(base, name)
            for name in ("key", "chain_id", "signer", "action", "to_address", "data", "gas_limit", "value")
        }
        with pytest.raises(InvalidInput):
            ChainAction(**{**fields, **change})
    assert [r.key for r in b.rows()] == ["idem:0"]


def test_a_reverted_transaction_fails_its_row_voids_its_hold_and_the_next_rows_go_through(
    books: Books,
) -> None:
    b, c = books, books.chain
    nonce_before = c.signer_nonce()
    first, last = _recipient("revert", 0), _recipient("revert", 2)
    b.enqueue(b.action("revert:0", first, 3 * TRACE), [b.hold("revert:0", 3 * TRACE)])
    # More than the treasury holds: the token reverts once mined.
    beyond = c.balance_of(c.signer.address) + 1
    b.enqueue(b.action("revert:1", _recipient("revert", 1), beyond), [b.hold("revert:1", 7 * TRACE)])
    b.enqueue(b.action("revert:2", last, 4 * TRACE), [b.hold("revert:2", 4 * TRACE)])
    reports = b.settle_all(b.sender(confirmations=1))
    assert sum(r.confirmed for r in reports) == 2
    assert sum(r.failed for r in reports) == 1

    rows = {r.key: r for r in b.rows()}
    assert {k: r.status for k, r in rows.items()} == {
        "revert:0": "confirmed",
        "revert:1": "failed",
        "revert:2": "confirmed",
    }
    assert [rows[k].nonce for k in ("revert:0", "revert:1", "revert:2")] == [
        nonce_before,
        nonce_before + 1,
        nonce_before + 2,
    ]
    assert "reverted" in rows["revert:1"].error
    assert c.w3.eth.get_transaction_receipt(rows["revert:1"].tx_hash)["status"] == 0
    assert c.signer_nonce() == nonce_before + 3
    assert (c.balance_of(first), c.balance_of(last)) == (3 * TRACE, 4 * TRACE)
    assert c.balance_of(_recipient("revert", 1)) == 0

    # The failed row's hold is voided (released back to the payable), the others are posted.
    with b.engine.connect() as conn:
        kinds: dict[str, str] = dict(
            conn.execute(
                sa.text(
                    "SELECT e.idempotency_key, t.kind FROM ledger_entries e"
                    " JOIN ledger_transfers t ON t.entry_id = e.id WHERE e.idempotency_key LIKE 'settle:%'"
                )
            ).all()
        )
    assert kinds == {
        "settle:hold:revert:0": "post_pending",
        "settle:hold:revert:1": "void_pending",
        "settle:hold:revert:2": "post_pending",
    }
    payable = b.account(PAYABLE)
    assert (payable.debits_pending, payable.credits_pending) == (0, 0)
    assert payable.balance == BUDGET - 7 * TRACE
    failed = b.exceptions("chain_action_failed")
    assert [row.key for row in failed] == ["outbox_failed:revert:1"]
    assert failed[0].details["holds_voided"] == ["hold:revert:1"]
    assert_books_balance(b.engine)


def test_a_stuck_transaction_is_replaced_with_higher_fees_and_lands_once(books: Books) -> None:
    b, c = books, books.chain
    nonce_before = c.signer_nonce()
    recipient, amount = _recipient("bump", 0), 9 * TRACE
    b.enqueue(b.action("bump:0", recipient, amount), [b.hold("bump:0", amount)])
    c.node.set_automine(False)
    sent = b.sender(confirmations=1).run_once()
    assert (sent.signed, sent.broadcast, sent.bumped, sent.confirmed) == (1, 1, 0, 0)
    bumped = b.sender(confirmations=1, bump_after_s=0).run_once()
    assert (bumped.signed, bumped.bumped, bumped.confirmed) == (0, 1, 0)

    original, replacement = b.attempts()
    assert original.nonce == replacement.nonce == nonce_before
    assert original.outbox_id == replacement.outbox_id
    assert replacement.max_fee_per_gas > original.max_fee_per_gas
    assert replacement.max_priority_fee_per_gas > original.max_priority_fee_per_gas
    assert replacement.broadcast_at is not None

    c.node.mine(1)
    mined = b.mined_by_nonce()
    assert mined == {nonce_before: [replacement.tx_hash]}
    with pytest.raises(TransactionNotFound):
        c.w3.eth.get_transaction_receipt(original.tx_hash)
    b.settle_all(b.sender(confirmations=1))
    [row] = b.rows()
    assert (row.status, row.tx_hash) == ("confirmed", replacement.tx_hash)
    assert c.balance_of(recipient) == amount
    assert c.transfers_from_signer() == Counter({(recipient.lower(), amount): 1})
    assert c.signer_nonce() == nonce_before + 1
    assert b.entry_keys("settle:") == {"settle:hold:bump:0"}


def test_a_transaction_the_node_refuses_for_a_low_fee_is_replaced_not_retried_forever(books: Books) -> None:
    b, c = books, books.chain
    nonce_before = c.signer_nonce()
    recipient, amount = _recipient("basefee", 0), 2 * TRACE
    b.enqueue(b.action("basefee:0", recipient, amount), [b.hold("basefee:0", amount)])
    # The base fee jumps between the block the sender priced from and the one it sends into:
    # the node refuses the signed transaction outright ("max fee per gas less than block base fee").
    base_fee = int(c.w3.eth.get_block("latest")["baseFeePerGas"])
    c.node.rpc("anvil_setNextBlockBaseFeePerGas", [hex(50 * base_fee)])
    first = b.sender(confirmations=1, bump_after_s=3600).run_once()
    assert (first.signed, first.broadcast) == (1, 1)
    assert c.w3.eth.get_transaction_count(c.signer.address, "pending") == nonce_before
    c.node.mine(1)
    # The stored transaction can never land; a fee bump replaces it with the same nonce.
    reports = b.settle_all(b.sender(confirmations=1, bump_after_s=0))
    assert sum(r.bumped for r in reports) >= 1
    [row] = b.rows()
    assert row.status == "confirmed"
    assert c.balance_of(recipient) == amount
    assert c.signer_nonce() == nonce_before + 1
    assert b.mined_by_nonce() == {nonce_before: [row.tx_hash]}
    assert row.tx_hash != b.attempts()[0].tx_hash


class _Died(BaseException):
    """The sender's process dying: nothing after this point runs, uncommitted work is lost."""


class _DyingProvider(HTTPProvider):
    """The real node, but the caller dies right after its ``die_after``-th request was answered
    (the node has done it; the sender never learns the answer)."""

    def __init__(self, url: str, die_after: int) -> None:
        super().__init__(url)
        self.die_after = die_after
        self.calls = 0

    def make_request(self, method: Any, params: Any) -> Any:
        response = super().make_request(method, params)
        self.calls += 1
        if self.calls == self.die_after:
            raise _Died(str(method))
        return response


def test_a_sender_dying_after_any_request_resumes_without_double_sends_or_gaps(books: Books) -> None:
    """A deterministic complement of the SIGKILL test below: lives that die after the 1st, 2nd,
    ... request of their run walk the crash point over every step of the sending cycle."""
    b, c = books, books.chain
    nonce_before = c.signer_nonce()
    expected = _enqueue_transfers(b, "dying", 20)
    died_at: Counter[str] = Counter()
    for life in range(300):
        if not b.open_rows():
            break
        # A pass of three rows makes about 13 requests: every death point recurs within it.
        provider = _DyingProvider(c.node.url, die_after=(5 * life) % 14 + 1)
        sender = Sender(
            b.engine,
            Web3(provider),
            c.signer,
            c.chain_id,
            confirmations=1,
            bump_after_s=3600,
            max_in_flight=3,
        )
        try:
            sender.run_once()
            sender.run_once()
        except _Died as death:
            died_at[str(death)] += 1
        c.node.mine(1)
    b.settle_all(b.sender(confirmations=1, max_in_flight=3))
    # Deaths fell on every kind of step, including right after the node took a transaction.
    assert {
        "eth_chainId",
        "eth_getBlockByNumber",
        "eth_getTransactionCount",
        "eth_sendRawTransaction",
        "eth_blockNumber",
        "eth_getTransactionReceipt",
    } <= set(died_at), died_at
    _assert_sent_exactly_once(b, expected, nonce_before)
    assert_books_balance(b.engine)


def _start_sender(env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(BIN / "tracechain"), "send"], env=dict(env), stdout=out, stderr=subprocess.STDOUT
        )


def test_a_sender_killed_at_random_points_sends_every_action_exactly_once(
    books: Books, tmp_path: Path
) -> None:
    b, c = books, books.chain
    nonce_before = c.signer_nonce()
    expected = _enqueue_transfers(b, "crash", 60)
    deployment_file = tmp_path / "deployment.json"
    c.deployment.save(deployment_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | {
        "TRACE_DATABASE_URL": b.url,
        "TRACE_RPC_URL": c.node.url,
        "TRACE_SIGNER_KEY": c.node.private_keys[1],
        "TRACE_DEPLOYMENT_FILE": str(deployment_file),
        "TRACE_DATA_DIR": str(tmp_path),
        "TRACE_CONFIRMATIONS": "1",
        "TRACE_SENDER_INTERVAL_S": "0.02",
        "TRACE_SENDER_BUMP_AFTER_S": "3600",
        # Small passes, so that kills land between signing, broadcasting and settling.
        "TRACE_SENDER_MAX_IN_FLIGHT": "8",
        "TRACE_LOG_LEVEL": "WARNING",
    }
    log = tmp_path / "send.log"
    rng = random.Random(20_611)
    seen: list[Counter[str]] = []
    for _ in range(8):
        process = _start_sender(env, log)
        try:
            # Count the delay from the first pass, not from the interpreter's start-up.
            for _ in range(2000):
                if b.sender_lock_held() or process.poll() is not None:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        seen.append(Counter(r.status for r in b.rows()))

    process = _start_sender(env, log)
    try:
        for _ in range(600):
            if not b.open_rows():
                break
            assert process.poll() is None, log.read_text()[-3000:]
            c.node.mine(1)  # confirmations=1: the last transactions need a block on top
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert not b.open_rows(), seen

    _assert_sent_exactly_once(b, expected, nonce_before)
    assert len(b.attempts()) >= len(expected)
    assert b.exceptions("chain_action_failed") == []
    assert_books_balance(b.engine)
