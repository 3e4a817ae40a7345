"""Reconciliation runs and the breaks each found (DESIGN §10).

A run compares the books with the chain over a block range: every confirmed TRACE transfer that
touches a custody address or the zero address against the ledger entry with the same chain
reference, and each custody mirror against ``balanceOf`` at the run's last block. A run and its
breaks are written once, when the run ends, and kept for good.

Revision ID: 0010_reconciliation
Revises: 0009_staking
"""

from __future__ import annotations

from ledger.migrations import apply
from ledger.money import UINT256_LIMIT

revision = "0010_reconciliation"
down_revision = "0009_staking"
branch_labels = None
depends_on = None

HASH = "'^0x[0-9a-f]{64}$'"
ADDRESS = "'^0x[0-9a-f]{40}$'"

SCHEMA = f"""
CREATE TABLE recon_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id bigint NOT NULL CHECK (chain_id > 0),
    from_block bigint NOT NULL CHECK (from_block >= 0),
    to_block bigint NOT NULL CHECK (to_block >= from_block),
    trigger text NOT NULL CHECK (trigger IN ('schedule', 'on_demand')),
    requested_by text NOT NULL CHECK (length(requested_by) BETWEEN 1 AND 200),
    transfers_checked bigint NOT NULL CHECK (transfers_checked >= 0),
    matched bigint NOT NULL CHECK (matched >= 0),
    chain_only bigint NOT NULL CHECK (chain_only >= 0),
    ledger_only bigint NOT NULL CHECK (ledger_only >= 0),
    mismatched bigint NOT NULL CHECK (mismatched >= 0),
    balance_breaks integer NOT NULL CHECK (balance_breaks >= 0),
    -- address -> {{"ledger", "chain", "drift"}} at to_block, amounts as decimal strings
    balances jsonb NOT NULL CHECK (jsonb_typeof(balances) = 'object'),
    -- {{"ledger", "chain", "drift"}}: what the books say was minted to claimants against the chain
    minted jsonb NOT NULL CHECK (jsonb_typeof(minted) = 'object'),
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL CHECK (finished_at >= started_at),
    duration_ms numeric(14, 3) NOT NULL CHECK (duration_ms >= 0),
    ok boolean NOT NULL,
    CHECK (ok = (chain_only + ledger_only + mismatched + balance_breaks = 0)),
    CHECK (transfers_checked >= matched + mismatched + chain_only)
);
CREATE INDEX recon_runs_chain ON recon_runs (chain_id, id);

CREATE TABLE recon_breaks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id bigint NOT NULL REFERENCES recon_runs (id),
    class text NOT NULL
        CHECK (class IN ('chain_only', 'ledger_only', 'mismatched', 'balance_drift', 'mint_drift')),
    tx_hash text CHECK (tx_hash ~ {HASH}),
    log_index integer CHECK (log_index >= 0),
    block_number bigint CHECK (block_number >= 0),
    entry_key text,
    address text CHECK (address ~ {ADDRESS}),
    chain_amount numeric(78, 0) CHECK (chain_amount >= 0 AND chain_amount < {UINT256_LIMIT}),
    ledger_amount numeric(78, 0) CHECK (ledger_amount >= 0 AND ledger_amount < {UINT256_LIMIT}),
    details jsonb NOT NULL DEFAULT '{{}}'::jsonb CHECK (jsonb_typeof(details) = 'object'),
    exception_key text NOT NULL CHECK (length(exception_key) BETWEEN 1 AND 300)
);
CREATE INDEX recon_breaks_run ON recon_breaks (run_id, id);

-- What a run found is evidence: written once, never edited or removed.
CREATE TRIGGER recon_runs_append_only BEFORE UPDATE OR DELETE ON recon_runs
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_change();
CREATE TRIGGER recon_breaks_append_only BEFORE UPDATE OR DELETE ON recon_breaks
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_change();
CREATE TRIGGER recon_runs_no_truncate BEFORE TRUNCATE ON recon_runs
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_change();
CREATE TRIGGER recon_breaks_no_truncate BEFORE TRUNCATE ON recon_breaks
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_change();

-- The ledger side of the transfer-level match reads custody bookings by block.
CREATE INDEX ledger_entries_chain_number ON ledger_entries (chain_id, block_number)
    WHERE chain_id IS NOT NULL;
"""


def _grants(role: str) -> str:
    return f"""
GRANT SELECT, INSERT ON recon_runs, recon_breaks TO "{role}";
"""


def upgrade() -> None:
    apply(SCHEMA, grants=_grants)


def downgrade() -> None:
    raise NotImplementedError("reconciliation runs are kept for good; restore from a backup instead")
