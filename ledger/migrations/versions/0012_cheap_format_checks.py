"""Format checks that cost what they should: the same rules, written without bounded repetition.

PostgreSQL re-checks every CHECK constraint of a row on each UPDATE, whichever columns change, so
the check of an account's code runs every time a batch moves the account's balances. Written as
``code ~ '^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,199}$'`` it cost about 8 µs a row on this machine (the
regex engine expands the counted repetition), more than half of the balance update itself; the
same holds, less sharply, for the kind of every entry inserted and for the hashes and addresses
of the chain tables. Each check is rewritten as an unbounded class plus a length test, which
accepts exactly the same strings (every class is ASCII, so characters are bytes): a string of
the class of length 1 to 200 is what ``[first][rest]{0,199}`` accepted. NULL stays allowed where
it was (both forms are NULL then). Constraint names do not change.

Revision ID: 0012_cheap_format_checks
Revises: 0011_xid8_subtransactions
"""

from __future__ import annotations

from ledger.migrations import apply

revision = "0012_cheap_format_checks"
down_revision = "0011_xid8_subtransactions"
branch_labels = None
depends_on = None

HASH = ("'^0x[0-9a-f]*$'", "= 66")
ADDRESS = ("'^0x[0-9a-f]*$'", "= 42")

# (table, column, pattern without the counted repetition, length condition); each constraint
# is named {table}_{column}_check, as PostgreSQL named the column checks it replaces.
CHECKS: tuple[tuple[str, str, str, str], ...] = (
    ("ledger_assets", "code", "'^[A-Z][A-Z0-9]*$'", "BETWEEN 2 AND 16"),
    ("ledger_accounts", "code", "'^[A-Za-z0-9][A-Za-z0-9_.:@/+-]*$'", "<= 200"),
    ("ledger_entries", "kind", "'^[a-z][a-z0-9_.:-]*$'", "<= 64"),
    ("ledger_entries", "tx_hash", *HASH),
    ("ledger_entries", "block_hash", *HASH),
    ("chain_blocks", "hash", *HASH),
    ("chain_blocks", "parent_hash", *HASH),
    ("chain_events", "block_hash", *HASH),
    ("chain_events", "tx_hash", *HASH),
    ("chain_events", "contract", *ADDRESS),
    ("finance_exceptions", "kind", "'^[a-z][a-z0-9_]*$'", "<= 64"),
    ("finance_exceptions", "tx_hash", *HASH),
    ("chain_signers", "address", *ADDRESS),
    ("chain_outbox", "signer", *ADDRESS),
    ("chain_outbox", "action", "'^[a-z][a-z0-9_.]*$'", "<= 64"),
    ("chain_outbox", "to_address", *ADDRESS),
    ("chain_outbox", "tx_hash", *HASH),
    ("chain_outbox", "block_hash", *HASH),
    ("chain_tx_attempts", "tx_hash", *HASH),
    ("escrows", "contract", *ADDRESS),
    ("escrows", "buyer", *ADDRESS),
    ("escrows", "id", *HASH),
    ("escrows", "seller", *ADDRESS),
    ("party_nonces", "address", *ADDRESS),
    ("party_nonces", "digest", *HASH),
    ("points_participants", "tier", "'^[a-z][a-z0-9_]*$'", "<= 32"),
    ("points_participants", "id", "'^[A-Za-z0-9][A-Za-z0-9_.:@-]*$'", "<= 100"),
    ("points_participants", "wallet", *ADDRESS),
    ("points_rules", "event_type", "'^[a-z][a-z0-9_.:-]*$'", "<= 64"),
    ("points_claims", "wallet", *ADDRESS),
    ("staking_pools", "vault", *ADDRESS),
    ("staking_positions", "staker", *ADDRESS),
    ("staking_moves", "staker", *ADDRESS),
    ("staking_claims", "staker", *ADDRESS),
    ("recon_breaks", "tx_hash", *HASH),
    ("recon_breaks", "address", *ADDRESS),
)


def _statement(table: str, column: str, pattern: str, length: str) -> str:
    name = f"{table}_{column}_check"
    return (
        f"ALTER TABLE {table} DROP CONSTRAINT {name},"
        f" ADD CONSTRAINT {name} CHECK ({column} ~ {pattern} AND length({column}) {length})"
    )


def upgrade() -> None:
    apply(*(_statement(*check) for check in CHECKS), grants=None)


def downgrade() -> None:
    raise NotImplementedError("restore from a backup instead")
