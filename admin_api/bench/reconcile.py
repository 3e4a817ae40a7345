"""`tracechain bench reconcile`: the transfer-level reconciliation over a large confirmed history.

In a scratch database (created and dropped like the other benches') it writes N confirmed TRACE
``Transfer`` events as the indexer stores them, custody transfers and mints to claimants, and
books each through the ledger engine as the indexer and the mint settlement would. Then it breaks
1% of them per class on purpose, recording each injected break:

* chain-only: an event whose booking is left out;
* ledger-only: a booking of a transfer the chain never had;
* mismatched: a booking whose amount, or whose counterparty, differs from the event;
* mints: a mint with no books, a mint booked with another amount, a booked mint the chain lacks.

Only then does the clock start: :func:`ledger.reconciliation.transfer_level`, the one statement
that classifies every transfer of the range, runs over the whole range. ``transfers_per_s`` is
the transfers it classified divided by that time. Every break it reports is compared with the
injected set: ``missed_breaks`` were injected and not found, ``false_breaks`` were found and not
injected. The balance level (four historical ``balanceOf`` calls per run) is not part of it.

The baseline, on the same data in the same run, matches a sample the way a per-row program
would: for each chain transfer, one query for its booking, compared in Python.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
import sqlalchemy as sa
from eth_utils.crypto import keccak
from rich.console import Console
from rich.table import Table

from admin_api.bench.chain import database_server
from admin_api.bench.ledger import BenchError, BenchProgress, scratch_database
from ledger import custody, db, reconciliation
from ledger.accounts import create_account
from ledger.commands import ChainRef, Leg, NewEntry
from ledger.engine import post_batch
from ledger.settings import load_settings

CHAIN_ID = 31337
TOKEN = "0x" + "7e" * 20
ESCROW, VAULT, TREASURY, FEES = ("0x" + b * 20 for b in ("e1", "e2", "e3", "e4"))
CUSTODY = (ESCROW, VAULT, TREASURY, FEES)
TRANSFERS_FULL = 100_000
TRANSFERS_QUICK = 20_000
BREAK_RATE = 0.01
MINT_EVERY = 10  # one transfer in ten is a mint to a claimant
PER_BLOCK = 50
BOOK_BATCH = 2_000
BASELINE_SAMPLE = 2_000
TARGET_PER_S = 10_000
SEED = 20261207


def _hash(text: str) -> str:
    return "0x" + keccak(text=text).hex()


def _address(tag: str, index: int) -> str:
    return "0x" + keccak(text=f"{tag}:{index}")[-20:].hex()


@dataclass(frozen=True)
class _Transfer:
    index: int
    tx_hash: str
    log_index: int
    block: int
    sender: str
    recipient: str
    amount: int

    @property
    def is_mint(self) -> bool:
        return self.sender == custody.ZERO_ADDRESS

    def ref(self) -> ChainRef:
        return ChainRef(CHAIN_ID, self.tx_hash, self.log_index, self.block, _hash(f"block:{self.block}"))


def _plan(count: int, rng: random.Random) -> list[_Transfer]:
    transfers = []
    for i in range(count):
        block = 1 + i // PER_BLOCK
        amount = rng.randrange(1, 10**21)
        user = _address("user", rng.randrange(10_000))
        if i % MINT_EVERY == 0:
            sender, recipient = custody.ZERO_ADDRESS, user
        elif rng.random() < 0.5:
            sender, recipient = user, CUSTODY[rng.randrange(4)]
        else:
            sender, recipient = CUSTODY[rng.randrange(4)], user
        transfers.append(_Transfer(i, _hash(f"tx:{i}"), i % PER_BLOCK, block, sender, recipient, amount))
    return transfers


@dataclass
class _Injected:
    keys: set[tuple[str, str, int | None]]

    def add(self, cls: str, t: _Transfer) -> None:
        self.keys.add((cls, t.tx_hash, None if t.is_mint else t.log_index))


def _setup(engine: sa.Engine, owner: sa.Engine, transfers: list[_Transfer], rng: random.Random) -> _Injected:
    """Store the events, book them (with the injected breaks), return what was injected."""
    injected = _Injected(set())
    per_class = max(1, int(len(transfers) * BREAK_RATE))
    custody_ones = [t for t in transfers if not t.is_mint]
    mints = [t for t in transfers if t.is_mint]
    chosen = rng.sample(custody_ones, 3 * per_class)
    chain_only = {t.index for t in chosen[:per_class]}
    wrong_amount = {t.index for t in chosen[per_class : per_class + per_class // 2]}
    wrong_party = {t.index for t in chosen[per_class + per_class // 2 : 2 * per_class]}
    ledger_only = chosen[2 * per_class :]  # their events are left out instead of their bookings
    mint_share = max(1, per_class // MINT_EVERY)
    mint_chosen = rng.sample(mints, 3 * mint_share)
    mint_unbooked = {t.index for t in mint_chosen[:mint_share]}
    mint_wrong = {t.index for t in mint_chosen[mint_share : 2 * mint_share]}
    mint_ghost = {t.index for t in mint_chosen[2 * mint_share :]}
    ghost_events = {t.index for t in ledger_only} | mint_ghost

    # The events, as the indexer stores them (handled), in one statement.
    events = [t for t in transfers if t.index not in ghost_events]
    with owner.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO chain_events (chain_id, block_number, block_hash, tx_hash, log_index, contract,"
                " event, args, handled_at)"
                " SELECT :c, b, bh, tx, li, :token, 'Transfer',"
                " jsonb_build_object('from', f, 'to', r, 'value', v), now()"
                " FROM unnest(CAST(:b AS bigint[]), CAST(:bh AS text[]), CAST(:tx AS text[]),"
                " CAST(:li AS integer[]), CAST(:f AS text[]), CAST(:r AS text[]), CAST(:v AS text[]))"
                " AS u(b, bh, tx, li, f, r, v)"
            ),
            {
                "c": CHAIN_ID,
                "token": TOKEN,
                "b": [t.block for t in events],
                "bh": [t.ref().block_hash for t in events],
                "tx": [t.tx_hash for t in events],
                "li": [t.log_index for t in events],
                "f": [t.sender for t in events],
                "r": [t.recipient for t in events],
                "v": [str(t.amount) for t in events],
            },
        )
    for t in transfers:
        if t.index in chain_only or t.index in mint_unbooked:
            injected.add("chain_only", t)
        elif t.index in wrong_amount or t.index in wrong_party or t.index in mint_wrong:
            injected.add("mismatched", t)
        elif t.index in ghost_events:
            injected.add("ledger_only", t)

    # The bookings, through the engine.
    commands: list[NewEntry] = []
    for t in transfers:
        if t.index in chain_only or t.index in mint_unbooked:
            continue
        amount = t.amount + 1 if t.index in wrong_amount or t.index in mint_wrong else t.amount
        if t.is_mint:
            commands.append(
                NewEntry(
                    f"mint:{t.index}",
                    (
                        Leg(
                            "expense:points:claims",
                            custody.minted_code(CHAIN_ID),
                            amount,
                            custody.TOKEN_ASSET,
                        ),
                    ),
                    kind="points.mint",
                    metadata={"tx_hash": t.tx_hash, "block_number": t.block},
                )
            )
            continue
        booked = t
        if t.index in wrong_party:
            other = _address("other", t.index)
            booked = _Transfer(
                t.index,
                t.tx_hash,
                t.log_index,
                t.block,
                *((other, t.recipient) if t.recipient in CUSTODY else (t.sender, other)),
                t.amount,
            )
        booking = custody.book_custody_transfer(
            custody.TokenTransfer(t.ref(), booked.sender, booked.recipient, amount), frozenset(CUSTODY), None
        )
        assert booking is not None
        commands.append(booking.entry)
    with engine.begin() as conn:
        custody.ensure_chart(conn, CHAIN_ID, CUSTODY)
        create_account(conn, "expense:points:claims", custody.TOKEN_ASSET, "expense")
        create_account(conn, custody.minted_code(CHAIN_ID), custody.TOKEN_ASSET, "equity")
    for start in range(0, len(commands), BOOK_BATCH):
        with engine.begin() as conn:
            results = post_batch(conn, commands[start : start + BOOK_BATCH])
        refused = [r for r in results if r.status != "created"]
        if refused:
            raise BenchError(f"the engine refused a booking of the data set: {refused[0].reason}")
    with owner.begin() as conn:
        conn.execute(sa.text("ANALYZE chain_events"))
        conn.execute(sa.text("ANALYZE ledger_entries"))
        conn.execute(sa.text("ANALYZE ledger_transfers"))
    return injected


def _baseline(engine: sa.Engine, sample: list[_Transfer]) -> tuple[int, float]:
    """Per row: one query for the booking of each chain transfer, compared in Python."""
    started = time.perf_counter()
    classified = 0
    with engine.connect() as conn:
        for t in sample:
            if t.is_mint:
                continue
            row = conn.execute(
                sa.text(
                    "SELECT t.amount, le.metadata FROM ledger_entries le"
                    " JOIN ledger_transfers t ON t.entry_id = le.id"
                    " WHERE le.chain_id = :c AND le.tx_hash = :tx AND le.log_index = :li"
                    " AND NOT EXISTS (SELECT 1 FROM ledger_entries r WHERE r.reverses_entry_id = le.id)"
                ),
                {"c": CHAIN_ID, "tx": t.tx_hash, "li": t.log_index},
            ).first()
            _ = row is not None and int(row.amount) == t.amount and row.metadata.get("to") == t.recipient
            classified += 1
    return classified, time.perf_counter() - started


@dataclass(frozen=True)
class ReconcileReport:
    name: str
    transfers: int
    classified: int
    seconds: float
    baseline_transfers: int
    baseline_seconds: float
    injected_breaks: int
    found_breaks: int
    missed_breaks: int
    false_breaks: int
    setup_s: float
    scratch_database: str

    @property
    def transfers_per_s(self) -> float:
        return self.classified / self.seconds if self.seconds > 0 else 0.0

    @property
    def baseline_transfers_per_s(self) -> float:
        return self.baseline_transfers / self.baseline_seconds if self.baseline_seconds > 0 else 0.0

    @property
    def ratio(self) -> float:
        base = self.baseline_transfers_per_s
        return self.transfers_per_s / base if base > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": self.name,
            "transfers": self.transfers,
            "transfers_classified": self.classified,
            "seconds": round(self.seconds, 3),
            "transfers_per_s": round(self.transfers_per_s, 1),
            "baseline_transfers_per_s": round(self.baseline_transfers_per_s, 1),
            "ratio": round(self.ratio, 2),
            "injected_breaks": self.injected_breaks,
            "found_breaks": self.found_breaks,
            "missed_breaks": self.missed_breaks,
            "false_breaks": self.false_breaks,
            "target_transfers_per_s": TARGET_PER_S,
            "targets_met": self.transfers_per_s >= TARGET_PER_S
            and self.missed_breaks == 0
            and self.false_breaks == 0,
            "setup_s": round(self.setup_s, 1),
            "scratch_database": self.scratch_database,
        }


def run_reconcile_bench(count: int, name: str, progress: BenchProgress) -> ReconcileReport:
    settings = load_settings()
    rng = random.Random(SEED)  # noqa: S311 - a reproducible data set, not a secret
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(database_server(settings))
        url = stack.enter_context(scratch_database(server))
        progress.step("Migrating the scratch database", lambda: db.upgrade(url, role=settings.db_role))
        engine = db.make_engine(url, role=settings.db_role, pool_size=2)
        owner = db.make_engine(url, role=None, pool_size=1)
        stack.callback(engine.dispose)
        stack.callback(owner.dispose)
        transfers = _plan(count, rng)
        started = time.perf_counter()
        injected = progress.step(
            f"Writing {count:,} events and their bookings", lambda: _setup(engine, owner, transfers, rng)
        )
        setup_s = time.perf_counter() - started
        scope = reconciliation.Scope(CHAIN_ID, TOKEN, frozenset(CUSTODY), 0, transfers[-1].block)

        def measure() -> tuple[reconciliation.TransferLevel, float]:
            with engine.connect() as conn:
                clock = time.perf_counter()
                level = reconciliation.transfer_level(conn, scope, unseen_before=datetime.now(UTC))
                return level, time.perf_counter() - clock

        level, seconds = progress.step("Reconciling (measured)", measure)
        sample = rng.sample(transfers, min(BASELINE_SAMPLE, len(transfers)))
        baseline_n, baseline_s = progress.step(
            "Baseline: one query per transfer", lambda: _baseline(engine, sample)
        )
        found = {
            (b.cls, b.tx_hash or "", b.log_index if b.details.get("scope") == "custody" else None)
            for b in level.breaks
        }
        return ReconcileReport(
            name=name,
            transfers=count,
            classified=level.checked,
            seconds=seconds,
            baseline_transfers=baseline_n,
            baseline_seconds=baseline_s,
            injected_breaks=len(injected.keys),
            found_breaks=len(found),
            missed_breaks=len(injected.keys - found),
            false_breaks=len(found - injected.keys),
            setup_s=setup_s,
            scratch_database=str(sa.engine.make_url(db.sqlalchemy_url(url)).database),
        )


def _table(report: ReconcileReport) -> Table:
    table = Table(
        title=f"Reconciliation benchmark ({report.name}, {report.transfers:,} confirmed transfers)",
        caption=(
            f"Transfer level, one statement over the whole range; {BREAK_RATE:.0%} of the transfers broken"
            f" per class on purpose. Writing the data set took {report.setup_s:.1f} s (not measured)."
        ),
    )
    for column in ("Measure", "Value", "Target"):
        table.add_column(column)
    table.add_row(
        "Transfers reconciled per second", f"{report.transfers_per_s:,.0f}/s", f">= {TARGET_PER_S:,}/s"
    )
    table.add_row("Baseline (one query per transfer)", f"{report.baseline_transfers_per_s:,.0f}/s", "")
    table.add_row("Ratio", f"{report.ratio:.1f}x", "")
    table.add_row("Breaks injected / found", f"{report.injected_breaks:,} / {report.found_breaks:,}", "")
    table.add_row("Missed / false breaks", f"{report.missed_breaks} / {report.false_breaks}", "0 / 0")
    return table


@click.command("reconcile")
@click.option(
    "--quick", is_flag=True, help=f"{TRANSFERS_QUICK:,} transfers instead of {TRANSFERS_FULL:,} (under 45 s)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
@click.option("--transfers", type=click.IntRange(100, 2_000_000), hidden=True, help="Transfers to reconcile.")
def reconcile_bench(quick: bool, as_json: bool, transfers: int | None) -> None:
    """Confirmed transfers reconciled per second, with injected breaks that must all be found.

    Exits 1 if a break was missed or a false one reported.
    """
    count = transfers or (TRANSFERS_QUICK if quick else TRANSFERS_FULL)
    name = "quick" if quick else "full"
    console = Console(stderr=True)
    with BenchProgress(console) as progress:
        report = run_reconcile_bench(count, name, progress)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        Console().print(_table(report))
    if report.missed_breaks or report.false_breaks:
        raise BenchError(f"{report.missed_breaks} break(s) missed, {report.false_breaks} false break(s)")
