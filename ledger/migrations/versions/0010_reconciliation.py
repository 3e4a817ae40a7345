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

-- The exceptions queue's work: who has a break, what was said about it, how it was resolved.
-- A manual match says why the books and the chain agree after all; a write-off is an entry one
-- finance user proposes and another approves (maker-checker), booked when approved.
ALTER TABLE finance_exceptions
    ADD COLUMN assignee text CHECK (length(assignee) BETWEEN 1 AND 200),
    ADD COLUMN resolution text CHECK (resolution IN ('manual_match', 'write_off')),
    ADD COLUMN resolved_by text CHECK (length(resolved_by) BETWEEN 1 AND 200),
    ADD COLUMN resolved_at timestamptz,
    ADD COLUMN resolution_note text CHECK (length(resolution_note) BETWEEN 1 AND 4000),
    ADD COLUMN resolution_entry_key text,
    ADD CONSTRAINT resolved_whole CHECK (
        (status = 'resolved' AND resolution IS NOT NULL AND resolved_by IS NOT NULL AND resolved_at IS NOT NULL
         AND resolution_note IS NOT NULL)
        OR (status = 'open' AND resolution IS NULL AND resolved_by IS NULL AND resolved_at IS NULL
            AND resolution_note IS NULL AND resolution_entry_key IS NULL)),
    ADD CONSTRAINT write_off_names_its_entry CHECK (
        (resolution = 'write_off') = (resolution_entry_key IS NOT NULL) OR resolution IS NULL);

CREATE TABLE finance_exception_notes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exception_id bigint NOT NULL REFERENCES finance_exceptions (id),
    author text NOT NULL CHECK (length(author) BETWEEN 1 AND 200),
    note text NOT NULL CHECK (length(note) BETWEEN 1 AND 4000),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX finance_exception_notes_exception ON finance_exception_notes (exception_id, id);

CREATE TABLE finance_writeoffs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exception_id bigint NOT NULL REFERENCES finance_exceptions (id),
    debit text NOT NULL,
    credit text NOT NULL CHECK (credit <> debit),
    asset text NOT NULL,
    amount numeric(78, 0) NOT NULL CHECK (amount > 0 AND amount < {UINT256_LIMIT}),
    reason text NOT NULL CHECK (length(reason) BETWEEN 1 AND 4000),
    proposed_by text NOT NULL CHECK (length(proposed_by) BETWEEN 1 AND 200),
    proposed_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'proposed' CHECK (status IN ('proposed', 'approved', 'rejected')),
    decided_by text CHECK (length(decided_by) BETWEEN 1 AND 200),
    decided_at timestamptz,
    entry_key text UNIQUE,
    -- Four eyes: the person who decides is never the person who proposed.
    CONSTRAINT four_eyes CHECK (decided_by <> proposed_by),
    CONSTRAINT decided_whole CHECK ((status = 'proposed') = (decided_by IS NULL AND decided_at IS NULL)),
    CONSTRAINT approved_books_an_entry CHECK ((status = 'approved') = (entry_key IS NOT NULL))
);
-- One proposal at a time per exception.
CREATE UNIQUE INDEX finance_writeoffs_one_open ON finance_writeoffs (exception_id) WHERE status = 'proposed';

-- A resolved exception stays resolved as it was; a decided write-off stays decided; notes are kept.
CREATE FUNCTION finance_exceptions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'resolved' THEN
        RAISE EXCEPTION 'exception % is resolved; it cannot change', OLD.key
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.resolution = 'write_off' AND NOT EXISTS (
        SELECT 1 FROM finance_writeoffs w
         WHERE w.exception_id = NEW.id AND w.status = 'approved' AND w.entry_key = NEW.resolution_entry_key) THEN
        RAISE EXCEPTION 'exception % : a write-off resolution needs its approved write-off', OLD.key
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER finance_exceptions_guard BEFORE UPDATE ON finance_exceptions
    FOR EACH ROW EXECUTE FUNCTION finance_exceptions_guard();
CREATE TRIGGER finance_exceptions_no_delete BEFORE DELETE ON finance_exceptions
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_change();
CREATE TRIGGER finance_exceptions_no_truncate BEFORE TRUNCATE ON finance_exceptions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_change();

CREATE FUNCTION finance_writeoffs_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'proposed' THEN
        RAISE EXCEPTION 'write-off % is %; it cannot change', OLD.id, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF (NEW.exception_id, NEW.debit, NEW.credit, NEW.asset, NEW.amount, NEW.reason, NEW.proposed_by,
        NEW.proposed_at) IS DISTINCT FROM
       (OLD.exception_id, OLD.debit, OLD.credit, OLD.asset, OLD.amount, OLD.reason, OLD.proposed_by,
        OLD.proposed_at) THEN
        RAISE EXCEPTION 'write-off %: what was proposed cannot be edited', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.status = 'approved' AND NOT EXISTS (
        SELECT 1 FROM ledger_entries e WHERE e.idempotency_key = NEW.entry_key) THEN
        RAISE EXCEPTION 'write-off %: approved without its ledger entry', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER finance_writeoffs_guard BEFORE UPDATE ON finance_writeoffs
    FOR EACH ROW EXECUTE FUNCTION finance_writeoffs_guard();
CREATE TRIGGER finance_writeoffs_no_delete BEFORE DELETE ON finance_writeoffs
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_change();
CREATE TRIGGER finance_writeoffs_no_truncate BEFORE TRUNCATE ON finance_writeoffs
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_change();
CREATE TRIGGER finance_exception_notes_append_only BEFORE UPDATE OR DELETE ON finance_exception_notes
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_change();
CREATE TRIGGER finance_exception_notes_no_truncate BEFORE TRUNCATE ON finance_exception_notes
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_change();

-- The ledger side of the transfer-level match reads custody bookings by block.
CREATE INDEX ledger_entries_chain_number ON ledger_entries (chain_id, block_number)
    WHERE chain_id IS NOT NULL;
"""


def _grants(role: str) -> str:
    return f"""
GRANT SELECT, INSERT ON recon_runs, recon_breaks, finance_exception_notes, finance_writeoffs TO "{role}";
GRANT UPDATE (assignee, resolution, resolved_by, resolved_at, resolution_note, resolution_entry_key)
    ON finance_exceptions TO "{role}";
GRANT UPDATE (status, decided_by, decided_at, entry_key) ON finance_writeoffs TO "{role}";
"""


def upgrade() -> None:
    apply(SCHEMA, grants=_grants)


def downgrade() -> None:
    raise NotImplementedError("reconciliation runs are kept for good; restore from a backup instead")
