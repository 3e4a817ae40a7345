"""Participants and the versioned scoring rules of points.

A rule maps an event type to points, with multipliers by participant tier (basis points), an
optional daily cap per participant and UTC day of occurrence, and an optional expiry. Rules are
append-only: a change is a new version with an effective time no earlier than now, and an event
is scored by the version in force when it occurred, so a change never reaches back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ledger import accounts
from ledger.accounts import Created
from ledger.custody import check_address
from ledger.errors import Conflict, InvalidInput, NotFound
from ledger.money import UINT256_LIMIT

ASSET = "PTS"
SCALE = 0
ISSUED = "points:issued"
REDEEMED = "points:redeemed"
BPS_ONE = 10_000
MULTIPLIER_MAX_BPS = 1_000_000
EXPIRY_MAX_S = 10 * 365 * 86_400
_PARTICIPANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}$")
_TIER = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
# Ingestion holds this lock shared, a rule change exclusive: a version can never be inserted
# between an event's arrival and its scoring.
RULES_LOCK = 0x504F494E54530001


def participant_account(participant_id: str) -> str:
    """The liability account of what ``participant_id`` holds in points."""
    return f"points:{check_participant_id(participant_id)}"


def check_participant_id(value: object) -> str:
    if not isinstance(value, str) or not _PARTICIPANT.fullmatch(value):
        raise InvalidInput(f"participant id must be 1-100 letters, digits and _.:@- , got {value!r:.60}")
    return value


def check_tier(value: object) -> str:
    if not isinstance(value, str) or not _TIER.fullmatch(value):
        raise InvalidInput(f"tier must be 1-32 lower-case letters, digits and _, got {value!r:.60}")
    return value


def check_event_type(value: object) -> str:
    if not isinstance(value, str) or not _EVENT_TYPE.fullmatch(value):
        raise InvalidInput(f"event type must match {_EVENT_TYPE.pattern}, got {value!r:.60}")
    return value


def _check_whole(value: object, what: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer")
    if not low <= value <= high:
        raise InvalidInput(f"{what} must be from {low} to {high}, got {value}")
    return value


def ensure_chart(conn: sa.Connection) -> None:
    """The PTS asset and the platform's points accounts (idempotent)."""
    accounts.create_asset(conn, ASSET, SCALE)
    accounts.create_account(conn, ISSUED, ASSET, "equity")
    accounts.create_account(conn, REDEEMED, ASSET, "equity")


# -- participants ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Participant:
    id: str
    wallet: str | None
    tier: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "wallet": self.wallet,
            "tier": self.tier,
            "account": f"points:{self.id}",
            "created_at": self.created_at.isoformat(),
        }


def get_participant(conn: sa.Connection, participant_id: str, *, for_update: bool = False) -> Participant:
    check_participant_id(participant_id)
    row = conn.execute(
        sa.text(
            "SELECT id, wallet, tier, created_at FROM points_participants WHERE id = :id"
            + (" FOR UPDATE" if for_update else "")
        ),
        {"id": participant_id},
    ).first()
    if row is None:
        raise NotFound("participant_not_found", f"no participant {participant_id!r}")
    return Participant(row.id, row.wallet, row.tier, row.created_at)


def set_participant(
    conn: sa.Connection, participant_id: str, tier: str, wallet: str | None, actor: str
) -> tuple[Participant | None, Participant, Created]:
    """Register a participant (and its points account) or change its tier and wallet.

    Returns (before, after, created|exists); ``exists`` also when the values changed. A tier
    change applies to events scored after it.
    """
    check_participant_id(participant_id)
    check_tier(tier)
    wallet = None if wallet is None else check_address(wallet, "wallet")
    ensure_chart(conn)
    accounts.create_account(
        conn, participant_account(participant_id), ASSET, "liability", ["debits_must_not_exceed_credits"]
    )
    inserted = conn.execute(
        sa.text(
            "INSERT INTO points_participants (id, wallet, tier, created_by) VALUES (:id, :w, :t, :a)"
            " ON CONFLICT (id) DO NOTHING RETURNING id"
        ),
        {"id": participant_id, "w": wallet, "t": tier, "a": actor},
    ).first()
    if inserted is not None:
        return None, get_participant(conn, participant_id), "created"
    before = get_participant(conn, participant_id, for_update=True)
    if (before.tier, before.wallet) != (tier, wallet):
        conn.execute(
            sa.text(
                "UPDATE points_participants SET tier = :t, wallet = :w, updated_at = now() WHERE id = :id"
            ),
            {"id": participant_id, "w": wallet, "t": tier},
        )
    return before, get_participant(conn, participant_id), "exists"


def list_participants(conn: sa.Connection, after: str | None, limit: int) -> list[Participant]:
    rows = conn.execute(
        sa.text(
            "SELECT id, wallet, tier, created_at FROM points_participants"
            " WHERE (CAST(:after AS text) IS NULL OR id > :after) ORDER BY id LIMIT :limit"
        ),
        {"after": after, "limit": limit},
    )
    return [Participant(r.id, r.wallet, r.tier, r.created_at) for r in rows]


# -- rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewRule:
    """A new version of the rule of ``event_type``; ``effective_at`` None means now."""

    event_type: str
    points: int
    tier_multipliers_bps: Mapping[str, int] = field(default_factory=dict)
    daily_cap: int | None = None
    expires_after_s: int | None = None
    effective_at: datetime | None = None

    def __post_init__(self) -> None:
        check_event_type(self.event_type)
        _check_whole(self.points, "points", low=0, high=UINT256_LIMIT - 1)
        if not isinstance(self.tier_multipliers_bps, Mapping):
            raise InvalidInput("tier_multipliers_bps must be an object of tier -> basis points")
        for tier, bps in self.tier_multipliers_bps.items():
            check_tier(tier)
            _check_whole(bps, f"the multiplier of tier {tier}", low=0, high=MULTIPLIER_MAX_BPS)
        if self.daily_cap is not None:
            _check_whole(self.daily_cap, "daily_cap", low=0, high=UINT256_LIMIT - 1)
        if self.expires_after_s is not None:
            _check_whole(self.expires_after_s, "expires_after_s", low=1, high=EXPIRY_MAX_S)
        if self.effective_at is not None and (
            not isinstance(self.effective_at, datetime) or self.effective_at.tzinfo is None
        ):
            raise InvalidInput("effective_at must be a timestamp with a time zone")


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    event_type: str
    version: int
    points: int
    tier_multipliers_bps: Mapping[str, int]
    daily_cap: int | None
    expires_after_s: int | None
    effective_at: datetime
    created_by: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_type": self.event_type,
            "version": self.version,
            "points": str(self.points),
            "tier_multipliers_bps": dict(self.tier_multipliers_bps),
            "daily_cap": None if self.daily_cap is None else str(self.daily_cap),
            "expires_after_s": self.expires_after_s,
            "effective_at": self.effective_at.isoformat(),
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
        }


_RULE_SELECT = (
    "SELECT id, event_type, version, points, tier_multipliers, daily_cap, expires_after_s, effective_at,"
    " created_by, created_at FROM points_rules"
)


def _rule(r: Any) -> Rule:
    return Rule(
        r.id,
        r.event_type,
        r.version,
        int(r.points),
        {str(k): int(v) for k, v in r.tier_multipliers.items()},
        None if r.daily_cap is None else int(r.daily_cap),
        r.expires_after_s,
        r.effective_at,
        r.created_by,
        r.created_at,
    )


def add_rule_version(conn: sa.Connection, new: NewRule, actor: str) -> Rule:
    """Append the next version of ``new.event_type``'s rule, effective at ``new.effective_at``
    (now when None), which may not lie in the past: a change never rescores events."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": RULES_LOCK})
    now = conn.execute(sa.text("SELECT statement_timestamp()")).scalar_one()
    effective = new.effective_at or now
    if effective < now:
        raise InvalidInput(
            f"effective_at {effective.isoformat()} is in the past: a rule change applies only to events"
            " after it"
        )
    latest = conn.execute(
        sa.text("SELECT max(version), max(effective_at) FROM points_rules WHERE event_type = :t"),
        {"t": new.event_type},
    ).one()
    if latest[1] is not None and effective <= latest[1]:
        raise Conflict(
            "rule_conflict",
            f"version {latest[0]} of {new.event_type!r} takes effect at {latest[1].isoformat()};"
            " a new version must take effect later",
        )
    # The version takes effect no earlier than this statement (PostgreSQL checks it): a time
    # given a moment ago may have passed by now.
    try:
        with conn.begin_nested():
            row = _insert_rule(conn, new, (latest[0] or 0) + 1, actor)
    except IntegrityError as exc:
        if "never_retroactive" in str(exc.orig):
            raise InvalidInput(
                "effective_at has passed: a rule change applies only to events after it"
            ) from exc
        raise
    return get_rule(conn, row)


def _insert_rule(conn: sa.Connection, new: NewRule, version: int, actor: str) -> int:
    # Without a time the version takes effect when it is created (the column default).
    effective = "" if new.effective_at is None else ", effective_at"
    row = conn.execute(
        sa.text(
            f"INSERT INTO points_rules (event_type, version, points, tier_multipliers, daily_cap,"
            f" expires_after_s, created_by{effective}) VALUES (:t, :v, :p, CAST(:m AS jsonb), :cap, :exp,"
            f" :a{effective.replace(', ', ', :')}) RETURNING id"
        ),
        {
            "t": new.event_type,
            "v": version,
            "p": new.points,
            "m": json.dumps(dict(new.tier_multipliers_bps), sort_keys=True),
            "cap": new.daily_cap,
            "exp": new.expires_after_s,
            "effective_at": new.effective_at,
            "a": actor,
        },
    ).scalar_one()
    return int(row)


def get_rule(conn: sa.Connection, rule_id: int) -> Rule:
    row = conn.execute(sa.text(_RULE_SELECT + " WHERE id = :id"), {"id": rule_id}).first()
    if row is None:
        raise NotFound("rule_not_found", f"no rule version {rule_id}")
    return _rule(row)


def list_rules(
    conn: sa.Connection, *, event_type: str | None = None, after: int | None = None, limit: int = 100
) -> list[Rule]:
    """Every version, oldest first (keyset on id)."""
    if event_type is not None:
        check_event_type(event_type)
    rows = conn.execute(
        sa.text(
            _RULE_SELECT + " WHERE (CAST(:t AS text) IS NULL OR event_type = :t)"
            " AND id > :after ORDER BY id LIMIT :limit"
        ),
        {"t": event_type, "after": after or 0, "limit": limit},
    )
    return [_rule(r) for r in rows]


def rule_in_force(conn: sa.Connection, event_type: str, at: datetime | None = None) -> Rule | None:
    """The version of ``event_type``'s rule that scores an event occurring at ``at`` (now)."""
    check_event_type(event_type)
    row = conn.execute(
        sa.text(
            _RULE_SELECT + " WHERE event_type = :t AND effective_at <= :at ORDER BY effective_at DESC LIMIT 1"
        ),
        {"t": event_type, "at": at or datetime.now(UTC)},
    ).first()
    return None if row is None else _rule(row)
