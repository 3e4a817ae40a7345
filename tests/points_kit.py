"""Helpers of the points tests: a small world of rules and participants, events, what must not move."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ledger import accounts
from ledger.points import rules


@dataclass
class PointsWorld:
    """Event types and participants of one test (unique names on the shared database)."""

    prefix: str
    checkpoint: str  # 10 points, gold x1.5, no cap
    on_time: str  # 7 points, daily cap 20
    expiring: str  # 5 points, expire 1 s after the event
    alice: str  # gold
    bob: str  # silver
    since: datetime  # every rule is in force from here

    def event(
        self, event_id: str, participant: str, kind: str, at: datetime | None = None, **extra: Any
    ) -> dict[str, Any]:
        return {
            "source": f"{self.prefix}-src",
            "event_id": event_id,
            "participant": participant,
            "type": kind,
            "occurred_at": (at or self.since).isoformat(),
            **extra,
        }


def make_world(engine: sa.Engine, unique: str, *, wallet: str | None = None) -> PointsWorld:
    with engine.begin() as conn:
        checkpoint = rules.add_rule_version(
            conn, rules.NewRule(f"{unique}.checkpoint", 10, {"gold": 15_000}), "tests"
        )
        rules.add_rule_version(conn, rules.NewRule(f"{unique}.on_time", 7, daily_cap=20), "tests")
        rules.add_rule_version(conn, rules.NewRule(f"{unique}.expiring", 5, expires_after_s=1), "tests")
        rules.set_participant(conn, f"{unique}-alice", "gold", wallet, "tests")
        rules.set_participant(conn, f"{unique}-bob", "silver", None, "tests")
        since = conn.execute(
            sa.text("SELECT max(effective_at) FROM points_rules WHERE event_type LIKE :p"),
            {"p": f"{unique}.%"},
        ).scalar_one()
    assert checkpoint.version == 1
    return PointsWorld(
        unique,
        f"{unique}.checkpoint",
        f"{unique}.on_time",
        f"{unique}.expiring",
        f"{unique}-alice",
        f"{unique}-bob",
        since + timedelta(microseconds=1),
    )


def points_of(engine: sa.Engine, participant: str) -> tuple[int, int, int]:
    """(credits posted, debits posted, debits pending) of the participant's points account."""
    with engine.connect() as conn:
        account = accounts.get_account(conn, f"points:{participant}")
    return account.credits_posted, account.debits_posted, account.debits_pending


def points_tables(engine: sa.Engine, participant: str) -> dict[str, Any]:
    """Everything the points tables and the ledger hold for ``participant``: what must not change."""
    queries = {
        "events": "SELECT count(*), COALESCE(sum(points), 0) FROM points_events WHERE participant_id = :p",
        "lots": "SELECT count(*), COALESCE(sum(amount), 0), COALESCE(sum(expired), 0) FROM points_lots"
        " WHERE participant_id = :p",
        "daily": "SELECT count(*), COALESCE(sum(points), 0) FROM points_daily_totals"
        " WHERE participant_id = :p",
        "claims": "SELECT count(*), COALESCE(sum(points), 0) FROM points_claims WHERE participant_id = :p",
    }
    with engine.connect() as conn:
        state: dict[str, Any] = {
            name: tuple(conn.execute(sa.text(sql), {"p": participant}).one()) for name, sql in queries.items()
        }
    state["account"] = points_of(engine, participant)
    return state
