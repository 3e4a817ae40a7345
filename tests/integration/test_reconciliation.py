"""Reconciliation against py-evm in process and a real PostgreSQL: clean books reconcile with no
break; each class of break (chain-only, ledger-only, mismatched, unseen chain action, mint and
balance drift) is found, stored with its run and raised once as an exception; runs are evidence
nobody can edit; bad ranges are refused and write nothing."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract

from contracts.bindings import MINTER_ROLE
from contracts.client import ChainClient
from contracts.deployment import Deployment
from contracts.events import LogDecoder
from ledger import custody, db, reconciliation
from ledger.commands import ChainRef, Leg, NewEntry
from ledger.engine import post_batch
from ledger.errors import InvalidInput, NotFound
from tests.conftest import APP_ROLE, Databases
from workers import reconcile as recon_worker
from workers.indexer import Indexer

CONFIRMATIONS = 2
TRACE = 10**18


@dataclass
class World:
    w3: Web3
    token: Contract
    deployment: Deployment
    engine: sa.Engine
    owner: sa.Engine
    admin: str
    users: list[str]

    def send(self, sender: str, recipient: str, amount: int) -> str:
        tx = self.token.functions.transfer(Web3.to_checksum_address(recipient), amount).transact(
            {"from": sender}
        )
        return "0x" + bytes(tx).hex()

    def index(self) -> None:
        self.w3.testing.mine(CONFIRMATIONS)
        Indexer(
            self.engine,
            ChainClient(self.w3),
            self.deployment,
            LogDecoder(),
            confirmations=CONFIRMATIONS,
            window_max=50,
        ).run_once()

    def reconcile(self, **kwargs: Any) -> reconciliation.RunReport:
        return recon_worker.reconcile(self.engine, self.w3, self.deployment, **kwargs)

    def count(self, table: str) -> int:
        with self.owner.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())

    def exceptions(self, prefix: str) -> list[Any]:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT key, kind, details FROM finance_exceptions WHERE key LIKE :p ORDER BY id"),
                {"p": prefix + "%"},
            ).all()


@pytest.fixture
def world(databases: Databases, template_db: str) -> Iterator[World]:
    name = databases.create(template=template_db)
    url = databases.url(name)
    w3 = Web3(EthereumTesterProvider())
    accounts = list(w3.eth.accounts)
    admin = accounts[0]
    from contracts.artifacts import load_artifact

    artifact = load_artifact("TraceToken")
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    receipt = w3.eth.wait_for_transaction_receipt(
        factory.constructor("Trace", "TRACE", admin).transact({"from": admin})
    )
    token = w3.eth.contract(address=receipt["contractAddress"], abi=artifact.abi)
    token.functions.grantRole(MINTER_ROLE, admin).transact({"from": admin})
    users = accounts[1:5]
    for user in users:
        token.functions.mint(user, 1_000 * TRACE).transact({"from": admin})
    # The books follow the chain from here: the users' opening mints came before.
    deployment = Deployment(
        chain_id=int(w3.eth.chain_id),
        start_block=int(w3.eth.block_number) + 1,
        token=str(token.address),
        escrow=accounts[5],
        vault=accounts[6],
        treasury=accounts[7],
        fee_wallet=accounts[8],
    )
    engine = db.make_engine(url, role=APP_ROLE, pool_size=2)
    owner = db.make_engine(url, role=None, pool_size=1)
    yield World(w3, token, deployment, engine, owner, admin, users)
    engine.dispose()
    owner.dispose()
    databases.drop(name)


def _traffic(w: World) -> None:
    d = w.deployment
    w.send(w.users[0], d.escrow, 5 * TRACE)
    w.send(w.users[1], d.treasury, 70 * TRACE)
    w.send(Web3.to_checksum_address(d.treasury), d.fee_wallet, 3 * TRACE)
    w.send(Web3.to_checksum_address(d.treasury), w.users[2], 4 * TRACE)
    w.send(w.users[2], w.users[3], 1 * TRACE)  # outside custody: not the books' business
    w.index()


def test_books_that_follow_the_chain_reconcile_without_a_break(world: World) -> None:
    _traffic(world)
    report = world.reconcile()
    assert report.ok, report.as_dict()["breaks"]
    assert report.counts == {"matched": 4, "chain_only": 0, "ledger_only": 0, "mismatched": 0}
    assert report.scope.from_block == world.deployment.start_block
    assert report.balances[world.deployment.treasury].chain == 63 * TRACE
    assert all(b.drift == 0 for b in report.balances.values())
    assert report.minted.drift == 0
    stored = _run(world, report.id)
    assert stored["ok"] is True
    assert stored["counts"]["matched"] == 4
    assert stored["breaks"] == []
    assert world.exceptions("recon:") == []


def _run(w: World, run_id: int | None = None) -> dict[str, Any]:
    with w.engine.connect() as conn:
        return reconciliation.get_run(conn, run_id)


def _book(w: World, key: str, leg: Leg, chain: ChainRef, metadata: dict[str, str], kind: str) -> None:
    with w.engine.begin() as conn:
        (result,) = post_batch(conn, [NewEntry(key, (leg,), kind=kind, metadata=metadata, chain=chain)])
        assert result.status == "created", result


def _chain_event(w: World, tx_hash: str, block: int, sender: str, recipient: str, amount: int) -> None:
    """A stored, handled Transfer log the books never booked (the owner writes what a lost
    booking would leave behind)."""
    block_hash = w.w3.eth.get_block(block)["hash"].to_0x_hex()
    with w.owner.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO chain_events (chain_id, block_number, block_hash, tx_hash, log_index, contract,"
                " event, args, handled_at) VALUES (:c, :b, :bh, :tx, 7, :token, 'Transfer',"
                " CAST(:args AS jsonb), now())"
            ),
            {
                "c": w.deployment.chain_id,
                "b": block,
                "bh": block_hash,
                "tx": tx_hash,
                "token": w.deployment.token,
                "args": f'{{"from": "{sender}", "to": "{recipient}", "value": "{amount}"}}',
            },
        )


def _sent_action(w: World, key: str, tx_hash: str) -> None:
    """An outbox row the sender has broadcast, whose transaction has not been seen landing."""
    with w.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO chain_outbox (key, chain_id, signer, action, to_address, data, gas_limit,"
                " status, nonce, tx_hash)"
                " VALUES (:k, :c, :s, 'test.payout', :t, '\\x00', 50000, 'sent', 0, :tx)"
            ),
            {
                "k": key,
                "c": w.deployment.chain_id,
                "s": w.deployment.treasury,
                "t": w.deployment.token,
                "tx": tx_hash,
            },
        )


def test_every_class_of_break_is_found_stored_and_raised_once(world: World) -> None:
    w, d = world, world.deployment
    cid = d.chain_id
    _traffic(w)
    head = int(w.w3.eth.block_number)
    block_hash = w.w3.eth.get_block(head)["hash"].to_0x_hex()
    user0 = w.users[0].lower()

    # Ledger-only: a custody booking for a transfer the chain never made.
    ghost = ChainRef(cid, "0x" + "ab" * 32, 0, head, block_hash)
    _book(
        w,
        custody.event_key(ghost),
        Leg(custody.mirror_code(cid, d.escrow), custody.suspense_code(cid), 9 * TRACE, custody.TOKEN_ASSET),
        ghost,
        {"from": user0, "to": d.escrow, "amount": str(9 * TRACE)},
        "chain.suspense",
    )
    # Mismatched: the books booked a real transfer with the wrong amount before the indexer saw it
    # (the indexer's own booking is then refused as an idempotency conflict).
    tx = w.send(w.users[3], d.vault, 20 * TRACE)
    receipt = w.w3.eth.get_transaction_receipt(tx)
    real = ChainRef(
        cid,
        tx,
        int(receipt["logs"][0]["logIndex"]),
        int(receipt["blockNumber"]),
        receipt["blockHash"].to_0x_hex(),
    )
    _book(
        w,
        custody.event_key(real),
        Leg(custody.mirror_code(cid, d.vault), custody.suspense_code(cid), 2 * TRACE, custody.TOKEN_ASSET),
        real,
        {"from": w.users[3].lower(), "to": d.vault, "amount": str(2 * TRACE)},
        "chain.suspense",
    )
    # A mint to a claimant the books know nothing of.
    mint_tx = w.token.functions.mint(w.users[1], 11 * TRACE).transact({"from": w.admin})
    w.index()
    # Chain-only: a stored, handled transfer into the fee wallet with no booking.
    _chain_event(w, "0x" + "cd" * 32, head, user0, d.fee_wallet, 6 * TRACE)
    # A chain action sent long ago and never seen landing.
    _sent_action(w, "stuck-payout", "0x" + "ef" * 32)

    report = w.reconcile(unseen_within_s=0.0)
    found = {(b.cls, b.details.get("scope")): b for b in report.breaks}
    assert report.counts["matched"] == 4
    assert report.counts["chain_only"] == 2  # the fee-wallet transfer and the unknown mint
    assert report.counts["ledger_only"] == 2  # the ghost booking and the unseen payout
    assert report.counts["mismatched"] == 1
    assert found[("ledger_only", "custody")].entry_key == custody.event_key(ghost)
    assert found[("ledger_only", "outbox")].entry_key == "stuck-payout"
    mismatch = found[("mismatched", "custody")]
    assert (mismatch.chain_amount, mismatch.ledger_amount) == (20 * TRACE, 2 * TRACE)
    assert found[("chain_only", "custody")].chain_amount == 6 * TRACE
    mint = found[("chain_only", "mint")]
    assert mint.tx_hash == "0x" + bytes(mint_tx).hex()
    assert mint.chain_amount == 11 * TRACE
    drifts = {b.address: b.details["drift"] for b in report.breaks if b.cls == "balance_drift"}
    # The escrow mirror holds the ghost 9 the chain never had; the vault mirror 2 of the real 20.
    assert drifts == {d.escrow: str(-9 * TRACE), d.vault: str(18 * TRACE)}
    assert report.minted.drift == 11 * TRACE
    assert not report.ok

    stored = _run(w, report.id)
    assert stored["ok"] is False
    assert stored["break_count"] == len(report.breaks) == 8
    assert {b["exception_key"] for b in stored["breaks"]} == {b.exception_key for b in report.breaks}
    raised = w.exceptions("recon:")
    assert len(raised) == 8
    assert report.exceptions_raised == 8

    # The same breaks found again are not raised twice; the second run is stored on its own.
    again = w.reconcile(unseen_within_s=0.0)
    assert again.id != report.id
    assert again.exceptions_raised == 0
    assert len(w.exceptions("recon:")) == 8
    assert w.count("recon_runs") == 2


def test_reports_as_csv_and_json(world: World) -> None:
    _traffic(world)
    world.token.functions.mint(world.users[1], 11 * TRACE).transact({"from": world.admin})
    world.index()
    report = world.reconcile()
    stored = _run(world)
    assert stored["run_id"] == report.id
    rows = list(csv.DictReader(io.StringIO(reconciliation.breaks_csv(stored["breaks"]))))
    assert [(r["class"], r["chain_amount"]) for r in rows] == [
        ("chain_only", str(11 * TRACE)),
        ("mint_drift", str(11 * TRACE)),
    ]
    summary = dict(csv.reader(io.StringIO(reconciliation.summary_csv(stored))))
    assert summary["matched"] == "4"
    assert summary["chain_only"] == "1"
    assert summary["drift:minted"] == str(11 * TRACE)
    listed = _list(world)
    assert [r["run_id"] for r in listed] == [report.id]


def _list(w: World, **kwargs: Any) -> list[dict[str, Any]]:
    with w.engine.connect() as conn:
        return reconciliation.list_runs(conn, **kwargs)


def test_proof_of_reserves_sets_liabilities_against_holdings(world: World) -> None:
    w, d = world, world.deployment
    _traffic(w)
    with w.engine.begin() as conn:
        # 5 TRACE the escrow contract holds are owed to an escrow's parties.
        from ledger.accounts import create_account

        create_account(conn, "escrow:recon-test", custody.TOKEN_ASSET, "liability")
        (result,) = post_batch(
            conn,
            [
                NewEntry(
                    "owe-escrow", (Leg(custody.suspense_code(d.chain_id), "escrow:recon-test", 5 * TRACE),)
                )
            ],
        )
        assert result.status == "created"
    statement = recon_worker.reserves(w.engine, w.w3, d)
    escrow = statement["addresses"][d.escrow]
    assert escrow == {
        "role": "escrow",
        "liabilities": str(5 * TRACE),
        "on_chain": str(5 * TRACE),
        "ledger_mirror": str(5 * TRACE),
        "cover": "0",
        "covered": True,
    }
    assert statement["solvent"] is True
    assert statement["addresses"][d.treasury]["on_chain"] == str(63 * TRACE)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"to_block": 10**9}, "beyond the last confirmed block"),
        ({"from_block": 10**9}, "is after to_block"),
        ({"from_block": -1}, "non-negative"),
    ],
)
def test_a_bad_range_is_refused_and_writes_nothing(
    world: World, kwargs: dict[str, Any], message: str
) -> None:
    _traffic(world)
    with pytest.raises(InvalidInput, match=message):
        world.reconcile(**kwargs)
    assert world.count("recon_runs") == 0
    assert world.exceptions("recon:") == []


def test_nothing_to_reconcile_before_the_indexer_ran(world: World) -> None:
    with pytest.raises(InvalidInput, match="has not handled any block"):
        world.reconcile()
    assert world.count("recon_runs") == 0


def test_unknown_runs_are_refused(world: World) -> None:
    with pytest.raises(NotFound, match="no reconciliation has run"):
        _run(world)
    _traffic(world)
    world.reconcile()
    with pytest.raises(NotFound, match="no reconciliation run 999"):
        _run(world, 999)
    with pytest.raises(InvalidInput):
        _run(world, 0)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE recon_runs SET ok = true",
        "DELETE FROM recon_runs",
        "UPDATE recon_breaks SET class = 'chain_only'",
        "DELETE FROM recon_breaks",
        "TRUNCATE recon_breaks",
        "TRUNCATE recon_runs CASCADE",
    ],
)
def test_runs_and_breaks_are_evidence_nobody_edits(world: World, sql: str) -> None:
    _traffic(world)
    world.token.functions.mint(world.users[1], 1 * TRACE).transact({"from": world.admin})
    world.index()
    world.reconcile()
    before = (world.count("recon_runs"), world.count("recon_breaks"))
    assert before == (1, 2)
    for engine in (world.engine, world.owner):
        with pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as conn:
            conn.execute(sa.text(sql))
        assert isinstance(caught.value.orig, psycopg.Error)
    assert (world.count("recon_runs"), world.count("recon_breaks")) == before


def test_a_run_row_whose_verdict_contradicts_its_counts_is_refused(world: World) -> None:
    with pytest.raises(sa.exc.IntegrityError), world.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO recon_runs (chain_id, from_block, to_block, trigger, requested_by,"
                " transfers_checked, matched, chain_only, ledger_only, mismatched, balance_breaks, balances,"
                " minted, started_at, finished_at, duration_ms, ok) VALUES (1, 0, 5, 'on_demand', 'x', 3, 2,"
                " 1, 0, 0, 0, '{}', '{}', now(), now(), 1, true)"
            )
        )
    assert world.count("recon_runs") == 0


def test_the_unseen_window_spares_a_recent_chain_action(world: World) -> None:
    _traffic(world)
    _sent_action(world, "fresh", "0x" + "ee" * 32)
    assert world.reconcile(unseen_within_s=3600.0).ok
    late = world.reconcile(unseen_within_s=0.0)
    assert [(b.cls, b.entry_key) for b in late.breaks] == [("ledger_only", "fresh")]
    assert timedelta(0) <= late.finished_at - late.started_at


def test_the_scheduled_run_covers_only_newly_handled_blocks(world: World) -> None:
    w = world
    assert recon_worker.scheduled(w.engine, w.w3, w.deployment) is None  # nothing handled yet
    _traffic(w)
    first = recon_worker.scheduled(w.engine, w.w3, w.deployment)
    assert first is not None
    assert (first.trigger, first.requested_by) == ("schedule", "beat")
    assert first.scope.from_block == w.deployment.start_block
    assert first.counts["matched"] == 4
    # No new block handled: no run.
    assert recon_worker.scheduled(w.engine, w.w3, w.deployment) is None
    w.send(w.users[0], w.deployment.vault, 2 * TRACE)
    w.index()
    second = recon_worker.scheduled(w.engine, w.w3, w.deployment)
    assert second is not None
    assert second.scope.from_block == first.scope.to_block + 1
    assert second.counts["matched"] == 1
    assert second.ok
    # An on-demand run in between does not move the scheduled window.
    w.reconcile()
    assert recon_worker.scheduled(w.engine, w.w3, w.deployment) is None
    assert w.count("recon_runs") == 3
