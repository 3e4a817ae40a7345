"""Balances as of a time or a block, and statements with running balances."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ledger.accounts import Account, get_account, normal_balance
from ledger.errors import InvalidInput

STATEMENT_MAX_LINES = 1000


@dataclass(frozen=True, slots=True)
class Totals:
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    def as_dict(self, account: Account) -> dict[str, Any]:
        return {
            "code": account.code,
            "asset": account.asset,
            "balance": str(normal_balance(account.kind, self.debits_posted, self.credits_posted)),
            "debits_posted": str(self.debits_posted),
            "credits_posted": str(self.credits_posted),
            "debits_pending": str(self.debits_pending),
            "credits_pending": str(self.credits_pending),
        }


def current_totals(account: Account) -> Totals:
    return Totals(
        account.debits_posted, account.credits_posted, account.debits_pending, account.credits_pending
    )


_SIDE_AS_OF = """
SELECT {side}_posted_after::text, {side}_pending_after::text FROM ledger_transfers
 WHERE {side}_account_id = :id AND {cond}
 ORDER BY posted_at DESC, id DESC LIMIT 1
"""


def _totals_where(conn: sa.Connection, account_id: int, cond: str, params: dict[str, Any]) -> Totals:
    """Totals after the newest transfer of the account matching ``cond`` (index lookups)."""
    out: list[int] = []
    for side in ("debit", "credit"):
        row = conn.execute(
            sa.text(_SIDE_AS_OF.format(side=side, cond=cond)), {"id": account_id, **params}
        ).first()
        out.extend((int(row[0]), int(row[1])) if row else (0, 0))
    return Totals(out[0], out[2], out[1], out[3])


def totals_as_of(conn: sa.Connection, account: Account, as_of: datetime) -> Totals:
    """The account's totals as the books stood at ``as_of`` (booking time)."""
    if as_of.tzinfo is None:
        raise InvalidInput("as-of time needs a time zone (e.g. 2026-01-01T00:00:00Z)")
    return _totals_where(conn, account.id, "posted_at <= :t", {"t": as_of})


def totals_at_block(conn: sa.Connection, account: Account, block_number: int) -> Totals:
    """The account's totals from chain-referenced entries up to and including ``block_number``.

    Entries without a chain reference do not count: custody mirror accounts are booked only
    from chain events, so for them this is what the chain said at that block.
    """
    if block_number < 0:
        raise InvalidInput("block number must not be negative")
    sums: list[int] = []
    for side in ("debit", "credit"):
        row = conn.execute(
            sa.text(
                "SELECT coalesce(sum(CASE WHEN t.kind IN ('posted', 'post_pending') THEN t.amount"
                " ELSE 0 END), 0)::text,"
                " coalesce(sum(CASE WHEN t.kind = 'pending' THEN t.amount WHEN t.kind = 'posted' THEN 0"
                " ELSE -p.amount END), 0)::text"
                " FROM ledger_transfers t LEFT JOIN ledger_transfers p ON p.id = t.pending_id"
                f" WHERE t.{side}_account_id = :id AND t.block_number <= :n"
            ),
            {"id": account.id, "n": block_number},
        ).one()
        sums.extend((int(row[0]), int(row[1])))
    return Totals(sums[0], sums[2], sums[1], sums[3])


def balance(
    conn: sa.Connection, code: str, *, as_of: datetime | None = None, at_block: int | None = None
) -> dict[str, Any]:
    """The balance report of ``code``: now, as of a time, or at a block."""
    if as_of is not None and at_block is not None:
        raise InvalidInput("give either an as-of time or a block number, not both")
    account = get_account(conn, code)
    if as_of is not None:
        totals = totals_as_of(conn, account, as_of)
    elif at_block is not None:
        totals = totals_at_block(conn, account, at_block)
    else:
        totals = current_totals(account)
    out = totals.as_dict(account)
    if as_of is not None:
        out["as_of"] = as_of.isoformat()
    if at_block is not None:
        out["at_block"] = at_block
    return out


@dataclass(frozen=True, slots=True)
class StatementLine:
    transfer_id: int
    entry_key: str
    entry_kind: str
    transfer_kind: str
    posted_at: datetime
    effective_at: datetime
    side: str
    counterparty: str
    amount: int
    balance_after: int
    debits_pending_after: int
    credits_pending_after: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "entry_key": self.entry_key,
            "entry_kind": self.entry_kind,
            "transfer_kind": self.transfer_kind,
            "posted_at": self.posted_at.isoformat(),
            "effective_at": self.effective_at.isoformat(),
            "side": self.side,
            "counterparty": self.counterparty,
            "amount": str(self.amount),
            "balance_after": str(self.balance_after),
            "debits_pending_after": str(self.debits_pending_after),
            "credits_pending_after": str(self.credits_pending_after),
        }


def statement(
    conn: sa.Connection,
    code: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    after_id: int | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Transfers of ``code`` in [start, end) after transfer ``after_id``, with running balances.

    ``balance_after`` is the posted balance on the account's normal side after the line, next
    to the pending totals of both sides; ``next_after_id`` continues the page.
    """
    if not 1 <= limit <= STATEMENT_MAX_LINES:
        raise InvalidInput(f"limit must be between 1 and {STATEMENT_MAX_LINES}")
    for value in (start, end):
        if value is not None and value.tzinfo is None:
            raise InvalidInput("statement times need a time zone")
    account = get_account(conn, code)
    params: dict[str, Any] = {"id": account.id, "limit": limit + 1}
    conds = ["true"]
    if start is not None:
        conds.append("t.posted_at >= :start")
        params["start"] = start
    if end is not None:
        conds.append("t.posted_at < :end")
        params["end"] = end
    if after_id is not None:
        conds.append("t.id > :after")
        params["after"] = after_id
    where = " AND ".join(conds)
    rows = conn.execute(
        sa.text(
            "SELECT t.id, e.idempotency_key, e.kind, t.kind, t.posted_at, e.effective_at,"
            " t.debit_account_id = :id AS is_debit, o.code, t.amount::text,"
            " t.debit_posted_after::text, t.debit_pending_after::text,"
            " t.credit_posted_after::text, t.credit_pending_after::text"
            " FROM (SELECT * FROM ledger_transfers t WHERE t.debit_account_id = :id AND "
            + where
            + " UNION ALL SELECT * FROM ledger_transfers t WHERE t.credit_account_id = :id AND "
            + where
            + " ORDER BY id LIMIT :limit) t"
            " JOIN ledger_entries e ON e.id = t.entry_id"
            " JOIN ledger_accounts o ON o.id = CASE WHEN t.debit_account_id = :id"
            " THEN t.credit_account_id ELSE t.debit_account_id END ORDER BY t.id"
        ),
        params,
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    if rows:
        first = rows[0]
        opening = _totals_where(
            conn, account.id, "posted_at <= :t AND id < :before", {"t": first[4], "before": first[0]}
        )
    elif end is not None:
        # Nothing in the window after the cursor: the balance is the one just before its end.
        opening = _totals_where(conn, account.id, "posted_at < :t", {"t": end})
    else:
        opening = current_totals(account)
    dp, cp, dq, cq = (
        opening.debits_posted,
        opening.credits_posted,
        opening.debits_pending,
        opening.credits_pending,
    )
    lines: list[StatementLine] = []
    for r in rows:
        if r[6]:
            dp, dq = int(r[9]), int(r[10])
        else:
            cp, cq = int(r[11]), int(r[12])
        lines.append(
            StatementLine(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                "debit" if r[6] else "credit",
                r[7],
                int(r[8]),
                normal_balance(account.kind, dp, cp),
                dq,
                cq,
            )
        )
    opening_balance = normal_balance(account.kind, opening.debits_posted, opening.credits_posted)
    return {
        "code": account.code,
        "asset": account.asset,
        "kind": account.kind,
        "opening_balance": str(opening_balance),
        "closing_balance": str(lines[-1].balance_after if lines else opening_balance),
        "lines": [line.as_dict() for line in lines],
        "next_after_id": lines[-1].transfer_id if more and lines else None,
    }
