"""The batch posting engine.

One call books a batch of commands inside the caller's transaction:

1. read the entries the batch names (its own keys, holds to resolve, entries to reverse);
2. lock every touched account row ``FOR UPDATE`` in ascending id order (no deadlocks);
3. validate each command in order against the in-memory balances; a command that fails is
   rejected alone and its batch-mates go on;
4. insert all entries and all transfers with two COPY statements; the statement trigger
   ``ledger_apply_transfers`` re-checks everything and updates each touched account once.

PostgreSQL enforces every invariant again on its side (constraints, triggers, privileges), so
a bug here can only make a batch fail, never make the books wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa

from ledger import audit
from ledger.audit import Actor, AuditRecord
from ledger.commands import (
    BATCH_MAX_COMMANDS,
    MAX_LEGS,
    Command,
    EntryResult,
    Leg,
    NewEntry,
    Resolve,
    Reverse,
)
from ledger.errors import LedgerError

_ENTRY_COLUMNS = (
    "id, idempotency_key, kind, content_hash, metadata, effective_at, posted_at,"
    " reverses_entry_id, chain_id, tx_hash, log_index, block_number, block_hash"
)
# Binary COPY spares the server parsing five numeric columns a row.
_TRANSFER_TYPES = [
    "int8", "int8", "text", "int8", "int8", "int4", "numeric", "int8", "timestamptz",
    "timestamptz", "int8", "numeric", "numeric", "numeric", "numeric",
]  # fmt: skip
_TRANSFER_COLUMNS = (
    "id, entry_id, kind, debit_account_id, credit_account_id, asset_id, amount, pending_id,"
    " timeout_at, posted_at, block_number, debit_posted_after, debit_pending_after,"
    " credit_posted_after, credit_pending_after"
)


@dataclass(slots=True)
class _Account:
    id: int
    code: str
    asset_id: int
    debits_must_not_exceed_credits: bool
    credits_must_not_exceed_debits: bool
    closed: bool
    # [debits_posted, credits_posted, debits_pending, credits_pending]
    balances: list[int]


@dataclass(slots=True)
class _Hold:
    """A pending transfer that a Resolve command may post, void or expire."""

    transfer_id: int
    debit_account_id: int
    credit_account_id: int
    asset_id: int
    amount: int
    timeout_at: datetime | None
    resolved: bool = False


@dataclass(slots=True)
class _KnownEntry:
    id: int
    content_hash: bytes
    transfers: list[tuple[int, str, int, int, int, int]] = field(default_factory=list)
    reversed: bool = False


@dataclass(slots=True)
class _Plan:
    """Rows to insert for the accepted commands of one batch."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)
    transfers: list[list[Any]] = field(default_factory=list)


# (transfer kind, debit, credit, amount, amount held by the resolved hold, resolved hold id)
_LegPlan = tuple[str, _Account, _Account, int, int, int | None]


class _Reject(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def raw_connection(conn: sa.Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy connection (same transaction)."""
    driver = conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError("the ledger engine needs the psycopg 3 driver")
    return driver


def post_batch(
    conn: sa.Connection,
    commands: Sequence[Command],
    actors: Sequence[Actor | None] | None = None,
) -> list[EntryResult]:
    """Book ``commands`` in order inside the caller's transaction; one result per command.

    ``actors`` (aligned with ``commands``) names who asked for each; every entry created for
    an actor gets an audit record in the same transaction.

    The caller commits. If PostgreSQL refuses the batch (which the checks here should make
    impossible), the exception propagates and the caller retries the commands one by one.
    """
    if len(commands) > BATCH_MAX_COMMANDS:
        raise LedgerError("batch_too_large", f"at most {BATCH_MAX_COMMANDS} commands a batch")
    if not commands:
        return []
    if actors is not None and len(actors) != len(commands):
        raise ValueError("actors must align with commands")
    raw = raw_connection(conn)
    with raw.cursor() as cur:
        results = _Batch(cur, commands).run()
    if actors is not None:
        audit.record(
            conn,
            [
                AuditRecord(actor, f"entry.{command.kind}", f"entry:{result.key}", None, result.as_dict())
                for command, result, actor in zip(commands, results, actors, strict=True)
                if actor is not None and result.status == "created"
            ],
        )
    return results


class _Batch:
    def __init__(self, cur: psycopg.Cursor[Any], commands: Sequence[Command]) -> None:
        self.cur = cur
        self.commands = commands
        self.known: dict[str, _KnownEntry] = {}
        self.holds: dict[str, _Hold | None] = {}
        self.accounts_by_code: dict[str, _Account] = {}
        self.accounts_by_id: dict[int, _Account] = {}
        self.asset_ids: dict[str, int] = {}
        self.now: datetime
        # Ids drawn from the sequences once the accounts are locked, used in batch order.
        self.entry_ids: list[int] = []
        self.transfer_ids: list[int] = []
        self.next_entry = 0
        self.next_transfer = 0
        self.plan = _Plan()
        # Entries accepted earlier in this batch, by key.
        self.batch_entries: dict[str, _KnownEntry] = {}

    # --- reading -------------------------------------------------------------------------

    def _load_entries(self) -> None:
        keys = {c.key for c in self.commands}
        refs = {c.pending_key for c in self.commands if isinstance(c, Resolve)}
        refs |= {c.entry_key for c in self.commands if isinstance(c, Reverse)}
        # One index probe per key, whatever the planner would guess for `= ANY` on a big table.
        self.cur.execute(
            "SELECT e.idempotency_key, e.id, e.content_hash,"
            " EXISTS (SELECT 1 FROM ledger_entries r WHERE r.reverses_entry_id = e.id)"
            " FROM unnest(%s::text[]) AS k(key)"
            " CROSS JOIN LATERAL (SELECT * FROM ledger_entries x WHERE x.idempotency_key = k.key) e",
            (list(keys | refs),),
            binary=True,
        )
        for key, entry_id, digest, was_reversed in self.cur.fetchall():
            self.known[key] = _KnownEntry(entry_id, bytes(digest), reversed=was_reversed)
        ref_ids = [self.known[k].id for k in refs if k in self.known]
        if ref_ids:
            self.cur.execute(
                "SELECT entry_id, id, kind, debit_account_id, credit_account_id, asset_id,"
                " amount::text, timeout_at FROM ledger_transfers WHERE entry_id = ANY(%s) ORDER BY id",
                (ref_ids,),
            )
            key_of = {k.id: key for key, k in self.known.items()}
            for entry_id, tid, kind, debit, credit, asset, amount, timeout in self.cur.fetchall():
                key = key_of[entry_id]
                self.known[key].transfers.append((tid, kind, debit, credit, asset, int(amount)))
                if kind == "pending":
                    self.holds[key] = _Hold(tid, debit, credit, asset, int(amount), timeout)

    def _lock_accounts(self) -> None:
        codes: set[str] = set()
        for c in self.commands:
            if isinstance(c, NewEntry):
                for leg in c.legs:
                    codes.add(leg.debit)
                    codes.add(leg.credit)
        ids: set[int] = set()
        for known in self.known.values():
            for _tid, _kind, debit, credit, _asset, _amount in known.transfers:
                ids.add(debit)
                ids.add(credit)
        self.cur.execute(
            "SELECT a.id, a.code, a.asset_id, a.debits_must_not_exceed_credits,"
            " a.credits_must_not_exceed_debits, a.closed, a.debits_posted::text,"
            " a.credits_posted::text, a.debits_pending::text, a.credits_pending::text"
            # Conditions on the row itself, not a join: when a row is updated by a batch we wait
            # for, PostgreSQL re-checks the condition on its new version, and code and id never
            # change. Written as a semi-join, the re-check dropped such rows, so a busy account
            # looked as if it did not exist. (An id array computed first also worked, at a
            # third more time a row.)
            " FROM ledger_accounts a WHERE a.code = ANY(%s) OR a.id = ANY(%s::bigint[])"
            " ORDER BY a.id FOR UPDATE",
            (list(codes), list(ids)),
            binary=True,  # thousands of codes: binary arrays need no quoting
        )
        for row in self.cur.fetchall():
            account = _Account(row[0], row[1], row[2], row[3], row[4], row[5], [int(v) for v in row[6:10]])
            self.accounts_by_code[account.code] = account
            self.accounts_by_id[account.id] = account
        self._read_clock_and_ids()

    def _read_clock_and_ids(self) -> None:
        """Once the accounts are locked: the booking time, fresh ids, holds already resolved.

        Taken after the locks, the booking time and the ids of a batch come after those of
        every earlier batch on the same accounts, so each account's history is ordered by both.
        """
        hold_ids = [h.transfer_id for h in self.holds.values() if h is not None]
        n_transfers = 0
        for c in self.commands:
            if isinstance(c, NewEntry):
                n_transfers += len(c.legs)
            elif isinstance(c, Resolve):
                n_transfers += 1
            else:
                target = self.known.get(c.entry_key)
                n_transfers += len(target.transfers) if target is not None else MAX_LEGS
        self.cur.execute(
            "SELECT clock_timestamp(),"
            " (SELECT coalesce(array_agg(pending_id), '{}') FROM ledger_transfers"
            "  WHERE pending_id = ANY(%s)),"
            " (SELECT array_agg(nextval('ledger_entries_id_seq')) FROM generate_series(1, %s)),"
            " (SELECT array_agg(nextval('ledger_transfers_id_seq')) FROM generate_series(1, %s))",
            (hold_ids, len(self.commands), n_transfers),
        )
        row = self.cur.fetchone()
        if row is None:
            raise RuntimeError("clock query returned nothing")
        self.now = row[0]
        resolved = set(row[1])
        for hold in self.holds.values():
            if hold is not None and hold.transfer_id in resolved:
                hold.resolved = True
        # Ids of rejected commands are never used: a gap, as any sequence may leave.
        self.entry_ids = sorted(row[2])
        self.transfer_ids = sorted(row[3] or [])

    def _load_assets(self) -> None:
        self.cur.execute("SELECT code, id FROM ledger_assets")
        self.asset_ids = dict(self.cur.fetchall())

    # --- validating ----------------------------------------------------------------------

    def run(self) -> list[EntryResult]:
        self._load_entries()
        self._lock_accounts()
        if any(isinstance(c, NewEntry) and any(leg.asset for leg in c.legs) for c in self.commands):
            self._load_assets()
        results = [self._one(c) for c in self.commands]
        if self.plan.entries:
            self._insert()
        return results

    def _one(self, command: Command) -> EntryResult:
        key = command.key
        # Booked before (committed) or earlier in this batch: the same key books nothing new.
        earlier = self.known.get(key) or self.batch_entries.get(key)
        if earlier is not None:
            if earlier.content_hash == command.content_hash:
                return EntryResult(key, "exists", earlier.id)
            return _rejected(
                key, "idempotency_conflict", f"key {key!r} was already used for a different entry"
            )
        try:
            reverses = None
            if isinstance(command, NewEntry):
                legs = self._plan_new(command)
            elif isinstance(command, Resolve):
                legs = self._plan_resolve(command)
            else:
                legs, reverses = self._plan_reverse(command)
            entry_id = self._accept(command, legs, reverses)
        except _Reject as exc:
            return _rejected(key, exc.code, exc.reason)
        except LedgerError as exc:
            return _rejected(key, exc.code, exc.message)
        return EntryResult(key, "created", entry_id)

    def _account(self, code: str) -> _Account:
        account = self.accounts_by_code.get(code)
        if account is None:
            raise _Reject("unknown_account", f"account {code!r} does not exist")
        return account

    def _plan_new(self, entry: NewEntry) -> list[_LegPlan]:
        out: list[_LegPlan] = []
        for leg in entry.legs:
            debit, credit = self._account(leg.debit), self._account(leg.credit)
            _check_pair(debit, credit, leg, self.asset_ids)
            out.append(("pending" if leg.pending else "posted", debit, credit, leg.amount, 0, None))
        return out

    def _plan_resolve(self, command: Resolve) -> list[_LegPlan]:
        if command.pending_key not in self.holds:
            if command.pending_key in self.known or command.pending_key in self.batch_entries:
                raise _Reject("not_a_hold", f"entry {command.pending_key!r} is not a hold")
            raise _Reject("unknown_pending", f"no hold was booked under {command.pending_key!r}")
        hold = self.holds[command.pending_key]
        if hold is None:
            raise _Reject("unknown_pending", f"no hold was booked under {command.pending_key!r}")
        if hold.resolved:
            raise _Reject(
                "pending_already_resolved",
                f"the hold {command.pending_key!r} was already posted, voided or expired",
            )
        expired = hold.timeout_at is not None and hold.timeout_at <= self.now
        if command.action == "expire" and not expired:
            raise _Reject("pending_not_expired", f"the hold {command.pending_key!r} has not timed out")
        if command.action != "expire" and expired:
            raise _Reject("pending_expired", f"the hold {command.pending_key!r} has timed out")
        amount = hold.amount
        if command.action == "post" and command.amount is not None:
            if command.amount > hold.amount:
                raise _Reject(
                    "exceeds_pending_amount",
                    f"cannot post {command.amount}: the hold is for {hold.amount}",
                )
            amount = command.amount
        debit = self.accounts_by_id[hold.debit_account_id]
        credit = self.accounts_by_id[hold.credit_account_id]
        if debit.closed or credit.closed:
            raise _Reject("account_closed", "an account of the hold is closed")
        return [(command.kind, debit, credit, amount, hold.amount, hold.transfer_id)]

    def _plan_reverse(self, command: Reverse) -> tuple[list[_LegPlan], int]:
        target = self.known.get(command.entry_key) or self.batch_entries.get(command.entry_key)
        if target is None:
            raise _Reject("unknown_entry", f"no entry was booked under {command.entry_key!r}")
        if target.reversed:
            raise _Reject("already_reversed", f"entry {command.entry_key!r} was already reversed")
        out: list[_LegPlan] = []
        for _tid, kind, debit_id, credit_id, _asset, amount in target.transfers:
            if kind not in ("posted", "post_pending"):
                raise _Reject(
                    "not_reversible",
                    f"entry {command.entry_key!r} holds or releases funds; void the hold instead",
                )
            debit, credit = self.accounts_by_id[credit_id], self.accounts_by_id[debit_id]
            if debit.closed or credit.closed:
                raise _Reject("account_closed", "an account of the entry is closed")
            out.append(("posted", debit, credit, amount, 0, None))
        return out, target.id

    # --- applying in memory --------------------------------------------------------------

    def _accept(
        self,
        command: Command,
        legs: list[_LegPlan],
        reverses: int | None,
    ) -> int:
        """Apply ``legs`` atomically to the in-memory balances; plan the rows; return an id."""
        now = self.now
        # The ids this entry takes if it is accepted; nothing advances before it is.
        entry_id = self.entry_ids[self.next_entry]
        next_transfer = self.next_transfer
        timeout_at = None
        if isinstance(command, NewEntry) and command.legs[0].timeout_s is not None:
            timeout_at = now + timedelta(seconds=command.legs[0].timeout_s)
        chain = command.chain
        block = chain.block_number if chain is not None else None
        touched: dict[int, list[int]] = {}
        planned: list[list[Any]] = []
        for kind, debit, credit, amount, held, pending_id in legs:
            d = touched.get(debit.id)
            if d is None:
                d = touched[debit.id] = list(debit.balances)
            c = touched.get(credit.id)
            if c is None:
                c = touched[credit.id] = list(credit.balances)
            if kind == "posted":
                d[0] += amount
                c[1] += amount
            elif kind == "pending":
                d[2] += amount
                c[3] += amount
            else:
                if kind == "post_pending":
                    d[0] += amount
                    c[1] += amount
                d[2] -= held
                c[3] -= held
            # The balances after this transfer, as the row records them.
            planned.append(
                [
                    self.transfer_ids[next_transfer],
                    entry_id,
                    kind,
                    debit.id,
                    credit.id,
                    debit.asset_id,
                    amount,
                    pending_id,
                    timeout_at if kind == "pending" else None,
                    now,
                    block,
                    d[0],
                    d[2],
                    c[1],
                    c[3],
                ]
            )
            next_transfer += 1
        for account_id, bal in touched.items():
            account = self.accounts_by_id[account_id]
            if account.debits_must_not_exceed_credits and bal[0] + bal[2] > bal[1]:
                raise _Reject(
                    "exceeds_credits",
                    f"account {account.code!r} would have debits above its credits",
                )
            if account.credits_must_not_exceed_debits and bal[1] + bal[3] > bal[0]:
                raise _Reject(
                    "exceeds_debits",
                    f"account {account.code!r} would have credits above its debits",
                )
        for account_id, bal in touched.items():
            self.accounts_by_id[account_id].balances = bal
        self.next_entry += 1
        self.next_transfer = next_transfer
        self.plan.transfers.extend(planned)
        first_transfer_id = planned[0][0]
        effective = getattr(command, "effective_at", None) or self.now
        chain_cols = chain.as_list() if chain is not None else [None] * 5
        self.plan.entries.append(
            (
                entry_id,
                command.key,
                command.kind,
                command.content_hash,
                command.metadata_json,
                effective,
                self.now,
                reverses,
                *chain_cols,
            )
        )
        self.batch_entries[command.key] = _KnownEntry(
            entry_id, command.content_hash, [(0, r[2], r[3], r[4], r[5], r[6]) for r in planned]
        )
        if isinstance(command, NewEntry) and command.legs[0].pending:
            # A hold booked in this batch may be resolved later in the same batch.
            _tid, _entry, _kind, debit_id, credit_id, asset_id, amount = planned[0][:7]
            self.holds[command.key] = _Hold(
                first_transfer_id, debit_id, credit_id, asset_id, amount, timeout_at
            )
        if isinstance(command, Reverse):
            (self.known.get(command.entry_key) or self.batch_entries[command.entry_key]).reversed = True
        if isinstance(command, Resolve):
            hold = self.holds[command.pending_key]
            if hold is not None:
                hold.resolved = True
        return entry_id

    # --- writing -------------------------------------------------------------------------

    def _insert(self) -> None:
        """Insert the planned entries and transfers: two COPY statements."""
        with self.cur.copy(f"COPY ledger_entries ({_ENTRY_COLUMNS}) FROM STDIN") as copy:
            for entry in self.plan.entries:
                copy.write_row(entry)
        with self.cur.copy(f"COPY ledger_transfers ({_TRANSFER_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_TRANSFER_TYPES)
            for transfer in self.plan.transfers:
                copy.write_row(transfer)


def _check_pair(debit: _Account, credit: _Account, leg: Leg, asset_ids: dict[str, int]) -> None:
    if debit.asset_id != credit.asset_id:
        raise _Reject("asset_mismatch", f"accounts {debit.code!r} and {credit.code!r} hold different assets")
    if leg.asset is not None:
        asset_id = asset_ids.get(leg.asset)
        if asset_id is None:
            raise _Reject("unknown_asset", f"asset {leg.asset!r} does not exist")
        if asset_id != debit.asset_id:
            raise _Reject("asset_mismatch", f"account {debit.code!r} does not hold {leg.asset}")
    if debit.closed or credit.closed:
        closed = debit.code if debit.closed else credit.code
        raise _Reject("account_closed", f"account {closed!r} is closed")


def _rejected(key: str, code: str, reason: str) -> EntryResult:
    return EntryResult(key, "rejected", None, code, reason)
