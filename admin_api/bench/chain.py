"""`tracechain bench indexer` and `tracechain bench sender`: the chain workers against a real node.

Both start their own anvil (npm ``@foundry-rs/anvil``, :mod:`contracts.anvil`) on a free port,
deploy the platform there with :func:`contracts.deploy.deploy_platform` (deployer: dev account 0,
platform signing key and treasury: dev account 1) and run the worker against a scratch database
on ``TRACE_DATABASE_URL``'s server or the embedded PostgreSQL, created and migrated for the run
and dropped at the end whatever happens, as ``tracechain bench ledger`` does.

* **indexer**: a ``TransferFanout`` test contract holding minted TRACE sends hundreds of
  transfers per transaction until the chain holds the wanted number of Transfer logs; one in
  ten goes into the escrow (a custody address), so the ledger booking path runs too. Only then
  does the clock start: ``Indexer.run_once`` (confirmations 0, the configured window) runs
  until it has stored and handled every block up to the head. ``logs_per_s`` is the events
  stored divided by that time.
* **sender**: anvil mines a block every ``block_time_s``, as a real chain does. ERC-20
  transfers from the treasury are enqueued in the outbox with their ledger holds; the clock
  runs while ``Sender.run_once`` passes (confirmations 1) sign, broadcast and settle them until
  every row is confirmed. The baseline, on the same node in the same run, sends a sample of
  transfers one by one: each signed, broadcast and its receipt awaited before the next.

Figures are checked before they are printed: the escrow's ledger mirror must equal its token
balance, every outbox row must be confirmed on its own consecutive nonce, the treasury must
have paid exactly the enqueued amounts, and the ledger check must find the books balanced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import click
import sqlalchemy as sa
from eth_abi import abi as eth_abi
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from rich.console import Console
from rich.table import Table
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint, TxParams

from admin_api.bench.ledger import (
    BenchError,
    BenchProgress,
    scratch_database,
    shielded_from_interrupts,
    terminate_as_interrupt,
)
from contracts.anvil import AnvilNode, dev_private_key, start_anvil
from contracts.bindings import contract_at, deploy, transact
from contracts.client import ChainClient, hex32
from contracts.deploy import deploy_platform
from contracts.deployment import Deployment
from contracts.events import LogDecoder
from ledger import custody, db, outbox
from ledger.accounts import create_account, get_account
from ledger.check import check_ledger
from ledger.commands import Leg, NewEntry
from ledger.engine import post_batch
from ledger.settings import Settings, load_settings
from workers.indexer import Indexer, RunReport
from workers.sender import PRIORITY_FEE_DEFAULT, Sender

TRACE = 10**18
TARGET_LOGS_PER_S = 5_000
TARGET_TX_PER_S = 200
TARGET_SENDER_RATIO = 10.0

ESCROW_EVERY = 10  # one fan-out transfer in ten goes into the escrow, a custody address
FANOUT_AMOUNT = 1_000  # base units per fan-out transfer
INDEXER_CONFIRMATIONS = 0
MAX_INDEXER_RUNS = 10_000

SENDER_CONFIRMATIONS = 1
BUDGET_ACCOUNT = "bench:chain:budget"
PAYABLE_ACCOUNT = "bench:chain:payable"
ENQUEUE_BATCH = 250  # outbox rows enqueued per database transaction (setup, not measured)
GAS_HEADROOM_PERCENT = 25
BASELINE_POLL_S = 0.05
RECEIPT_TIMEOUT_S = 120.0
SENDER_STALL_S = 120.0  # no row settled for this long: the run cannot finish
_TRANSFER_SELECTOR = keccak(text="transfer(address,uint256)")[:4]
_FANOUT_SELECTOR = keccak(text="fanout(address,address[],uint256)")[:4]


# --- plans -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexerPlan:
    name: str
    logs: int  # fan-out Transfer logs generated before the clock starts
    per_tx: int  # transfers per fan-out transaction


@dataclass(frozen=True)
class SenderPlan:
    name: str
    txs: int  # outbox rows sent by the sender
    sample: int  # transfers sent one by one for the baseline
    block_time_s: float
    max_in_flight: int
    pass_interval_s: float  # pause between two sender passes, as `tracechain send` has one


INDEXER_FULL = IndexerPlan("full", logs=50_000, per_tx=500)
INDEXER_QUICK = IndexerPlan("quick", logs=10_000, per_tx=500)
SENDER_FULL = SenderPlan(
    "full", txs=2_000, sample=10, block_time_s=1.0, max_in_flight=1_000, pass_interval_s=0.05
)
SENDER_QUICK = SenderPlan(
    "quick", txs=400, sample=5, block_time_s=1.0, max_in_flight=1_000, pass_interval_s=0.05
)


# --- shared set-up ---------------------------------------------------------------------------


@contextlib.contextmanager
def database_server(settings: Settings) -> Iterator[str]:
    """``TRACE_DATABASE_URL``'s server, else the embedded PostgreSQL (stopped afterwards if started)."""
    if settings.database_url is not None:
        yield settings.database_url
        return
    from admin_api.embedded import start_postgres

    service = start_postgres(settings.data_dir)
    try:
        yield service.url
    finally:
        with shielded_from_interrupts():
            service.stop()


@contextlib.contextmanager
def _anvil(block_time_s: float | None) -> Iterator[AnvilNode]:
    node = start_anvil(block_time_s=block_time_s)
    try:
        yield node
    finally:
        with shielded_from_interrupts():
            node.stop()


@dataclass(frozen=True)
class _Platform:
    w3: Web3
    deployer: LocalAccount
    signer: LocalAccount
    deployment: Deployment
    token: Contract


def _deploy(node: AnvilNode) -> _Platform:
    w3 = Web3(Web3.HTTPProvider(node.url, request_kwargs={"timeout": RECEIPT_TIMEOUT_S}))
    deployer: LocalAccount = Account.from_key(dev_private_key(0))
    signer: LocalAccount = Account.from_key(dev_private_key(1))
    fees: LocalAccount = Account.from_key(dev_private_key(2))
    deployment = deploy_platform(w3, deployer, signer=signer.address, fee_wallet=fees.address)
    token = contract_at(w3, "TraceToken", deployment.token)
    return _Platform(w3, deployer, signer, deployment, token)


def _recipient(tag: str, index: int) -> str:
    """A fresh address (lower-case hex) that holds nothing, distinct per tag and index."""
    return "0x" + keccak(text=f"bench:{tag}:{index}")[-20:].hex()


def _migrated_engine(url: str, role: str) -> sa.Engine:
    db.upgrade(url, role=role)
    return db.make_engine(url, role=role, pool_size=3)


def _ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline > 0 else 0.0


def _per_s(count: int, seconds: float) -> float:
    """A rate, 0 when nothing was timed."""
    return _ratio(count, seconds)


def _mark(ok: bool) -> str:
    return "[green]pass[/]" if ok else "[red]miss[/]"


def _quiet_loggers() -> None:
    # One line per HTTP request or migration step would bury the progress display.
    for noisy in ("httpx", "httpcore", "alembic", "urllib3", "web3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _database_name(url: str) -> str:
    return str(sa.engine.make_url(db.sqlalchemy_url(url)).database)


# --- indexer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexerReport:
    plan: IndexerPlan
    transfers: int
    escrow_transfers: int
    blocks: int
    generation_s: float
    seconds: float
    runs: int
    windows: int
    events_stored: int
    entries_booked: int
    exceptions_raised: int
    window_max: int
    mirror_ok: bool
    events_ok: bool
    duration_s: float
    scratch_database: str

    @property
    def logs_per_s(self) -> float:
        return _per_s(self.events_stored, self.seconds)

    def targets(self) -> dict[str, bool]:
        return {"logs_per_s": self.logs_per_s >= TARGET_LOGS_PER_S}

    def as_dict(self) -> dict[str, Any]:
        return {
            "logs_per_s": round(self.logs_per_s, 1),
            "events_stored": self.events_stored,
            "entries_booked": self.entries_booked,
            "seconds": round(self.seconds, 3),
            "blocks": self.blocks,
            "transfers": self.transfers,
            "escrow_transfers": self.escrow_transfers,
            "exceptions_raised": self.exceptions_raised,
            "runs": self.runs,
            "windows": self.windows,
            "window_max": self.window_max,
            "confirmations": INDEXER_CONFIRMATIONS,
            "per_tx": self.plan.per_tx,
            "generation_s": round(self.generation_s, 3),
            "mirror_ok": self.mirror_ok,
            "events_ok": self.events_ok,
            "target_logs_per_s": TARGET_LOGS_PER_S,
            "targets_met": self.targets(),
            "mode": self.plan.name,
            "duration_s": round(self.duration_s, 3),
            "scratch_database": self.scratch_database,
        }


def _generate_transfers(platform: _Platform, plan: IndexerPlan, progress: BenchProgress) -> tuple[int, int]:
    """Mint to a fan-out contract and fan ``plan.logs`` transfers out; returns (transfers, to escrow)."""
    w3, deployer, token = platform.w3, platform.deployer, platform.token
    fanout = deploy(w3, "test/TransferFanout", sender=deployer)
    transact(w3, token.functions.mint(fanout.address, plan.logs * FANOUT_AMOUNT), platform.signer)
    escrow = platform.deployment.escrow
    recipients = [
        escrow if i % ESCROW_EVERY == ESCROW_EVERY - 1 else _recipient("fanout", i) for i in range(plan.logs)
    ]
    batches = [recipients[i : i + plan.per_tx] for i in range(0, len(recipients), plan.per_tx)]
    task = progress.task(f"Fanning out {plan.logs:,} transfers ({plan.per_tx} a transaction)", len(batches))
    # Calldata, gas and signature are made here rather than through web3's contract layer, which
    # validates and checksums every address of every call: ten times slower than the node itself.
    nonce = int(w3.eth.get_transaction_count(deployer.address, "pending"))
    max_fee = 4 * int(w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0) + PRIORITY_FEE_DEFAULT
    hashes = []
    for number, batch in enumerate(batches):
        data = _FANOUT_SELECTOR + eth_abi.encode(
            ["address", "address[]", "uint256"], [platform.deployment.token, batch, FANOUT_AMOUNT]
        )
        call: TxParams = {"from": deployer.address, "to": fanout.address, "data": data}
        # anvil mines each transaction as it arrives (automine): each estimate meets the state its
        # transaction will.
        gas = int(w3.eth.estimate_gas(call))
        signed = deployer.sign_transaction(
            {
                "type": 2,
                "chainId": platform.deployment.chain_id,
                "nonce": nonce + number,
                "to": fanout.address,
                "data": data,
                "value": 0,
                "gas": gas + gas * GAS_HEADROOM_PERCENT // 100,
                "maxFeePerGas": max_fee,
                "maxPriorityFeePerGas": PRIORITY_FEE_DEFAULT,
            }
        )
        hashes.append(hex32(w3.eth.send_raw_transaction(signed.raw_transaction)))
        progress.update(task, number + 1, f"{(number + 1) * plan.per_tx:,} logs")
    for tx_hash in hashes:
        if _receipt_status(w3, tx_hash) != 1:
            raise BenchError(f"fan-out transaction {tx_hash} reverted or was not mined")
    return len(recipients), sum(1 for r in recipients if r == escrow)


def _receipt_status(w3: Web3, tx_hash: str) -> int | None:
    """The status of a mined transaction, None if not mined yet (read raw: a receipt with 500
    logs is slow to pass through web3's formatters)."""
    deadline = time.monotonic() + RECEIPT_TIMEOUT_S
    while True:
        response = w3.provider.make_request(RPCEndpoint("eth_getTransactionReceipt"), [tx_hash])
        receipt = response.get("result")
        if receipt is not None:
            return int(receipt["status"], 16)
        if time.monotonic() > deadline:
            return None
        time.sleep(BASELINE_POLL_S)


def _measure_indexer(
    engine: sa.Engine, platform: _Platform, window_max: int, head: int, progress: BenchProgress, total: int
) -> tuple[float, list[RunReport]]:
    indexer = Indexer(
        engine,
        ChainClient(platform.w3),
        platform.deployment,
        LogDecoder(),
        confirmations=INDEXER_CONFIRMATIONS,
        window_max=window_max,
    )
    task = progress.task(f"Indexing to block {head:,}", total)
    reports: list[RunReport] = []
    stored = 0
    started = time.perf_counter()
    while True:
        report = indexer.run_once()
        reports.append(report)
        stored += report.events_stored
        progress.update(task, min(stored, total), f"{stored:,} events, block {report.handled_block:,}")
        if report.skipped_locked:
            raise BenchError("another indexer holds the lock of this chain in the scratch database")
        if report.handled_block >= head:
            break
        if len(reports) >= MAX_INDEXER_RUNS:
            raise BenchError(f"the indexer did not reach block {head} in {MAX_INDEXER_RUNS} runs")
    return time.perf_counter() - started, reports


def run_indexer_bench(
    settings: Settings, plan: IndexerPlan, console: Console, *, server_url: str | None = None
) -> IndexerReport:
    """Generate the logs on a fresh anvil, then time the indexer over them in a scratch database."""
    started = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        progress = stack.enter_context(BenchProgress(console))
        node = progress.step("Starting anvil", lambda: stack.enter_context(_anvil(None)))
        platform: _Platform = progress.step("Deploying the platform", lambda: _deploy(node))
        generation_started = time.time()
        transfers, to_escrow = _generate_transfers(platform, plan, progress)
        generation_s = time.time() - generation_started
        head = int(platform.w3.eth.block_number)
        if server_url is None:
            server_url = stack.enter_context(database_server(settings))
        url = stack.enter_context(scratch_database(server_url))
        role = settings.db_role
        engine = progress.step("Migrating the scratch database", lambda: _migrated_engine(url, role))
        stack.callback(engine.dispose)
        seconds, reports = _measure_indexer(
            engine, platform, settings.indexer_window_blocks, head, progress, transfers
        )
        mirror_ok, events_ok = progress.step(
            "Checking the mirrors and the events",
            lambda: _check_indexed(engine, platform, transfers, to_escrow),
        )
        report = IndexerReport(
            plan=plan,
            transfers=transfers,
            escrow_transfers=to_escrow,
            blocks=head - platform.deployment.start_block + 1,
            generation_s=generation_s,
            seconds=seconds,
            runs=len(reports),
            windows=sum(r.windows for r in reports),
            events_stored=sum(r.events_stored for r in reports),
            entries_booked=sum(r.entries_booked for r in reports),
            exceptions_raised=sum(r.exceptions_raised for r in reports),
            window_max=settings.indexer_window_blocks,
            mirror_ok=mirror_ok,
            events_ok=events_ok,
            duration_s=time.time() - started,
            scratch_database=_database_name(url),
        )
    return report


def _check_indexed(
    engine: sa.Engine, platform: _Platform, transfers: int, to_escrow: int
) -> tuple[bool, bool]:
    """The escrow mirror equals the escrow's token balance; every fan-out transfer is stored once."""
    deployment = platform.deployment
    escrow_balance = int(
        platform.token.functions.balanceOf(Web3.to_checksum_address(deployment.escrow)).call()
    )
    with engine.connect() as conn:
        mirror = get_account(conn, custody.mirror_code(deployment.chain_id, deployment.escrow))
        stored = conn.execute(
            sa.text(
                "SELECT count(*) FROM chain_events WHERE chain_id = :c AND contract = :t"
                " AND event = 'Transfer' AND status = 'canonical' AND handled_at IS NOT NULL"
            ),
            {"c": deployment.chain_id, "t": deployment.token},
        ).scalar_one()
    # The fan-out transfers, and the mint into the fan-out contract.
    events_ok = int(stored) == transfers + 1
    mirror_ok = mirror.balance == escrow_balance == to_escrow * FANOUT_AMOUNT
    return mirror_ok, events_ok


def render_indexer_table(report: IndexerReport) -> Table:
    table = Table(
        title=(
            f"Indexer benchmark ({report.plan.name}, {report.transfers:,} transfers"
            f" over {report.blocks:,} blocks)"
        ),
        caption=(
            f"anvil, {report.plan.per_tx} transfers a transaction, one in {ESCROW_EVERY} into the escrow;"
            f" Indexer.run_once with confirmations {INDEXER_CONFIRMATIONS}, window_max {report.window_max};"
            f" {report.runs} run(s), {report.windows} window(s). Generating the logs took"
            f" {report.generation_s:.1f} s (not measured)."
        ),
    )
    for column in ("Measure", "Value", "Target", "Result"):
        table.add_column(column, justify="left" if column in ("Measure", "Target") else "right")
    table.add_row(
        "Logs indexed per second",
        f"{report.logs_per_s:,.0f}/s",
        f">= {TARGET_LOGS_PER_S:,}/s",
        _mark(report.targets()["logs_per_s"]),
    )
    table.add_row("Events stored", f"{report.events_stored:,}", "", "")
    table.add_row("Entries booked (escrow mirror)", f"{report.entries_booked:,}", "", "")
    table.add_row("Seconds", f"{report.seconds:.2f}", "", "")
    table.add_row(
        "Escrow mirror = token balance; every transfer stored",
        "ok" if report.mirror_ok and report.events_ok else "broken",
        "",
        _mark(report.mirror_ok and report.events_ok),
    )
    return table


# --- sender ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderReport:
    plan: SenderPlan
    txs: int
    seconds: float
    passes: int
    blocks: int
    baseline_txs: int
    baseline_seconds: float
    gas_limit: int
    check_ok: bool
    counts_ok: bool
    duration_s: float
    scratch_database: str

    @property
    def tx_per_s(self) -> float:
        return _per_s(self.txs, self.seconds)

    @property
    def baseline_tx_per_s(self) -> float:
        return _per_s(self.baseline_txs, self.baseline_seconds)

    @property
    def ratio(self) -> float:
        return _ratio(self.tx_per_s, self.baseline_tx_per_s)

    def targets(self) -> dict[str, bool]:
        return {"tx_per_s": self.tx_per_s >= TARGET_TX_PER_S, "ratio": self.ratio >= TARGET_SENDER_RATIO}

    def as_dict(self) -> dict[str, Any]:
        return {
            "tx_per_s": round(self.tx_per_s, 1),
            "baseline_tx_per_s": round(self.baseline_tx_per_s, 3),
            "ratio": round(self.ratio, 2),
            "block_time_s": self.plan.block_time_s,
            "txs": self.txs,
            "seconds": round(self.seconds, 3),
            "confirmations": SENDER_CONFIRMATIONS,
            "max_in_flight": self.plan.max_in_flight,
            "pass_interval_s": self.plan.pass_interval_s,
            "passes": self.passes,
            "blocks": self.blocks,
            "gas_limit": self.gas_limit,
            "baseline_txs": self.baseline_txs,
            "baseline_seconds": round(self.baseline_seconds, 3),
            "check_ok": self.check_ok,
            "counts_ok": self.counts_ok,
            "target_tx_per_s": TARGET_TX_PER_S,
            "target_ratio": TARGET_SENDER_RATIO,
            "targets_met": self.targets(),
            "mode": self.plan.name,
            "duration_s": round(self.duration_s, 3),
            "scratch_database": self.scratch_database,
        }


def transfer_calldata(recipient: str, amount: int) -> bytes:
    """ERC-20 ``transfer(recipient, amount)`` calldata."""
    return _TRANSFER_SELECTOR + eth_abi.encode(["address", "uint256"], [recipient, amount])


def _amount(index: int) -> int:
    return TRACE + index  # distinct amounts, so a transfer sent twice would be seen


def _transfer_gas(platform: _Platform) -> int:
    """The node's estimate for a transfer to a fresh address, with headroom (one limit for every row)."""
    estimate = int(
        platform.w3.eth.estimate_gas(
            {
                "from": platform.signer.address,
                "to": platform.token.address,
                "data": transfer_calldata(_recipient("estimate", 0), TRACE),
            }
        )
    )
    return estimate + estimate * GAS_HEADROOM_PERCENT // 100


def _fund_and_enqueue(engine: sa.Engine, platform: _Platform, txs: int, gas_limit: int) -> None:
    """The custody chart, a payable funded with what the transfers need, one outbox row and hold each."""
    deployment = platform.deployment
    chain_id = deployment.chain_id
    total = sum(_amount(i) for i in range(txs))
    with engine.begin() as conn:
        custody.ensure_chart(conn, chain_id, deployment.custody)
        create_account(conn, BUDGET_ACCOUNT, custody.TOKEN_ASSET, "equity")
        create_account(
            conn, PAYABLE_ACCOUNT, custody.TOKEN_ASSET, "liability", flags=["debits_must_not_exceed_credits"]
        )
        [funded] = post_batch(
            conn,
            [
                NewEntry(
                    key="bench:chain:fund",
                    legs=(Leg(BUDGET_ACCOUNT, PAYABLE_ACCOUNT, total, custody.TOKEN_ASSET),),
                )
            ],
        )
        if funded.status != "created":
            raise BenchError(f"funding the payable account failed: {funded.reason}")
    clearing = custody.clearing_code(chain_id)
    for start in range(0, txs, ENQUEUE_BATCH):
        with engine.begin() as conn:
            for i in range(start, min(txs, start + ENQUEUE_BATCH)):
                recipient, amount = _recipient("send", i), _amount(i)
                action = outbox.ChainAction(
                    key=f"bench:send:{i}",
                    chain_id=chain_id,
                    signer=platform.signer.address,
                    action="token.transfer",
                    to_address=deployment.token,
                    data=transfer_calldata(recipient, amount),
                    gas_limit=gas_limit,
                    metadata={"recipient": recipient.lower(), "amount": str(amount)},
                )
                hold = NewEntry(
                    key=f"bench:hold:{i}",
                    legs=(Leg(PAYABLE_ACCOUNT, clearing, amount, custody.TOKEN_ASSET, pending=True),),
                )
                outbox.enqueue(conn, action, [hold])


def _open_rows(engine: sa.Engine) -> tuple[int, int]:
    """(rows not yet settled, rows failed)."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT count(*) FILTER (WHERE status NOT IN ('confirmed', 'failed')),"
                " count(*) FILTER (WHERE status = 'failed') FROM chain_outbox"
            )
        ).one()
    return int(row[0]), int(row[1])


def _measure_sender(
    engine: sa.Engine, platform: _Platform, plan: SenderPlan, txs: int, progress: BenchProgress
) -> tuple[float, int, int]:
    """Run sender passes until every row is settled; returns (seconds, passes, blocks mined meanwhile)."""
    sender = Sender(
        engine,
        platform.w3,
        platform.signer,
        platform.deployment.chain_id,
        confirmations=SENDER_CONFIRMATIONS,
        # Far beyond the run: a fee bump would only mean the node is not keeping up.
        bump_after_s=SENDER_STALL_S,
        max_in_flight=plan.max_in_flight,
    )
    task = progress.task(f"Sending {txs:,} transfers (a block every {plan.block_time_s:g} s)", txs)
    first_block = int(platform.w3.eth.block_number)
    passes = 0
    settled_at = started = time.perf_counter()
    done = 0
    while True:
        report = sender.run_once()
        passes += 1
        if report.skipped_locked:
            raise BenchError("another sender holds the lock of this key in the scratch database")
        open_rows, failed = _open_rows(engine)
        if failed:
            raise BenchError(f"{failed} outbox row(s) failed on chain")
        now = time.perf_counter()
        if txs - open_rows > done:
            done, settled_at = txs - open_rows, now
        progress.update(task, done, f"{done:,} confirmed, pass {passes}")
        if open_rows == 0:
            break
        if now - settled_at > SENDER_STALL_S:
            raise BenchError(f"no outbox row settled for {SENDER_STALL_S:g} s ({open_rows} still open)")
        time.sleep(plan.pass_interval_s)
    seconds = time.perf_counter() - started
    return seconds, passes, int(platform.w3.eth.block_number) - first_block


def _check_sent(
    engine: sa.Engine, platform: _Platform, txs: int, nonce_before: int, treasury_before: int
) -> tuple[bool, bool]:
    """(books balanced and every hold posted, every row confirmed on its own consecutive nonce and the
    treasury paid exactly the enqueued amounts)."""
    w3, signer = platform.w3, platform.signer
    chain_id = platform.deployment.chain_id
    total = sum(_amount(i) for i in range(txs))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, nonce FROM chain_outbox ORDER BY nonce")).all()
        payable = get_account(conn, PAYABLE_ACCOUNT)
        clearing = get_account(conn, custody.clearing_code(chain_id))
    with engine.connect() as conn:
        summary = check_ledger(conn)
    treasury_after = int(platform.token.functions.balanceOf(signer.address).call())
    counts_ok = (
        len(rows) == txs
        and all(r.status == "confirmed" for r in rows)
        and [int(r.nonce) for r in rows] == list(range(nonce_before, nonce_before + txs))
        and int(w3.eth.get_transaction_count(signer.address, "latest")) == nonce_before + txs
        and treasury_before - treasury_after == total
    )
    holds_ok = (
        payable.debits_pending == 0
        and payable.balance == 0
        and clearing.credits_pending == 0
        and clearing.credits_posted == total
    )
    return bool(summary["ok"]) and holds_ok, counts_ok


def _measure_baseline(platform: _Platform, sample: int, progress: BenchProgress) -> float:
    """Send ``sample`` transfers one by one, each receipt awaited before the next; returns the seconds."""
    w3, signer, token = platform.w3, platform.signer, platform.token
    chain_id = platform.deployment.chain_id
    gas = _transfer_gas(platform)
    task = progress.task(f"Baseline: {sample} transfers one by one", sample)
    started = time.perf_counter()
    for i in range(sample):
        base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": chain_id,
            "nonce": int(w3.eth.get_transaction_count(signer.address, "pending")),
            "to": token.address,
            "data": transfer_calldata(_recipient("baseline", i), _amount(i)),
            "value": 0,
            "gas": gas,
            "maxFeePerGas": 2 * base_fee + PRIORITY_FEE_DEFAULT,
            "maxPriorityFeePerGas": PRIORITY_FEE_DEFAULT,
        }
        signed = signer.sign_transaction(tx)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=RECEIPT_TIMEOUT_S, poll_latency=BASELINE_POLL_S
        )
        if receipt["status"] != 1:
            raise BenchError(f"baseline transfer {hex32(tx_hash)} reverted")
        progress.update(task, i + 1)
    return time.perf_counter() - started


def run_sender_bench(
    settings: Settings, plan: SenderPlan, console: Console, *, server_url: str | None = None
) -> SenderReport:
    """Enqueue ``plan.txs`` transfers on a fresh anvil with a block time; time the sender, then baseline."""
    started = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        progress = stack.enter_context(BenchProgress(console))
        node = progress.step(
            f"Starting anvil (a block every {plan.block_time_s:g} s)",
            lambda: stack.enter_context(_anvil(plan.block_time_s)),
        )
        platform: _Platform = progress.step("Deploying the platform", lambda: _deploy(node))
        # The enqueued transfers, then the baseline's.
        total = sum(_amount(i) for i in range(plan.txs)) + sum(_amount(i) for i in range(plan.sample))
        progress.step(
            "Minting the treasury",
            lambda: transact(
                platform.w3, platform.token.functions.mint(platform.signer.address, total), platform.signer
            ),
        )
        gas_limit = _transfer_gas(platform)
        if server_url is None:
            server_url = stack.enter_context(database_server(settings))
        url = stack.enter_context(scratch_database(server_url))
        role = settings.db_role
        engine = progress.step("Migrating the scratch database", lambda: _migrated_engine(url, role))
        stack.callback(engine.dispose)
        progress.step(
            f"Enqueueing {plan.txs:,} transfers with their holds",
            lambda: _fund_and_enqueue(engine, platform, plan.txs, gas_limit),
        )
        signer_address = platform.signer.address
        nonce_before = int(platform.w3.eth.get_transaction_count(signer_address, "latest"))
        treasury_before = int(platform.token.functions.balanceOf(signer_address).call())
        seconds, passes, blocks = _measure_sender(engine, platform, plan, plan.txs, progress)
        check_ok, counts_ok = progress.step(
            "Checking the books, the nonces and the balances",
            lambda: _check_sent(engine, platform, plan.txs, nonce_before, treasury_before),
        )
        baseline_seconds = _measure_baseline(platform, plan.sample, progress)
        report = SenderReport(
            plan=plan,
            txs=plan.txs,
            seconds=seconds,
            passes=passes,
            blocks=blocks,
            baseline_txs=plan.sample,
            baseline_seconds=baseline_seconds,
            gas_limit=gas_limit,
            check_ok=check_ok,
            counts_ok=counts_ok,
            duration_s=time.time() - started,
            scratch_database=_database_name(url),
        )
    return report


def render_sender_table(report: SenderReport) -> Table:
    plan = report.plan
    table = Table(
        title=f"Sender benchmark ({plan.name}, {report.txs:,} transfers, one key)",
        caption=(
            f"anvil mining a block every {plan.block_time_s:g} s; Sender.run_once passes every"
            f" {plan.pass_interval_s:g} s with confirmations {SENDER_CONFIRMATIONS}, max_in_flight"
            f" {plan.max_in_flight}, gas limit {report.gas_limit:,}: {report.passes} passes over"
            f" {report.blocks} blocks. Baseline: {report.baseline_txs} transfers sent one by one, each"
            " receipt awaited before the next, same node."
        ),
    )
    for column in ("Measure", "Sender", "Baseline", "Ratio", "Target", "Result"):
        table.add_column(column, justify="left" if column in ("Measure", "Target") else "right")
    targets = report.targets()
    table.add_row(
        "Transfers confirmed per second",
        f"{report.tx_per_s:,.1f}/s",
        f"{report.baseline_tx_per_s:,.2f}/s",
        f"{report.ratio:,.1f}x",
        f">= {TARGET_TX_PER_S}/s and >= {TARGET_SENDER_RATIO:g}x",
        _mark(targets["tx_per_s"] and targets["ratio"]),
    )
    table.add_row("Seconds", f"{report.seconds:.2f}", f"{report.baseline_seconds:.2f}", "", "", "")
    table.add_row(
        "Books balance, holds posted, nonces consecutive, paid once",
        "ok" if report.check_ok and report.counts_ok else "broken",
        "",
        "",
        "",
        _mark(report.check_ok and report.counts_ok),
    )
    return table


# --- commands --------------------------------------------------------------------------------


def _emit(report: IndexerReport | SenderReport, as_json: bool, table: Callable[[], Table]) -> None:
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
        return
    stdout = Console()
    if not stdout.is_terminal:
        stdout = Console(width=140)
    stdout.print(table())


def _run(work: Callable[[Console], Any]) -> Any:
    _quiet_loggers()
    stderr = Console(stderr=True)
    try:
        return work(stderr)
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted; the scratch database was dropped and anvil stopped[/]")
        raise SystemExit(130) from None


@click.command("indexer")
@click.option(
    "--quick",
    is_flag=True,
    help=f"{INDEXER_QUICK.logs:,} logs instead of {INDEXER_FULL.logs:,} (under 45 s).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
@click.option("--logs", type=click.IntRange(1, 1_000_000), hidden=True, help="Transfer logs to generate.")
def indexer_bench(quick: bool, as_json: bool, logs: int | None) -> None:
    """Logs the indexer stores and books per second, from a fresh anvil into a scratch database.

    Exits 1 if the escrow's mirror does not match its token balance or a transfer was not stored.
    """
    plan = INDEXER_QUICK if quick else INDEXER_FULL
    if logs is not None:
        plan = replace(plan, logs=logs)
    settings = load_settings()
    report: IndexerReport = _run(lambda console: run_indexer_bench(settings, plan, console))
    _emit(report, as_json, lambda: render_indexer_table(report))
    if not (report.mirror_ok and report.events_ok):
        raise BenchError("the escrow mirror or the stored events do not check out (mirror_ok, events_ok)")


@click.command("sender")
@click.option(
    "--quick",
    is_flag=True,
    help=f"{SENDER_QUICK.txs:,} transfers instead of {SENDER_FULL.txs:,} (under 45 s).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
@click.option(
    "--max-in-flight", type=click.IntRange(1, 100_000), help="Rows signed but not settled, at most."
)
@click.option("--txs", type=click.IntRange(1, 100_000), hidden=True, help="Outbox rows to send.")
@click.option("--sample", type=click.IntRange(1, 1_000), hidden=True, help="Baseline transfers.")
@click.option(
    "--block-time", type=click.FloatRange(0.1, 60), hidden=True, help="anvil's block time in seconds."
)
def sender_bench(
    quick: bool,
    as_json: bool,
    max_in_flight: int | None,
    txs: int | None,
    sample: int | None,
    block_time: float | None,
) -> None:
    """Outbox transfers one signing key gets confirmed per second, against sending one by one.

    Exits 1 if the books do not balance, a row is not confirmed on its own consecutive nonce,
    or the treasury did not pay exactly the enqueued transfers.
    """
    plan = SENDER_QUICK if quick else SENDER_FULL
    plan = replace(
        plan,
        txs=txs or plan.txs,
        sample=sample or plan.sample,
        block_time_s=block_time or plan.block_time_s,
        max_in_flight=max_in_flight or plan.max_in_flight,
    )
    settings = load_settings()
    report: SenderReport = _run(lambda console: run_sender_bench(settings, plan, console))
    _emit(report, as_json, lambda: render_sender_table(report))
    if not (report.check_ok and report.counts_ok):
        raise BenchError("the books, the nonces or the balances do not check out (check_ok, counts_ok)")
