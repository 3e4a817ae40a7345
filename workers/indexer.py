"""The chain indexer (DESIGN §6): reads our contracts' logs, follows reorgs, hands confirmed
events to the ledger handlers.

One run (``Indexer.run_once``) holds a PostgreSQL advisory lock for its chain, so at most one
indexer is active per chain whatever beat or an operator starts. Each window of blocks is
stored in one transaction together with the cursor, so a crash at any point resumes from the
last stored window. Effects on the ledger happen only at ``confirmations`` depth; a reorg that
orphans an event after that is compensated with a reversal entry and an exception, never deleted.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog

from contracts.client import ChainClient, Header, ProviderError, RawLog
from contracts.deployment import Deployment
from ledger import custody, exceptions_queue
from ledger.commands import ChainRef, Command
from ledger.engine import post_batch
from workers import escrow_events, locks, staking_events

log = structlog.get_logger(__name__)

# Blocks below head - confirmations - REORG_MARGIN are taken as final: only their event
# blocks are recorded. Above it, every header is recorded and linked by parent hash.
REORG_MARGIN = 64
WINDOW_MIN = 1
HANDLE_BATCH = 5000
MAX_WINDOWS_PER_RUN = 500

Decoded = tuple[str, dict[str, Any]]
Decoder = Callable[[RawLog], Decoded | None]


class ReorgDuringRead(Exception):
    """The chain changed under a window being read; the next pass finds the fork."""


@dataclass
class RunReport:
    """What one run did (printed by the CLI, counted in metrics)."""

    chain_id: int
    head: int = 0
    indexed_block: int = 0
    handled_block: int = 0
    windows: int = 0
    events_stored: int = 0
    events_handled: int = 0
    entries_booked: int = 0
    exceptions_raised: int = 0
    reorgs: int = 0
    orphaned: int = 0
    compensated: int = 0
    shrinks: int = 0
    skipped_locked: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "notes" or v}


@dataclass(frozen=True, slots=True)
class _Event:
    id: int
    chain: ChainRef
    contract: str
    event: str
    args: Mapping[str, Any]


class Indexer:
    """Indexes one deployment on one chain into one database."""

    def __init__(
        self,
        engine: sa.Engine,
        client: ChainClient,
        deployment: Deployment,
        decode: Decoder,
        *,
        confirmations: int,
        window_max: int,
    ) -> None:
        if confirmations < 0 or window_max < WINDOW_MIN:
            raise ValueError("confirmations must be >= 0 and window_max >= 1")
        self.engine = engine
        self.client = client
        self.deployment = deployment
        self.decode = decode
        self.confirmations = confirmations
        self.window_max = window_max
        self.chain_id = deployment.chain_id

    # -- the run ---------------------------------------------------------------------------

    def run_once(self, max_windows: int = MAX_WINDOWS_PER_RUN) -> RunReport:
        """Catch up with the chain (bounded), then hand confirmed events to the handlers."""
        report = RunReport(self.chain_id)
        with locks.exclusive(self.engine, locks.INDEXER_LOCKS, self.chain_id) as got_lock:
            if not got_lock:
                report.skipped_locked = True
                return report
            chain_id = self.client.chain_id()
            if chain_id != self.chain_id:
                raise ProviderError(f"the node serves chain {chain_id}, the deployment is on {self.chain_id}")
            self._ensure_cursor()
            report.head = self.client.head()
            self._follow_fork(report)
            for _ in range(max_windows):
                try:
                    if not self._read_window(report):
                        break
                except ReorgDuringRead as exc:
                    report.notes.append(str(exc))
                    self._follow_fork(report)
            self._handle_confirmed(report)
            cursor = self._cursor()
            report.indexed_block = cursor["indexed_block"]
            report.handled_block = cursor["handled_block"]
        return report

    def _ensure_cursor(self) -> None:
        with self.engine.begin() as conn:
            custody.ensure_chart(conn, self.chain_id, self.deployment.custody)
            conn.execute(
                sa.text(
                    "INSERT INTO chain_cursors (chain_id, start_block, indexed_block, handled_block,"
                    " window_blocks) VALUES (:c, :s, :s - 1, :s - 1, :w) ON CONFLICT (chain_id) DO NOTHING"
                ),
                {"c": self.chain_id, "s": self.deployment.start_block, "w": min(100, self.window_max)},
            )

    def _cursor(self, conn: sa.Connection | None = None) -> dict[str, Any]:
        query = sa.text(
            "SELECT start_block, indexed_block, handled_block, window_blocks FROM chain_cursors"
            " WHERE chain_id = :c"
        )
        if conn is not None:
            return dict(conn.execute(query, {"c": self.chain_id}).mappings().one())
        with self.engine.connect() as own:
            return dict(own.execute(query, {"c": self.chain_id}).mappings().one())

    # -- reorgs ----------------------------------------------------------------------------

    def _follow_fork(self, report: RunReport) -> None:
        """If the stored tip is no longer canonical, roll back to the common ancestor."""
        with self.engine.connect() as conn:
            stored = conn.execute(
                sa.text(
                    "SELECT number, hash FROM chain_blocks WHERE chain_id = :c ORDER BY number DESC LIMIT 1"
                ),
                {"c": self.chain_id},
            ).first()
        if stored is None:
            return
        tip = self.client.headers([stored.number])[stored.number]
        if tip is not None and tip.hash == stored.hash:
            return
        ancestor = self._common_ancestor()
        log.warning("indexer.reorg", chain_id=self.chain_id, stored_tip=stored.number, ancestor=ancestor)
        report.reorgs += 1
        self._roll_back(ancestor, report)

    def _common_ancestor(self) -> int:
        """The highest stored block that is still canonical (walks back in pages)."""
        upper: int | None = None
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT number, hash FROM chain_blocks WHERE chain_id = :c"
                        " AND (CAST(:upper AS bigint) IS NULL OR number < :upper)"
                        " ORDER BY number DESC LIMIT 128"
                    ),
                    {"c": self.chain_id, "upper": upper},
                ).all()
            if not rows:
                # Nothing we stored survives: start over from the deployment's first block.
                return self.deployment.start_block - 1
            headers = self.client.headers([r.number for r in rows])
            for row in rows:
                header = headers.get(row.number)
                if header is not None and header.hash == row.hash:
                    return int(row.number)
            upper = int(rows[-1].number)

    def _roll_back(self, ancestor: int, report: RunReport) -> None:
        """Orphan every event above ``ancestor``; compensate those already booked; re-read."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            orphaned = conn.execute(
                sa.text(
                    "UPDATE chain_events SET status = 'orphaned', orphaned_at = :now"
                    " WHERE chain_id = :c AND block_number > :a AND status = 'canonical'"
                    " RETURNING block_hash, handled_at IS NOT NULL AS handled, tx_hash, log_index,"
                    " block_number, contract, event, args"
                ),
                {"c": self.chain_id, "a": ancestor, "now": now},
            ).all()
            # The escrows and stakes forget what the orphaned events did, before the tokens are reversed.
            undone = [
                _Event(
                    0,
                    ChainRef(self.chain_id, r.tx_hash, r.log_index, r.block_number, r.block_hash),
                    r.contract,
                    r.event,
                    r.args,
                )
                for r in sorted(orphaned, key=lambda r: (r.block_number, r.log_index))
                if r.handled
            ]
            escrow_events.undo_events(conn, self.deployment.escrow, undone)
            staking_events.undo_events(conn, self.deployment.vault, undone)
            report.orphaned += len(orphaned)
            handled_hashes = {r.block_hash for r in orphaned if r.handled}
            reversals = custody.compensations(conn, self.chain_id, handled_hashes)
            results = post_batch(conn, reversals)
            for reversal, result in zip(reversals, results, strict=True):
                if result.status == "rejected":
                    # Cannot happen while compensations() picks only unreversed posted entries;
                    # if it does, stop rather than leave the books silently wrong.
                    raise RuntimeError(f"compensation {reversal.key} was refused: {result.reason}")
                if result.status == "created":
                    report.compensated += 1
                if exceptions_queue.open_exception(
                    conn,
                    reversal.key,
                    "reorg_compensated",
                    {
                        "entry_key": reversal.entry_key,
                        "reason": "the block of a confirmed event left the canonical chain",
                        "confirmations": self.confirmations,
                    },
                    chain=reversal.chain,
                    entry_key=reversal.entry_key,
                ):
                    report.exceptions_raised += 1
            conn.execute(
                sa.text("DELETE FROM chain_blocks WHERE chain_id = :c AND number > :a"),
                {"c": self.chain_id, "a": ancestor},
            )
            # Nothing before the deployment's first block is read: an ancestor below it (a chain
            # that started over) sends the cursor back to that block, not further.
            conn.execute(
                sa.text(
                    "UPDATE chain_cursors"
                    " SET indexed_block = LEAST(indexed_block, GREATEST(:a, start_block - 1)),"
                    " handled_block = LEAST(handled_block, GREATEST(:a, start_block - 1)),"
                    " updated_at = now() WHERE chain_id = :c"
                ),
                {"c": self.chain_id, "a": ancestor},
            )

    # -- reading ---------------------------------------------------------------------------

    def _read_window(self, report: RunReport) -> bool:
        """Read and store the next window; False when caught up with the head."""
        cursor = self._cursor()
        start = cursor["indexed_block"] + 1
        if start > report.head:
            report.head = self.client.head()
            if start > report.head:
                return False
        window = int(cursor["window_blocks"])
        while True:
            end = min(report.head, start + window - 1)
            try:
                raw_logs = self.client.logs(self.deployment, start, end)
                break
            except ProviderError as exc:
                if window <= WINDOW_MIN:
                    raise
                window = max(WINDOW_MIN, window // 2)
                report.shrinks += 1
                log.info("indexer.window_shrunk", blocks=window, error=str(exc)[:200])
        unsafe_from = report.head - self.confirmations - REORG_MARGIN
        numbers = {log_.block_number for log_ in raw_logs} | {end}
        numbers |= set(range(max(start, unsafe_from), end + 1))
        if start - 1 >= self.deployment.start_block:
            numbers.add(start - 1)
        headers = self.client.headers(sorted(numbers))
        self._check_links(headers, raw_logs, start)
        events = []
        for raw in raw_logs:
            decoded = self.decode(raw)
            if decoded is None:
                continue  # a log of ours we do not model (e.g. role admin events)
            name, args = decoded
            events.append((raw, name, args))
        with self.engine.begin() as conn:
            current = self._cursor(conn)
            if current["indexed_block"] != cursor["indexed_block"]:
                raise RuntimeError("another indexer moved the cursor while this one held the lock")
            self._store_blocks(conn, [h for n, h in headers.items() if h is not None and n >= start])
            report.events_stored += self._store_events(conn, events)
            # Grow again after quiet windows, up to the configured maximum.
            grown = min(self.window_max, window * 2) if len(raw_logs) < 1000 else window
            conn.execute(
                sa.text(
                    "UPDATE chain_cursors SET indexed_block = :e, window_blocks = :w, updated_at = now()"
                    " WHERE chain_id = :c"
                ),
                {"c": self.chain_id, "e": end, "w": grown},
            )
        report.windows += 1
        return bool(end < report.head)

    def _check_links(
        self, headers: Mapping[int, Header | None], raw_logs: Sequence[RawLog], start: int
    ) -> None:
        for raw in raw_logs:
            header = headers.get(raw.block_number)
            if header is None or header.hash != raw.block_hash:
                raise ReorgDuringRead(f"block {raw.block_number} changed while its logs were read")
        numbers = sorted(n for n, h in headers.items() if h is not None)
        missing = [n for n, h in headers.items() if h is None]
        if missing:
            raise ReorgDuringRead(f"blocks {missing[:5]} vanished while being read")
        for previous, number in itertools.pairwise(numbers):
            prev_header, header = headers[previous], headers[number]
            if number != previous + 1 or prev_header is None or header is None:
                continue
            if header.parent_hash != prev_header.hash:
                raise ReorgDuringRead(f"block {number} does not follow block {previous}")
        first = headers.get(start)
        if first is not None:
            with self.engine.connect() as conn:
                stored = conn.execute(
                    sa.text("SELECT hash FROM chain_blocks WHERE chain_id = :c AND number = :n"),
                    {"c": self.chain_id, "n": start - 1},
                ).scalar()
            if stored is not None and first.parent_hash != stored:
                raise ReorgDuringRead(f"block {start} does not follow the stored block {start - 1}")

    def _store_blocks(self, conn: sa.Connection, headers: Sequence[Header]) -> None:
        if not headers:
            return
        conn.execute(
            sa.text(
                "INSERT INTO chain_blocks (chain_id, number, hash, parent_hash, block_time)"
                " SELECT :c, * FROM unnest(CAST(:n AS bigint[]), CAST(:h AS text[]), CAST(:p AS text[]),"
                " CAST(:t AS timestamptz[]))"
                " ON CONFLICT (chain_id, number) DO UPDATE SET hash = EXCLUDED.hash,"
                " parent_hash = EXCLUDED.parent_hash, block_time = EXCLUDED.block_time"
            ),
            {
                "c": self.chain_id,
                "n": [h.number for h in headers],
                "h": [h.hash for h in headers],
                "p": [h.parent_hash for h in headers],
                "t": [h.block_time for h in headers],
            },
        )

    def _store_events(self, conn: sa.Connection, events: Sequence[tuple[RawLog, str, dict[str, Any]]]) -> int:
        if not events:
            return 0
        # One JSON document for the whole window: PostgreSQL parses it far faster than the driver
        # builds seven text arrays of tens of thousands of elements.
        rows = json.dumps(
            [
                {
                    "bn": r.block_number,
                    "bh": r.block_hash,
                    "tx": r.tx_hash,
                    "li": r.log_index,
                    "ct": r.address,
                    "ev": name,
                    "args": args,
                }
                for r, name, args in events
            ]
        )
        stored = conn.execute(
            sa.text(
                "WITH stored AS (INSERT INTO chain_events (chain_id, block_number, block_hash, tx_hash,"
                " log_index, contract, event, args)"
                " SELECT :c, r.bn, r.bh, r.tx, r.li, r.ct, r.ev, r.args"
                " FROM json_to_recordset(CAST(:rows AS json))"
                " AS r(bn bigint, bh text, tx text, li integer, ct text, ev text, args jsonb)"
                " ON CONFLICT (chain_id, block_hash, log_index) WHERE status = 'canonical'"
                " DO NOTHING RETURNING 1) SELECT count(*) FROM stored"
            ),
            {"c": self.chain_id, "rows": rows},
        ).scalar_one()
        return int(stored)

    # -- handling --------------------------------------------------------------------------

    def _handle_confirmed(self, report: RunReport) -> None:
        """Book every canonical event at confirmation depth, in chain order, in bounded batches."""
        safe = min(report.head - self.confirmations, self._cursor()["indexed_block"])
        while True:
            with self.engine.begin() as conn:
                events = self._unhandled(conn, safe)
                if events:
                    self._book(conn, events, report)
                    conn.execute(
                        sa.text("UPDATE chain_events SET handled_at = now() WHERE id = ANY(:ids)"),
                        {"ids": [e.id for e in events]},
                    )
                    report.events_handled += len(events)
                if len(events) < HANDLE_BATCH:
                    conn.execute(
                        sa.text(
                            "UPDATE chain_cursors SET handled_block = GREATEST(handled_block, :s),"
                            " updated_at = now() WHERE chain_id = :c"
                        ),
                        {"c": self.chain_id, "s": safe},
                    )
                    return

    def _unhandled(self, conn: sa.Connection, safe: int) -> list[_Event]:
        """The next confirmed events in chain order: about HANDLE_BATCH of them, always whole blocks
        (a transaction's logs are handled together, so one can explain another)."""
        rows = conn.execute(
            sa.text(
                "WITH pending AS (SELECT block_number, log_index FROM chain_events"
                " WHERE chain_id = :c AND status = 'canonical' AND handled_at IS NULL"
                " AND block_number <= :s),"
                " cut AS (SELECT block_number FROM pending ORDER BY block_number, log_index"
                " OFFSET :n - 1 LIMIT 1)"
                " SELECT id, block_number, block_hash, tx_hash, log_index, contract, event, args"
                " FROM chain_events WHERE chain_id = :c AND status = 'canonical' AND handled_at IS NULL"
                " AND block_number <= LEAST(:s, COALESCE((SELECT block_number FROM cut), :s))"
                " ORDER BY block_number, log_index FOR UPDATE"
            ),
            {"c": self.chain_id, "s": safe, "n": HANDLE_BATCH},
        ).all()
        return [
            _Event(
                r.id,
                ChainRef(self.chain_id, r.tx_hash, r.log_index, r.block_number, r.block_hash),
                r.contract,
                r.event,
                r.args,
            )
            for r in rows
        ]

    def _book(self, conn: sa.Connection, events: Sequence[_Event], report: RunReport) -> None:
        custody_set = self.deployment.custody
        # Only transfers into or out of a custody address book anything; the lookups below are
        # made for those alone.
        transfers = [
            e
            for e in events
            if e.event == "Transfer"
            and e.contract == self.deployment.token
            and (str(e.args["from"]).lower() in custody_set or str(e.args["to"]).lower() in custody_set)
        ]
        if transfers:
            self._book_transfers(conn, events, transfers, report)
        # Domain events after the transfers they explain, in the same transaction.
        escrow_events.apply_events(conn, self.deployment.escrow, events)
        staking_events.apply_events(conn, self.deployment.vault, events)

    def _book_transfers(
        self, conn: sa.Connection, events: Sequence[_Event], transfers: Sequence[_Event], report: RunReport
    ) -> None:
        custody_set = self.deployment.custody
        outbox_txs = _outbox_tx_hashes(conn, {e.chain.tx_hash for e in transfers})
        generations = _generations(conn, self.chain_id, transfers)
        by_tx: dict[str, list[_Event]] = {}
        for event in events:
            by_tx.setdefault(event.chain.tx_hash, []).append(event)
        commands: list[Command] = []
        unexplained: list[bool] = []
        for event in transfers:
            transfer = custody.TokenTransfer(
                event.chain,
                str(event.args["from"]).lower(),
                str(event.args["to"]).lower(),
                int(event.args["value"]),
            )
            if event.chain.tx_hash in outbox_txs:
                counter: str | None = custody.clearing_code(self.chain_id)
            else:
                counter = escrow_events.explain_transfer(
                    conn, self.deployment.escrow, transfer, by_tx[event.chain.tx_hash]
                )
                if counter is None:
                    counter = staking_events.explain_transfer(
                        conn, self.deployment.vault, transfer, by_tx[event.chain.tx_hash]
                    )
            booking = custody.book_custody_transfer(
                transfer,
                custody_set,
                counter,
                generations.get((event.chain.tx_hash, event.chain.log_index), 0),
            )
            if booking is None:
                continue
            commands.append(booking.entry)
            unexplained.append(booking.unexplained)
        results = post_batch(conn, commands)
        breaks: list[exceptions_queue.NewException] = []
        for command, result, is_unexplained in zip(commands, results, unexplained, strict=True):
            if result.status == "created":
                report.entries_booked += 1
            if result.status == "rejected":
                kind, details = "booking_rejected", {"code": result.code, "reason": result.reason}
            elif is_unexplained:
                kind, details = "unexplained_transfer", dict(command.metadata)
            else:
                continue
            breaks.append(
                exceptions_queue.NewException(command.key, kind, details, command.chain, command.key)
            )
        report.exceptions_raised += exceptions_queue.open_exceptions(conn, breaks)


def _outbox_tx_hashes(conn: sa.Connection, hashes: set[str]) -> set[str]:
    rows = conn.execute(
        sa.text("SELECT tx_hash FROM chain_tx_attempts WHERE tx_hash = ANY(:h)"), {"h": sorted(hashes)}
    ).scalars()
    return set(rows)


def _generations(conn: sa.Connection, chain_id: int, events: Sequence[_Event]) -> dict[tuple[str, int], int]:
    """How many earlier copies of each log were booked and then orphaned by a reorg."""
    rows = conn.execute(
        sa.text(
            "SELECT tx_hash, log_index, count(*) AS n FROM chain_events"
            " WHERE chain_id = :c AND status = 'orphaned' AND handled_at IS NOT NULL"
            " AND tx_hash = ANY(:tx) GROUP BY tx_hash, log_index"
        ),
        {"c": chain_id, "tx": sorted({e.chain.tx_hash for e in events})},
    ).all()
    return {(r.tx_hash, r.log_index): int(r.n) for r in rows}


def run_forever(indexer: Indexer, interval_s: float, stop: Callable[[], bool]) -> None:
    """Run the indexer every ``interval_s`` until ``stop()`` (the standalone loop of `tracechain index`)."""
    while not stop():
        try:
            report = indexer.run_once()
            log.info("indexer.run", **report.as_dict())
        except ProviderError as exc:
            log.warning("indexer.provider_error", error=str(exc)[:300])
        time.sleep(interval_s)
