"""Reconciliation: proving, at a block, that the books match the chain (DESIGN §10).

Two levels, both set-based:

- **Transfer level.** Every confirmed TRACE ``Transfer`` log in the block range that touches a
  custody address is matched with the custody booking of the same chain reference
  (``chain_id, tx_hash, log_index``); every mint to a claimant (from the zero address to an
  address outside custody) with what the books posted to ``minted:{chain_id}`` for the same
  transaction. One SQL statement classifies each pair: ``matched``, ``chain_only`` (the chain
  moved tokens the books do not show), ``ledger_only`` (the books show a movement the canonical
  chain does not have, or a chain action the platform sent and has not seen land within the
  window), ``mismatched`` (both sides exist, amount or party differ).
- **Balance level.** Each custody mirror's balance at the run's last block against the token's
  ``balanceOf`` at that block, and the books' total minted to claimants against the chain's.

A run is stored once with its counts, block range, per-address drift and duration; each break
is stored with it and raised in the exceptions queue under a key that does not change between
runs, so a break found again is not raised twice.

No web3 here: the caller passes ``balance_of(address, block)``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import sqlalchemy as sa

from ledger import custody, history
from ledger.accounts import get_account
from ledger.commands import ChainRef
from ledger.errors import InvalidInput, NotFound
from ledger.exceptions_queue import NewException, open_exceptions

BalanceOf = Callable[[str, int], int]
Trigger = Literal["schedule", "on_demand"]
BREAK_CLASSES: Final = ("chain_only", "ledger_only", "mismatched")
REQUESTER_MAX_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class Scope:
    """What one run compares: a chain, its token and custody addresses, a block range."""

    chain_id: int
    token: str
    custody: frozenset[str]
    from_block: int
    to_block: int

    def __post_init__(self) -> None:
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise InvalidInput("chain_id must be a positive integer")
        object.__setattr__(self, "token", custody.check_address(self.token, "token"))
        object.__setattr__(
            self, "custody", frozenset(custody.check_address(a, "custody") for a in self.custody)
        )
        for name in ("from_block", "to_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"{name} must be a non-negative integer")
        if self.to_block < self.from_block:
            raise InvalidInput(f"to_block {self.to_block} is before from_block {self.from_block}")


@dataclass(frozen=True, slots=True)
class Break:
    """One difference between the books and the chain."""

    cls: str
    exception_key: str
    tx_hash: str | None = None
    log_index: int | None = None
    block_number: int | None = None
    block_hash: str | None = None
    entry_key: str | None = None
    address: str | None = None
    chain_amount: int | None = None
    ledger_amount: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "class": self.cls,
            "tx_hash": self.tx_hash,
            "log_index": self.log_index,
            "block_number": self.block_number,
            "entry_key": self.entry_key,
            "address": self.address,
            "chain_amount": None if self.chain_amount is None else str(self.chain_amount),
            "ledger_amount": None if self.ledger_amount is None else str(self.ledger_amount),
            "details": dict(self.details),
            "exception_key": self.exception_key,
        }


@dataclass(frozen=True, slots=True)
class TransferLevel:
    counts: Mapping[str, int]
    breaks: tuple[Break, ...]

    @property
    def checked(self) -> int:
        return sum(self.counts.values())


# One statement classifies every custody transfer, every mint to a claimant and every chain
# action still unseen, and returns the counts per class followed by the breaks themselves.
_TRANSFER_LEVEL = """
WITH ct AS MATERIALIZED (
    SELECT e.tx_hash, e.log_index, e.block_number, e.block_hash,
           lower(e.args->>'from') AS sender, lower(e.args->>'to') AS recipient,
           CAST(e.args->>'value' AS numeric) AS amount
      FROM chain_events e
     WHERE e.chain_id = :c AND e.status = 'canonical' AND e.contract = :token AND e.event = 'Transfer'
       AND e.block_number BETWEEN :lo AND :hi
       AND (lower(e.args->>'from') = ANY(:watch) OR lower(e.args->>'to') = ANY(:watch))),
lt AS MATERIALIZED (
    SELECT le.idempotency_key AS entry_key, le.tx_hash, le.log_index, le.block_number, le.block_hash,
           t.amount,
           le.metadata->>'from' AS sender, le.metadata->>'to' AS recipient
      FROM ledger_entries le JOIN ledger_transfers t ON t.entry_id = le.id
     WHERE le.chain_id = :c AND le.block_number BETWEEN :lo AND :hi
       AND le.kind IN ('chain.custody_transfer', 'chain.suspense')
       AND NOT EXISTS (SELECT 1 FROM ledger_entries r WHERE r.reverses_entry_id = le.id)),
cust AS (
    SELECT CASE WHEN c.tx_hash IS NULL THEN 'ledger_only'
                WHEN l.entry_key IS NULL THEN 'chain_only'
                WHEN c.amount = l.amount AND c.sender = l.sender AND c.recipient = l.recipient
                     THEN 'matched'
                ELSE 'mismatched' END AS class,
           'custody' AS scope,
           coalesce(c.tx_hash, l.tx_hash) AS tx_hash, coalesce(c.log_index, l.log_index) AS log_index,
           coalesce(c.block_number, l.block_number) AS block_number,
           coalesce(c.block_hash, l.block_hash) AS block_hash, l.entry_key,
           c.amount AS chain_amount, l.amount AS ledger_amount,
           jsonb_build_object('chain_from', c.sender, 'chain_to', c.recipient,
                              'ledger_from', l.sender, 'ledger_to', l.recipient) AS details
      FROM (SELECT * FROM ct WHERE sender = ANY(:custody) OR recipient = ANY(:custody)) c
      FULL JOIN lt l ON l.tx_hash = c.tx_hash AND l.log_index = c.log_index),
cm AS (
    SELECT tx_hash, min(log_index) AS log_index, min(block_number) AS block_number,
           min(block_hash) AS block_hash, sum(amount) AS amount,
           jsonb_agg(recipient ORDER BY log_index) AS recipients
      FROM ct WHERE sender = :zero AND NOT (recipient = ANY(:custody))
     GROUP BY tx_hash),
lm AS (
    SELECT le.metadata->>'tx_hash' AS tx_hash, min(le.idempotency_key) AS entry_key,
           min(CAST(le.metadata->>'block_number' AS bigint)) AS block_number,
           sum(CASE WHEN t.credit_account_id = m.id THEN t.amount ELSE -t.amount END) AS amount
      FROM ledger_accounts m
      JOIN ledger_transfers t ON (t.credit_account_id = m.id OR t.debit_account_id = m.id)
                             AND t.kind IN ('posted', 'post_pending')
      JOIN ledger_entries le ON le.id = t.entry_id
     WHERE m.code = :minted AND le.metadata ? 'tx_hash'
       AND CAST(le.metadata->>'block_number' AS bigint) BETWEEN :lo AND :hi
     GROUP BY 1),
mints AS (
    SELECT CASE WHEN c.tx_hash IS NULL THEN 'ledger_only'
                WHEN l.tx_hash IS NULL THEN 'chain_only'
                WHEN c.amount = l.amount THEN 'matched'
                ELSE 'mismatched' END AS class,
           'mint' AS scope,
           coalesce(c.tx_hash, l.tx_hash) AS tx_hash, c.log_index,
           coalesce(c.block_number, l.block_number) AS block_number, c.block_hash, l.entry_key,
           c.amount AS chain_amount, l.amount AS ledger_amount,
           jsonb_build_object('recipients', c.recipients) AS details
      FROM cm c FULL JOIN lm l ON l.tx_hash = c.tx_hash),
unseen AS (
    SELECT 'ledger_only' AS class, 'outbox' AS scope, o.tx_hash, NULL::integer AS log_index,
           NULL::bigint AS block_number, NULL AS block_hash, o.key AS entry_key,
           NULL::numeric AS chain_amount,
           NULL::numeric AS ledger_amount,
           jsonb_build_object('action', o.action, 'status', o.status, 'to', o.to_address,
                              'since', o.created_at) AS details
      FROM chain_outbox o
     WHERE o.chain_id = :c AND o.status IN ('signed', 'sent') AND o.created_at < :unseen_before),
found AS MATERIALIZED (
    SELECT * FROM cust UNION ALL SELECT * FROM mints UNION ALL SELECT * FROM unseen)
SELECT 'count' AS row_kind, class, NULL AS scope, count(*) AS n, NULL AS tx_hash,
       NULL::integer AS log_index, NULL::bigint AS block_number, NULL AS block_hash, NULL AS entry_key,
       NULL::text AS chain_amount, NULL::text AS ledger_amount, NULL::jsonb AS details
  FROM found GROUP BY class
UNION ALL
SELECT 'break', class, scope, NULL, tx_hash, log_index, block_number, block_hash, entry_key,
       CAST(chain_amount AS text), CAST(ledger_amount AS text), details
  FROM found WHERE class <> 'matched'
"""


def _exception_key(
    chain_id: int, cls: str, scope: str, tx_hash: str | None, log_index: int | None, entry_key: str | None
) -> str:
    if scope == "outbox":
        return f"recon:{cls}:outbox:{entry_key}"
    if scope == "mint":
        return f"recon:{cls}:mint:{chain_id}:{tx_hash}"
    return f"recon:{cls}:{chain_id}:{tx_hash}:{log_index}"


def transfer_level(conn: sa.Connection, scope: Scope, *, unseen_before: datetime) -> TransferLevel:
    """Classify every custody transfer and mint of ``scope``'s range (one statement)."""
    rows = conn.execute(
        sa.text(_TRANSFER_LEVEL),
        {
            "c": scope.chain_id,
            "token": scope.token,
            "lo": scope.from_block,
            "hi": scope.to_block,
            "custody": sorted(scope.custody),
            "watch": sorted({*scope.custody, custody.ZERO_ADDRESS}),
            "zero": custody.ZERO_ADDRESS,
            "minted": custody.minted_code(scope.chain_id),
            "unseen_before": unseen_before,
        },
    ).all()
    counts = {"matched": 0, **dict.fromkeys(BREAK_CLASSES, 0)}
    breaks: list[Break] = []
    for r in rows:
        cls = str(r._mapping["class"])
        if r.row_kind == "count":
            counts[cls] = int(r.n)
            continue
        breaks.append(
            Break(
                cls=cls,
                exception_key=_exception_key(
                    scope.chain_id, cls, r.scope, r.tx_hash, r.log_index, r.entry_key
                ),
                tx_hash=r.tx_hash,
                log_index=r.log_index,
                block_number=r.block_number,
                block_hash=r.block_hash,
                entry_key=r.entry_key,
                chain_amount=None if r.chain_amount is None else int(r.chain_amount),
                ledger_amount=None if r.ledger_amount is None else int(r.ledger_amount),
                details={"scope": r.scope, **{k: v for k, v in (r.details or {}).items() if v is not None}},
            )
        )
    breaks.sort(
        key=lambda b: (
            b.block_number if b.block_number is not None else -1,
            b.tx_hash or "",
            b.log_index if b.log_index is not None else -1,
            b.cls,
        )
    )
    return TransferLevel(counts, tuple(breaks))


@dataclass(frozen=True, slots=True)
class Balance:
    ledger: int
    chain: int

    @property
    def drift(self) -> int:
        """What the chain holds beyond what the books say (negative: the books say more)."""
        return self.chain - self.ledger

    def as_dict(self) -> dict[str, str]:
        return {"ledger": str(self.ledger), "chain": str(self.chain), "drift": str(self.drift)}


def mirror_balance_at(conn: sa.Connection, chain_id: int, address: str, block: int) -> int:
    """What the custody mirror of ``address`` says the address held at ``block`` (0 if never booked)."""
    try:
        account = get_account(conn, custody.mirror_code(chain_id, address))
    except NotFound:
        return 0
    totals = history.totals_at_block(conn, account, block)
    return totals.debits_posted - totals.credits_posted


def minted_at(conn: sa.Connection, chain_id: int, block: int) -> int:
    """What the books say was minted to claimants up to and including ``block``."""
    value = conn.execute(
        sa.text(
            "SELECT coalesce(sum(CASE WHEN t.credit_account_id = m.id THEN t.amount ELSE -t.amount END), 0)"
            " FROM ledger_accounts m"
            " JOIN ledger_transfers t ON (t.credit_account_id = m.id OR t.debit_account_id = m.id)"
            "  AND t.kind IN ('posted', 'post_pending')"
            " JOIN ledger_entries le ON le.id = t.entry_id"
            " WHERE m.code = :code AND coalesce(t.block_number,"
            "  CAST(le.metadata->>'block_number' AS bigint)) <= :b"
        ),
        {"code": custody.minted_code(chain_id), "b": block},
    ).scalar_one()
    return int(value)


def chain_minted_at(conn: sa.Connection, scope: Scope) -> int:
    """What the chain (as indexed, canonical) minted to addresses outside custody up to ``to_block``."""
    value = conn.execute(
        sa.text(
            "SELECT coalesce(sum(CAST(args->>'value' AS numeric)), 0) FROM chain_events"
            " WHERE chain_id = :c AND status = 'canonical' AND contract = :token AND event = 'Transfer'"
            " AND block_number <= :b AND lower(args->>'from') = :zero"
            " AND NOT (lower(args->>'to') = ANY(:custody))"
        ),
        {
            "c": scope.chain_id,
            "token": scope.token,
            "b": scope.to_block,
            "zero": custody.ZERO_ADDRESS,
            "custody": sorted(scope.custody),
        },
    ).scalar_one()
    return int(value)


@dataclass(frozen=True, slots=True)
class RunReport:
    id: int
    scope: Scope
    trigger: str
    requested_by: str
    counts: Mapping[str, int]
    balances: Mapping[str, Balance]
    minted: Balance
    breaks: tuple[Break, ...]
    exceptions_raised: int
    started_at: datetime
    finished_at: datetime
    duration_ms: float

    @property
    def balance_breaks(self) -> int:
        return sum(1 for b in self.balances.values() if b.drift != 0) + (1 if self.minted.drift != 0 else 0)

    @property
    def ok(self) -> bool:
        return not self.breaks

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.id,
            "chain_id": self.scope.chain_id,
            "from_block": self.scope.from_block,
            "to_block": self.scope.to_block,
            "trigger": self.trigger,
            "requested_by": self.requested_by,
            "ok": self.ok,
            "transfers_checked": sum(self.counts.values()),
            "counts": dict(self.counts),
            "balance_breaks": self.balance_breaks,
            "balances": {a: b.as_dict() for a, b in sorted(self.balances.items())},
            "minted": self.minted.as_dict(),
            "breaks": [b.as_dict() for b in self.breaks],
            "break_count": len(self.breaks),
            "exceptions_raised": self.exceptions_raised,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "duration_ms": round(self.duration_ms, 3),
        }


def run(
    conn: sa.Connection,
    scope: Scope,
    balance_of: BalanceOf,
    *,
    trigger: Trigger = "on_demand",
    requested_by: str = "system",
    unseen_within: timedelta = timedelta(hours=1),
) -> RunReport:
    """Reconcile ``scope`` in the caller's transaction: compare, store the run and its breaks, raise
    each break as an exception for finance. Run it in a REPEATABLE READ transaction for one snapshot."""
    if trigger not in ("schedule", "on_demand"):
        raise InvalidInput("trigger must be 'schedule' or 'on_demand'")
    if not isinstance(requested_by, str) or not 1 <= len(requested_by) <= REQUESTER_MAX_CHARS:
        raise InvalidInput(f"requested_by must be 1 to {REQUESTER_MAX_CHARS} characters")
    started_at = datetime.now(UTC)
    clock = time.perf_counter()
    transfers = transfer_level(conn, scope, unseen_before=started_at - unseen_within)
    balances = {
        address: Balance(
            mirror_balance_at(conn, scope.chain_id, address, scope.to_block),
            balance_of(address, scope.to_block),
        )
        for address in sorted(scope.custody)
    }
    minted = Balance(minted_at(conn, scope.chain_id, scope.to_block), chain_minted_at(conn, scope))
    breaks = list(transfers.breaks)
    for address, balance in balances.items():
        if balance.drift != 0:
            breaks.append(
                Break(
                    cls="balance_drift",
                    exception_key=f"recon:balance_drift:{scope.chain_id}:{address}:{scope.to_block}",
                    block_number=scope.to_block,
                    address=address,
                    chain_amount=balance.chain,
                    ledger_amount=balance.ledger,
                    details={"drift": str(balance.drift)},
                )
            )
    if minted.drift != 0:
        breaks.append(
            Break(
                cls="mint_drift",
                exception_key=f"recon:mint_drift:{scope.chain_id}:{scope.to_block}",
                block_number=scope.to_block,
                chain_amount=minted.chain,
                ledger_amount=minted.ledger,
                details={"drift": str(minted.drift)},
            )
        )
    finished_at = datetime.now(UTC)
    duration_ms = (time.perf_counter() - clock) * 1000.0
    balance_breaks = sum(1 for b in breaks if b.cls in ("balance_drift", "mint_drift"))
    run_id = conn.execute(
        sa.text(
            "INSERT INTO recon_runs (chain_id, from_block, to_block, trigger, requested_by,"
            " transfers_checked, matched, chain_only, ledger_only, mismatched, balance_breaks, balances,"
            " minted, started_at, finished_at, duration_ms, ok)"
            " VALUES (:c, :lo, :hi, :trigger, :by, :checked, :matched,"
            " :chain_only, :ledger_only, :mismatched, :bb, CAST(:balances AS jsonb), CAST(:minted AS jsonb),"
            " :started, :finished, :ms, :ok) RETURNING id"
        ),
        {
            "c": scope.chain_id,
            "lo": scope.from_block,
            "hi": scope.to_block,
            "trigger": trigger,
            "by": requested_by,
            "checked": transfers.checked,
            "matched": transfers.counts["matched"],
            "chain_only": transfers.counts["chain_only"],
            "ledger_only": transfers.counts["ledger_only"],
            "mismatched": transfers.counts["mismatched"],
            "bb": balance_breaks,
            "balances": json.dumps({a: b.as_dict() for a, b in balances.items()}, sort_keys=True),
            "minted": json.dumps(minted.as_dict(), sort_keys=True),
            "started": started_at,
            "finished": finished_at,
            "ms": round(duration_ms, 3),
            "ok": not breaks,
        },
    ).scalar_one()
    _store_breaks(conn, int(run_id), breaks)
    raised = open_exceptions(
        conn,
        [
            NewException(
                b.exception_key,
                f"recon_{b.cls}",
                {**b.as_dict(), "run_id": int(run_id)},
                ChainRef(scope.chain_id, b.tx_hash, b.log_index, b.block_number, b.block_hash)
                if b.tx_hash is not None
                and b.log_index is not None
                and b.block_number is not None
                and b.block_hash is not None
                else None,
                b.entry_key,
            )
            for b in breaks
        ],
    )
    return RunReport(
        int(run_id),
        scope,
        trigger,
        requested_by,
        dict(transfers.counts),
        balances,
        minted,
        tuple(breaks),
        raised,
        started_at,
        finished_at,
        duration_ms,
    )


def _store_breaks(conn: sa.Connection, run_id: int, breaks: Sequence[Break]) -> None:
    if not breaks:
        return
    conn.execute(
        sa.text(
            "INSERT INTO recon_breaks (run_id, class, tx_hash, log_index, block_number, entry_key, address,"
            " chain_amount, ledger_amount, details, exception_key)"
            " SELECT :run, * FROM unnest(CAST(:cls AS text[]), CAST(:tx AS text[]), CAST(:li AS integer[]),"
            " CAST(:bn AS bigint[]), CAST(:ek AS text[]), CAST(:addr AS text[]), CAST(:ca AS numeric[]),"
            " CAST(:la AS numeric[]), CAST(:details AS jsonb[]), CAST(:xk AS text[]))"
        ),
        {
            "run": run_id,
            "cls": [b.cls for b in breaks],
            "tx": [b.tx_hash for b in breaks],
            "li": [b.log_index for b in breaks],
            "bn": [b.block_number for b in breaks],
            "ek": [b.entry_key for b in breaks],
            "addr": [b.address for b in breaks],
            "ca": [None if b.chain_amount is None else str(b.chain_amount) for b in breaks],
            "la": [None if b.ledger_amount is None else str(b.ledger_amount) for b in breaks],
            "details": [json.dumps(dict(b.details), sort_keys=True, default=str) for b in breaks],
            "xk": [b.exception_key for b in breaks],
        },
    )


def confirmed_range(
    conn: sa.Connection, chain_id: int, start_block: int, *, from_block: int | None, to_block: int | None
) -> tuple[int, int]:
    """The block range a run may cover: from the deployment's start (or ``from_block``) to the last
    block whose events the indexer has handled at confirmation depth (or ``to_block``, which must
    not lie beyond it: the books cannot be compared with blocks they have not followed yet)."""
    handled = conn.execute(
        sa.text("SELECT handled_block FROM chain_cursors WHERE chain_id = :c"), {"c": chain_id}
    ).scalar_one_or_none()
    if handled is None or int(handled) < start_block:
        raise InvalidInput(
            f"the indexer has not handled any block of chain {chain_id} yet; nothing to reconcile"
        )
    lo = start_block if from_block is None else from_block
    hi = int(handled) if to_block is None else to_block
    for name, value in (("from_block", lo), ("to_block", hi)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"{name} must be a non-negative integer")
    if hi > int(handled):
        raise InvalidInput(
            f"to_block {hi} is beyond the last confirmed block the books have followed ({int(handled)})"
        )
    if lo > hi:
        raise InvalidInput(f"from_block {lo} is after to_block {hi}")
    return lo, hi


_RUN_COLUMNS = (
    "id, chain_id, from_block, to_block, trigger, requested_by, transfers_checked, matched, chain_only,"
    " ledger_only, mismatched, balance_breaks, balances, minted, started_at, finished_at, duration_ms, ok"
)


def _run_dict(row: Any) -> dict[str, Any]:
    return {
        "run_id": int(row.id),
        "chain_id": int(row.chain_id),
        "from_block": int(row.from_block),
        "to_block": int(row.to_block),
        "trigger": row.trigger,
        "requested_by": row.requested_by,
        "ok": bool(row.ok),
        "transfers_checked": int(row.transfers_checked),
        "counts": {
            "matched": int(row.matched),
            "chain_only": int(row.chain_only),
            "ledger_only": int(row.ledger_only),
            "mismatched": int(row.mismatched),
        },
        "balance_breaks": int(row.balance_breaks),
        "balances": row.balances,
        "minted": row.minted,
        "started_at": row.started_at.isoformat(),
        "finished_at": row.finished_at.isoformat(),
        "duration_ms": float(row.duration_ms),
    }


def get_run(conn: sa.Connection, run_id: int | None = None) -> dict[str, Any]:
    """A stored run with its breaks; the newest one when ``run_id`` is None."""
    if run_id is None:
        row = conn.execute(sa.text(f"SELECT {_RUN_COLUMNS} FROM recon_runs ORDER BY id DESC LIMIT 1")).first()
        if row is None:
            raise NotFound("no_run", "no reconciliation has run yet")
    else:
        if isinstance(run_id, bool) or not isinstance(run_id, int) or run_id <= 0:
            raise InvalidInput("run id must be a positive integer")
        row = conn.execute(
            sa.text(f"SELECT {_RUN_COLUMNS} FROM recon_runs WHERE id = :id"), {"id": run_id}
        ).first()
        if row is None:
            raise NotFound("unknown_run", f"no reconciliation run {run_id}")
    out = _run_dict(row)
    breaks = conn.execute(
        sa.text(
            "SELECT class, tx_hash, log_index, block_number, entry_key, address, chain_amount::text AS ca,"
            " ledger_amount::text AS la, details, exception_key FROM recon_breaks"
            " WHERE run_id = :id ORDER BY id"
        ),
        {"id": row.id},
    ).all()
    out["breaks"] = [
        {
            "class": b._mapping["class"],
            "tx_hash": b.tx_hash,
            "log_index": b.log_index,
            "block_number": b.block_number,
            "entry_key": b.entry_key,
            "address": b.address,
            "chain_amount": b.ca,
            "ledger_amount": b.la,
            "details": b.details,
            "exception_key": b.exception_key,
        }
        for b in breaks
    ]
    out["break_count"] = len(out["breaks"])
    return out


def list_runs(conn: sa.Connection, *, before_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Stored runs, newest first, keyset-paginated by id."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 500:
        raise InvalidInput("limit must be between 1 and 500")
    rows = conn.execute(
        sa.text(
            f"SELECT {_RUN_COLUMNS} FROM recon_runs WHERE (CAST(:before AS bigint) IS NULL OR id < :before)"
            " ORDER BY id DESC LIMIT :limit"
        ),
        {"before": before_id, "limit": limit},
    ).all()
    return [_run_dict(r) for r in rows]


# Which liabilities each kind of custody address backs, by account code pattern.
RESERVE_LIABILITIES: Final = {
    "escrow": ("escrow:%",),
    "vault": ("stake:%",),
    "treasury": ("rewards:%:payable",),
    "fee_wallet": (),
}


def proof_of_reserves(
    conn: sa.Connection, chain_id: int, roles: Mapping[str, str], block: int, balance_of: BalanceOf
) -> dict[str, Any]:
    """Per custody address (``roles``: role name -> address): the TRACE the books owe to others out of
    it (the posted balances of the liability accounts it backs), what the chain says it holds at
    ``block``, and the cover (holdings minus liabilities; never negative for a solvent platform)."""
    addresses: dict[str, Any] = {}
    solvent = True
    for role, address in sorted(roles.items()):
        patterns = RESERVE_LIABILITIES.get(role)
        if patterns is None:
            raise InvalidInput(f"unknown custody role {role!r}")
        owed = 0
        if patterns:
            owed = int(
                conn.execute(
                    sa.text(
                        "SELECT coalesce(sum(a.credits_posted - a.debits_posted), 0) FROM ledger_accounts a"
                        " JOIN ledger_assets s ON s.id = a.asset_id"
                        " WHERE s.code = :asset AND a.kind = 'liability' AND a.code LIKE ANY(:patterns)"
                    ),
                    {"asset": custody.TOKEN_ASSET, "patterns": list(patterns)},
                ).scalar_one()
            )
        held = balance_of(address, block)
        mirror = mirror_balance_at(conn, chain_id, address, block)
        cover = held - owed
        solvent = solvent and cover >= 0
        addresses[address] = {
            "role": role,
            "liabilities": str(owed),
            "on_chain": str(held),
            "ledger_mirror": str(mirror),
            "cover": str(cover),
            "covered": cover >= 0,
        }
    return {"chain_id": chain_id, "block": block, "addresses": addresses, "solvent": solvent}


_CSV_COLUMNS: Final = (
    "class",
    "tx_hash",
    "log_index",
    "block_number",
    "entry_key",
    "address",
    "chain_amount",
    "ledger_amount",
    "exception_key",
)


def breaks_csv(breaks: Iterable[Mapping[str, Any]]) -> str:
    """The breaks of a run as CSV, one line each, amounts in base units."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for b in breaks:
        writer.writerow(["" if b.get(c) is None else b.get(c) for c in _CSV_COLUMNS])
    return out.getvalue()


def summary_csv(run: Mapping[str, Any]) -> str:
    """A run's summary as CSV: one line per measure."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("measure", "value"))
    for name in ("run_id", "chain_id", "from_block", "to_block", "ok", "transfers_checked"):
        writer.writerow((name, run[name]))
    for name, value in run["counts"].items():
        writer.writerow((name, value))
    writer.writerow(("balance_breaks", run["balance_breaks"]))
    for address, balance in sorted(run["balances"].items()):
        writer.writerow((f"drift:{address}", balance["drift"]))
    writer.writerow(("drift:minted", run["minted"]["drift"]))
    return out.getvalue()


def open_exceptions_report(conn: sa.Connection, limit: int = 10_000) -> list[dict[str, Any]]:
    """The open exceptions queue, oldest first, each with its age in seconds."""
    rows = conn.execute(
        sa.text(
            "SELECT id, key, kind, chain_id, tx_hash, log_index, entry_key, details, created_at,"
            " EXTRACT(EPOCH FROM now() - created_at)::bigint AS age_s"
            " FROM finance_exceptions WHERE status = 'open' ORDER BY id LIMIT :limit"
        ),
        {"limit": limit},
    ).all()
    return [
        {
            "id": int(r.id),
            "key": r.key,
            "kind": r.kind,
            "chain_id": r.chain_id,
            "tx_hash": r.tx_hash,
            "log_index": r.log_index,
            "entry_key": r.entry_key,
            "details": r.details,
            "created_at": r.created_at.isoformat(),
            "age_s": int(r.age_s),
        }
        for r in rows
    ]


def exceptions_csv(exceptions: Iterable[Mapping[str, Any]]) -> str:
    """Open exceptions as CSV (details as compact JSON)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = ("id", "kind", "key", "tx_hash", "log_index", "entry_key", "created_at", "age_s")
    writer.writerow((*columns, "details"))
    for e in exceptions:
        writer.writerow(
            (
                *("" if e.get(c) is None else e.get(c) for c in columns),
                json.dumps(e.get("details") or {}, sort_keys=True, separators=(",", ":")),
            )
        )
    return out.getvalue()
