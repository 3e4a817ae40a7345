"""Entries are checked whole at commit once per inserting statement, not once per entry.

Until now a deferred row trigger ran a PL/pgSQL function for every entry at commit, a large
share of a batch's cost. Now a statement trigger on ledger_entries records the range of ids the
statement inserted in ledger_entry_checks, and a deferred constraint trigger on that row checks
the whole range at commit, set-based: every entry has a transfer, and every reversal posts the
mirror image of the entry it reverses. The row is removed once checked. The application role
has no privilege on ledger_entry_checks; the functions run as the owner.

Revision ID: 0006_entry_checks_per_statement
Revises: 0005_escrow_history_truncate
"""

from __future__ import annotations

from ledger.migrations import apply

revision = "0006_entry_checks_per_statement"
down_revision = "0005_escrow_history_truncate"
branch_labels = None
depends_on = None

SCHEMA = """
DROP TRIGGER ledger_entries_complete ON ledger_entries;
DROP FUNCTION ledger_check_entry();

-- One row per statement that inserted entries, until its transaction commits.
CREATE TABLE ledger_entry_checks (
    first_entry_id bigint NOT NULL,
    last_entry_id bigint NOT NULL,
    CHECK (first_entry_id <= last_entry_id)
);
CREATE INDEX ledger_entry_checks_first ON ledger_entry_checks (first_entry_id);
REVOKE ALL ON ledger_entry_checks FROM PUBLIC;

CREATE FUNCTION ledger_note_entries() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    INSERT INTO ledger_entry_checks (first_entry_id, last_entry_id)
    SELECT min(n.id), max(n.id) FROM new_entries n HAVING count(*) > 0;
    RETURN NULL;
END $$;

-- Entries of other transactions in the range are committed, hence already checked: checking
-- them again finds nothing, so the range needs no finer bookkeeping.
CREATE FUNCTION ledger_check_entries() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    bad text;
BEGIN
    SELECT e.idempotency_key INTO bad FROM ledger_entries e
     WHERE e.id BETWEEN NEW.first_entry_id AND NEW.last_entry_id
       AND NOT EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.entry_id = e.id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'entry %: an entry needs at least one transfer', bad
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT e.idempotency_key INTO bad FROM ledger_entries e
     WHERE e.id BETWEEN NEW.first_entry_id AND NEW.last_entry_id
       AND e.reverses_entry_id IS NOT NULL
       AND (EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.entry_id = e.id AND t.kind <> 'posted')
            OR EXISTS (
                (SELECT t.credit_account_id, t.debit_account_id, t.asset_id, t.amount FROM ledger_transfers t
                  WHERE t.entry_id = e.reverses_entry_id AND t.kind IN ('posted', 'post_pending')
                 EXCEPT ALL
                 SELECT t.debit_account_id, t.credit_account_id, t.asset_id, t.amount FROM ledger_transfers t
                  WHERE t.entry_id = e.id)
                UNION ALL
                (SELECT t.debit_account_id, t.credit_account_id, t.asset_id, t.amount FROM ledger_transfers t
                  WHERE t.entry_id = e.id
                 EXCEPT ALL
                 SELECT t.credit_account_id, t.debit_account_id, t.asset_id, t.amount FROM ledger_transfers t
                  WHERE t.entry_id = e.reverses_entry_id AND t.kind IN ('posted', 'post_pending')))
            OR EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.entry_id = e.reverses_entry_id
                        AND t.kind NOT IN ('posted', 'post_pending')))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'entry %: a reversal must post the mirror image of the entry it reverses', bad
            USING ERRCODE = 'check_violation';
    END IF;
    DELETE FROM ledger_entry_checks
     WHERE first_entry_id = NEW.first_entry_id AND last_entry_id = NEW.last_entry_id;
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_entries_complete AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION ledger_note_entries();
CREATE CONSTRAINT TRIGGER ledger_entry_checks_at_commit AFTER INSERT ON ledger_entry_checks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_check_entries();
"""


def _grants(role: str) -> str:
    return f'REVOKE ALL ON ledger_entry_checks FROM "{role}";'


def upgrade() -> None:
    apply(SCHEMA, grants=_grants)


def downgrade() -> None:
    raise NotImplementedError("the ledger's checks are kept for good; restore from a backup instead")
