"""`tracechain ledger check`: recompute the books from transfers and report every break."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

BREAKS_SHOWN = 50

# Each account's totals recomputed from its transfers, next to the stored totals.
_RECOMPUTED = """
WITH d AS (
    SELECT t.id, t.debit_account_id, t.credit_account_id,
           CASE WHEN t.kind IN ('posted', 'post_pending') THEN t.amount ELSE 0 END AS posted,
           CASE WHEN t.kind = 'pending' THEN t.amount WHEN t.kind = 'posted' THEN 0
                ELSE -p.amount END AS pending
      FROM ledger_transfers t LEFT JOIN ledger_transfers p ON p.id = t.pending_id),
legs AS (
    SELECT debit_account_id AS account_id, posted AS dp, pending AS dq, 0 AS cp, 0 AS cq FROM d
    UNION ALL
    SELECT credit_account_id, 0, 0, posted, pending FROM d),
sums AS (
    SELECT account_id, sum(dp) AS dp, sum(dq) AS dq, sum(cp) AS cp, sum(cq) AS cq
      FROM legs GROUP BY account_id)
SELECT a.code, a.debits_posted::text, a.credits_posted::text, a.debits_pending::text,
       a.credits_pending::text, coalesce(s.dp, 0)::text, coalesce(s.cp, 0)::text,
       coalesce(s.dq, 0)::text, coalesce(s.cq, 0)::text
  FROM ledger_accounts a LEFT JOIN sums s ON s.account_id = a.id
 WHERE (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
       IS DISTINCT FROM (coalesce(s.dp, 0), coalesce(s.cp, 0), coalesce(s.dq, 0), coalesce(s.cq, 0))
"""

_TRIAL_BALANCE = """
SELECT s.code, coalesce(sum(a.debits_posted), 0)::text, coalesce(sum(a.credits_posted), 0)::text,
       coalesce(sum(a.debits_pending), 0)::text, coalesce(sum(a.credits_pending), 0)::text,
       count(a.id)
  FROM ledger_assets s LEFT JOIN ledger_accounts a ON a.asset_id = s.id
 GROUP BY s.code ORDER BY s.code
"""

_FLAGS = """
SELECT code FROM ledger_accounts
 WHERE (debits_must_not_exceed_credits AND debits_posted + debits_pending > credits_posted)
    OR (credits_must_not_exceed_debits AND credits_posted + credits_pending > debits_posted)
    OR (closed AND (debits_pending <> 0 OR credits_pending <> 0))
"""

# The newest recorded running balance of each side must equal the stored totals.
_RUNNING = """
SELECT a.code FROM ledger_accounts a
  LEFT JOIN LATERAL (SELECT debit_posted_after, debit_pending_after FROM ledger_transfers
                      WHERE debit_account_id = a.id ORDER BY posted_at DESC, id DESC LIMIT 1) d ON true
  LEFT JOIN LATERAL (SELECT credit_posted_after, credit_pending_after FROM ledger_transfers
                      WHERE credit_account_id = a.id ORDER BY posted_at DESC, id DESC LIMIT 1) c ON true
 WHERE (coalesce(d.debit_posted_after, 0), coalesce(d.debit_pending_after, 0),
        coalesce(c.credit_posted_after, 0), coalesce(c.credit_pending_after, 0))
       IS DISTINCT FROM (a.debits_posted, a.debits_pending, a.credits_posted, a.credits_pending)
"""

_HOLDS = """
SELECT count(*) FILTER (WHERE r.id IS NULL),
       count(*) FILTER (WHERE r.id IS NULL AND p.timeout_at <= now()),
       coalesce(sum(p.amount) FILTER (WHERE r.id IS NULL), 0)::text,
       (SELECT count(*) FROM (SELECT pending_id FROM ledger_transfers WHERE pending_id IS NOT NULL
                               GROUP BY pending_id HAVING count(*) > 1) x)
  FROM ledger_transfers p LEFT JOIN ledger_transfers r ON r.pending_id = p.id
 WHERE p.kind = 'pending'
"""

# Entries are whole: each has transfers, each transfer an entry, each reversal mirrors its target.
_ENTRIES = """
SELECT 'entry_without_transfers', e.idempotency_key FROM ledger_entries e
 WHERE NOT EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.entry_id = e.id)
UNION ALL
SELECT 'transfer_without_entry', t.id::text FROM ledger_transfers t
 WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.id = t.entry_id)
UNION ALL
SELECT 'reversal_not_mirrored', r.idempotency_key FROM ledger_entries r
 WHERE r.reverses_entry_id IS NOT NULL AND EXISTS (
     (SELECT t.credit_account_id, t.debit_account_id, t.amount FROM ledger_transfers t
       WHERE t.entry_id = r.reverses_entry_id AND t.kind IN ('posted', 'post_pending')
      EXCEPT ALL
      SELECT t.debit_account_id, t.credit_account_id, t.amount FROM ledger_transfers t
       WHERE t.entry_id = r.id AND t.kind = 'posted')
     UNION ALL
     (SELECT t.debit_account_id, t.credit_account_id, t.amount FROM ledger_transfers t
       WHERE t.entry_id = r.id
      EXCEPT ALL
      SELECT t.credit_account_id, t.debit_account_id, t.amount FROM ledger_transfers t
       WHERE t.entry_id = r.reverses_entry_id AND t.kind IN ('posted', 'post_pending')))
LIMIT 50
"""

_PENDING_TOTAL = "SELECT coalesce(sum(debits_pending), 0)::text FROM ledger_accounts"


def check_ledger(conn: sa.Connection) -> dict[str, Any]:
    """Recompute every balance, the trial balance per asset, flags and holds.

    Every query must read the same snapshot, or a transfer committed between two of them
    would look like a break on a healthy ledger: on a connection with no transaction open,
    the check opens a REPEATABLE READ one; inside the caller's transaction, that transaction
    must be REPEATABLE READ or stronger. Returns a JSON-ready summary with ``ok``.
    """
    if conn.in_transaction():
        return _check(conn)
    conn.execution_options(isolation_level="REPEATABLE READ")
    with conn.begin():
        return _check(conn)


def _check(conn: sa.Connection) -> dict[str, Any]:
    breaks: list[dict[str, Any]] = []
    for row in conn.execute(sa.text(_RECOMPUTED)):
        breaks.append(
            {
                "kind": "balance_differs_from_transfers",
                "account": row[0],
                "stored": {
                    "debits_posted": row[1],
                    "credits_posted": row[2],
                    "debits_pending": row[3],
                    "credits_pending": row[4],
                },
                "from_transfers": {
                    "debits_posted": row[5],
                    "credits_posted": row[6],
                    "debits_pending": row[7],
                    "credits_pending": row[8],
                },
            }
        )
    trial: dict[str, Any] = {}
    for code, dp, cp, dq, cq, n in conn.execute(sa.text(_TRIAL_BALANCE)):
        balanced = dp == cp and dq == cq
        trial[code] = {
            "accounts": n,
            "debits_posted": dp,
            "credits_posted": cp,
            "debits_pending": dq,
            "credits_pending": cq,
            "balanced": balanced,
        }
        if not balanced:
            breaks.append({"kind": "trial_balance", "asset": code})
    for (code,) in conn.execute(sa.text(_FLAGS)):
        breaks.append({"kind": "flag_violated", "account": code})
    for (code,) in conn.execute(sa.text(_RUNNING)):
        breaks.append({"kind": "running_balance_differs", "account": code})
    for kind, what in conn.execute(sa.text(_ENTRIES)):
        breaks.append({"kind": kind, "entry" if kind != "transfer_without_entry" else "transfer": what})
    open_holds, expired, held, resolved_twice = conn.execute(sa.text(_HOLDS)).one()
    pending_total = conn.execute(sa.text(_PENDING_TOTAL)).scalar_one()
    if resolved_twice:
        breaks.append({"kind": "hold_resolved_twice", "count": resolved_twice})
    if held != pending_total:
        breaks.append(
            {
                "kind": "pending_totals_differ_from_open_holds",
                "open_holds": held,
                "pending_totals": pending_total,
            }
        )
    counts = conn.execute(
        sa.text(
            "SELECT (SELECT count(*) FROM ledger_accounts), (SELECT count(*) FROM ledger_entries),"
            " (SELECT count(*) FROM ledger_transfers)"
        )
    ).one()
    return {
        "ok": not breaks,
        "accounts": counts[0],
        "entries": counts[1],
        "transfers": counts[2],
        "trial_balance": trial,
        "open_holds": open_holds,
        "open_holds_amount": held,
        "expired_holds_awaiting_sweep": expired,
        "breaks": breaks[:BREAKS_SHOWN],
        "break_count": len(breaks),
    }
