"""Accrual of points from batches of supply-chain events: set-based and idempotent per event.

A batch is one round of set-based work in the caller's transaction, whatever its size (up to
``BATCH_MAX_EVENTS``):

1. the events are checked and normalised in Python (a malformed batch is refused whole);
2. the daily-total rows of the capped (participant, event type, UTC day) keys are created and
   locked in key order, so concurrent batches never deadlock and caps hold under concurrency;
3. one statement scores the new events in SQL (rule version in force at ``occurred_at``, tier
   multiplier, daily cap in event order), inserts them with the reason of each accrual, adds to
   the daily totals and writes the lots;
4. the points are booked from ``points:issued`` with one transfer per participant (entries of up
   to 64 transfers) in the same transaction.

An event is known by (source, event_id), UNIQUE in PostgreSQL: the same event again is
``exists``, the same id with other content is a ``conflict``; neither writes anything, and a
retry or a crash half-way can never count an event twice or lose one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from ledger.commands import MAX_LEGS, Leg, NewEntry, canonical_metadata
from ledger.engine import post_batch
from ledger.errors import InvalidInput, LedgerError
from ledger.points import rules

BATCH_MAX_EVENTS = 10_000
SOURCE_MAX_CHARS = 100
EVENT_ID_MAX_CHARS = 200
_EVENT_FIELDS = frozenset({"source", "event_id", "participant", "type", "occurred_at", "details"})
_REQUIRED = ("source", "event_id", "participant", "type", "occurred_at")
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
# A batch that lost a race on one of its event ids (another batch inserted the same id with
# other content between the check and the insert) is scored again this many times.
RACE_RETRIES = 3
_NUMERIC_OUT_OF_RANGE = "22003"
_CHECK_VIOLATION = "23514"

_LOCK_CAPPED_DAYS = """
WITH i AS (
    SELECT * FROM unnest(CAST(:src AS text[]), CAST(:eid AS text[]), CAST(:pid AS text[]),
        CAST(:typ AS text[]), CAST(:occ AS timestamptz[])) AS i(source, event_id, pid, typ, occ)
), k AS (
    SELECT DISTINCT i.pid, i.typ, (i.occ AT TIME ZONE 'UTC')::date AS day
    FROM i JOIN points_participants p ON p.id = i.pid
    JOIN LATERAL (
        SELECT r.daily_cap FROM points_rules r WHERE r.event_type = i.typ AND r.effective_at <= i.occ
        ORDER BY r.effective_at DESC LIMIT 1
    ) r ON r.daily_cap IS NOT NULL
    LEFT JOIN LATERAL (
        SELECT 1 AS known FROM points_events e WHERE e.source = i.source AND e.event_id = i.event_id LIMIT 1
    ) x ON true
    WHERE i.occ <= now() AND x.known IS NULL
)
INSERT INTO points_daily_totals AS d (participant_id, event_type, day)
SELECT pid, typ, day FROM k ORDER BY pid, typ, day
ON CONFLICT (participant_id, event_type, day) DO UPDATE SET points = d.points
"""

_SCORE_AND_INSERT = """
WITH i AS (
    SELECT * FROM unnest(CAST(:src AS text[]), CAST(:eid AS text[]), CAST(:pid AS text[]),
        CAST(:typ AS text[]), CAST(:occ AS timestamptz[]), CAST(:det AS jsonb[]), CAST(:hash AS bytea[]))
        WITH ORDINALITY AS i(source, event_id, pid, typ, occ, det, hash, ord)
), s AS (
    SELECT i.*, p.tier, r.id AS rule_id, r.points AS base, r.daily_cap, r.expires_after_s,
        COALESCE((r.tier_multipliers ->> p.tier)::integer, 10000) AS bps,
        (i.occ AT TIME ZONE 'UTC')::date AS day
    FROM i JOIN points_participants p ON p.id = i.pid
    JOIN LATERAL (
        SELECT r.* FROM points_rules r WHERE r.event_type = i.typ AND r.effective_at <= i.occ
        ORDER BY r.effective_at DESC LIMIT 1
    ) r ON true
    -- One index probe per event (a LIMIT keeps the planner from scanning the whole table).
    LEFT JOIN LATERAL (
        SELECT 1 AS known FROM points_events e WHERE e.source = i.source AND e.event_id = i.event_id LIMIT 1
    ) x ON true
    WHERE i.occ <= now() AND x.known IS NULL
), e AS (
    -- Multipliers round down: points paid out are never more than the rule gives.
    SELECT s.*, div(s.base * s.bps, 10000) AS earned FROM s
), c AS (
    SELECT e.*, sum(e.earned) OVER w AS cum, GREATEST(e.daily_cap - COALESCE(d.points, 0), 0) AS room
    FROM e LEFT JOIN points_daily_totals d
        ON d.participant_id = e.pid AND d.event_type = e.typ AND d.day = e.day
    WINDOW w AS (PARTITION BY e.pid, e.typ, e.day ORDER BY e.occ, e.source, e.event_id
                 ROWS UNBOUNDED PRECEDING)
), f AS (
    -- Under a cap, the events of a day take what room is left in the order they occurred.
    SELECT c.*, CASE WHEN c.daily_cap IS NULL THEN c.earned
                     ELSE LEAST(c.cum, c.room) - LEAST(c.cum - c.earned, c.room) END AS pts
    FROM c
), ins AS (
    INSERT INTO points_events (source, event_id, participant_id, event_type, occurred_at, details,
        content_hash, batch_id, rule_id, tier, base_points, multiplier_bps, earned, points, capped,
        expires_at)
    SELECT source, event_id, pid, typ, occ, COALESCE(det, '{}'), hash, :batch, rule_id, tier, base, bps,
        earned, pts, pts < earned, occ + make_interval(secs => expires_after_s)
    FROM f ORDER BY ord
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING source, event_id, participant_id, event_type, occurred_at, points, expires_at
), daily AS (
    UPDATE points_daily_totals d SET points = d.points + x.pts
    FROM (SELECT participant_id, event_type, (occurred_at AT TIME ZONE 'UTC')::date AS day, sum(points) AS pts
          FROM ins GROUP BY 1, 2, 3) x
    WHERE d.participant_id = x.participant_id AND d.event_type = x.event_type AND d.day = x.day AND x.pts > 0
), lots AS (
    -- A lot gathers a participant's points of the batch that expire in the same second, and
    -- expires at the end of that second (never before any of its points should).
    INSERT INTO points_lots (participant_id, batch_id, amount, expires_at)
    SELECT participant_id, :batch, sum(points),
        date_trunc('second', expires_at - interval '1 microsecond') + interval '1 second' FROM ins
    GROUP BY 1, 4 HAVING sum(points) > 0
)
SELECT 'total' AS kind, participant_id AS name, sum(points) AS amount, NULL::bigint AS ord
    FROM ins GROUP BY participant_id HAVING sum(points) > 0
UNION ALL
SELECT 'count', 'scored', count(*), NULL FROM f
UNION ALL
SELECT 'count', 'inserted', count(*), NULL FROM ins
UNION ALL
SELECT CASE
        WHEN x.content_hash IS NOT NULL
            THEN CASE WHEN x.content_hash = i.hash THEN 'exists' ELSE 'conflict' END
        WHEN p.id IS NULL THEN 'unknown_participant'
        WHEN i.occ > now() THEN 'occurred_in_future'
        WHEN NOT EXISTS (SELECT 1 FROM points_rules r WHERE r.event_type = i.typ AND r.effective_at <= i.occ)
            THEN 'no_rule'
        ELSE 'raced' END,
    NULL, NULL, i.ord
FROM i
LEFT JOIN LATERAL (
    SELECT e.content_hash FROM points_events e WHERE e.source = i.source AND e.event_id = i.event_id LIMIT 1
) x ON true
LEFT JOIN points_participants p ON p.id = i.pid
WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.source = i.source AND ins.event_id = i.event_id)
"""

_REASONS = {
    "exists": "the same event was accrued before",
    "conflict": "this source and event id were accrued before with other content",
    "unknown_participant": "no such participant",
    "occurred_in_future": "occurred_at is later than now",
    "no_rule": "no rule for this event type was in force when it occurred",
}


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """An event of the batch that accrued nothing: ``exists``, ``conflict`` or a refusal."""

    index: int
    source: str
    event_id: str
    status: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "source": self.source,
            "event_id": self.event_id,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass(slots=True)
class IngestReport:
    batch_id: int
    received: int
    created: int = 0
    exists: int = 0
    conflicts: int = 0
    rejected: int = 0
    points: int = 0
    participants: int = 0
    skipped: list[EventOutcome] = field(default_factory=list)

    def as_dict(self, *, details_max: int = 1000) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "received": self.received,
            "created": self.created,
            "exists": self.exists,
            "conflicts": self.conflicts,
            "rejected": self.rejected,
            "points": str(self.points),
            "participants": self.participants,
            "skipped": [s.as_dict() for s in self.skipped[:details_max]],
        }


@dataclass(slots=True)
class _Batch:
    """A batch as column arrays, in arrival order, without repeats."""

    src: list[str] = field(default_factory=list)
    eid: list[str] = field(default_factory=list)
    pid: list[str] = field(default_factory=list)
    typ: list[str] = field(default_factory=list)
    occ: list[str] = field(default_factory=list)
    det: list[str | None] = field(default_factory=list)
    hash: list[bytes] = field(default_factory=list)
    index: list[int] = field(default_factory=list)


class IngestRaceLost(LedgerError):
    """Another batch kept inserting an event id of this batch with other content (retry it)."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__("ingest_contention", message)


def _text(raw: Mapping[str, Any], name: str, position: int, limit: int) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not value.isprintable():
        raise InvalidInput(f"events[{position}].{name} must be 1 to {limit} printable characters")
    return value


def _occurred_at(raw: Mapping[str, Any], position: int) -> datetime:
    value = raw.get("occurred_at")
    try:
        if not isinstance(value, str) or len(value) > 40:
            raise ValueError(value)
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"events[{position}].occurred_at must be an ISO 8601 timestamp") from exc
    if moment.tzinfo is None:
        raise InvalidInput(f"events[{position}].occurred_at needs a time zone (e.g. Z)")
    moment = moment.astimezone(UTC)
    if moment < _EARLIEST:
        raise InvalidInput(f"events[{position}].occurred_at is before {_EARLIEST.date()}")
    return moment


def parse_events(events: object) -> tuple[_Batch, list[EventOutcome]]:
    """Check and normalise a batch; refuses it whole (InvalidInput) when any event is malformed.

    A repeat of an event inside the batch is dropped: ``exists`` when identical, ``conflict``
    when it differs.
    """
    if not isinstance(events, list | tuple):
        raise InvalidInput("events must be a list")
    if not 1 <= len(events) <= BATCH_MAX_EVENTS:
        raise InvalidInput(f"a batch holds 1 to {BATCH_MAX_EVENTS} events, got {len(events)}")
    batch = _Batch()
    seen: dict[tuple[str, str], bytes] = {}
    repeats: list[EventOutcome] = []
    for position, raw in enumerate(events):
        if not isinstance(raw, Mapping):
            raise InvalidInput(f"events[{position}] must be an object")
        extra = set(raw) - _EVENT_FIELDS
        missing = [name for name in _REQUIRED if name not in raw]
        if extra or missing:
            raise InvalidInput(f"events[{position}]: missing {missing}, unknown {sorted(extra)}")
        source = _text(raw, "source", position, SOURCE_MAX_CHARS)
        event_id = _text(raw, "event_id", position, EVENT_ID_MAX_CHARS)
        try:
            participant = rules.check_participant_id(raw["participant"])
            event_type = rules.check_event_type(raw["type"])
            details = canonical_metadata(raw.get("details") or {})
        except InvalidInput as exc:
            raise InvalidInput(f"events[{position}]: {exc.message}") from exc
        occurred = _occurred_at(raw, position).isoformat()
        digest = hashlib.sha256(
            "\x1f".join((source, event_id, participant, event_type, occurred, details)).encode()
        ).digest()
        known = seen.get((source, event_id))
        if known is not None:
            status = "exists" if known == digest else "conflict"
            repeats.append(
                EventOutcome(position, source, event_id, status, f"{_REASONS[status]} (in this batch)")
            )
            continue
        seen[(source, event_id)] = digest
        batch.src.append(source)
        batch.eid.append(event_id)
        batch.pid.append(participant)
        batch.typ.append(event_type)
        batch.occ.append(occurred)
        batch.det.append(None if details == "{}" else details)
        batch.hash.append(digest)
        batch.index.append(position)
    return batch, repeats


def ingest(conn: sa.Connection, events: object) -> IngestReport:
    """Accrue the points of ``events`` in the caller's transaction (see the module doc).

    Each event is an object: ``source``, ``event_id``, ``participant``, ``type``,
    ``occurred_at`` (ISO 8601 with a zone) and optional ``details`` (a JSON object).
    """
    batch, repeats = parse_events(events)
    rules.ensure_chart(conn)
    # Shared with other batches, exclusive against rule changes (see rules.RULES_LOCK).
    conn.execute(sa.text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": rules.RULES_LOCK})
    # A plan made for this batch's arrays, always: once the scoring statement is prepared, a
    # generic plan (which knows nothing of the arrays' size) made batches ten times slower.
    conn.execute(sa.text("SET LOCAL plan_cache_mode = force_custom_plan"))
    conn.execute(
        sa.text(_LOCK_CAPPED_DAYS),
        {"src": batch.src, "eid": batch.eid, "pid": batch.pid, "typ": batch.typ, "occ": batch.occ},
    )
    # Only the scoring statement runs in a savepoint (rolled back when it lost a race); the
    # booking follows once the batch's scores stand.
    for attempt in range(RACE_RETRIES + 1):
        batch_id = int(conn.execute(sa.text("SELECT nextval('points_batches')")).scalar_one())
        try:
            with conn.begin_nested():
                report, totals = _score(conn, batch, batch_id)
        except IngestRaceLost:
            if attempt == RACE_RETRIES:
                raise
            continue
        _book(conn, batch_id, totals)
        report.received = len(batch.src) + len(repeats)
        report.skipped = sorted([*report.skipped, *repeats], key=lambda o: o.index)
        for outcome in repeats:
            if outcome.status == "exists":
                report.exists += 1
            else:
                report.conflicts += 1
        return report
    raise RuntimeError("unreachable")


def _score(conn: sa.Connection, batch: _Batch, batch_id: int) -> tuple[IngestReport, list[tuple[str, int]]]:
    try:
        rows = conn.execute(
            sa.text(_SCORE_AND_INSERT),
            {
                "src": batch.src,
                "eid": batch.eid,
                "pid": batch.pid,
                "typ": batch.typ,
                "occ": batch.occ,
                "det": batch.det,
                "hash": batch.hash,
                "batch": batch_id,
            },
        ).all()
    except DBAPIError as exc:
        # Points beyond what the columns hold (below 2^256): a rule's points times a tier
        # multiplier, or a day's total. The whole batch is refused; nothing is written.
        if getattr(exc.orig, "sqlstate", None) in (_NUMERIC_OUT_OF_RANGE, _CHECK_VIOLATION):
            raise LedgerError("points_overflow", f"the batch's points exceed 2^256 - 1: {exc.orig}") from exc
        raise
    report = IngestReport(batch_id, 0)
    totals: list[tuple[str, int]] = []
    counts: dict[str, int] = {}
    for row in rows:
        if row.kind == "total":
            totals.append((row.name, int(row.amount)))
        elif row.kind == "count":
            counts[row.name] = int(row.amount)
        else:
            position = int(row.ord) - 1
            report.skipped.append(
                EventOutcome(
                    batch.index[position],
                    batch.src[position],
                    batch.eid[position],
                    row.kind,
                    _REASONS.get(row.kind, "inserted concurrently by another batch"),
                )
            )
    if counts["scored"] != counts["inserted"] or any(s.status == "raced" for s in report.skipped):
        raise IngestRaceLost(f"batch {batch_id}: another batch inserted some of its event ids first")
    report.created = counts["inserted"]
    for outcome in report.skipped:
        if outcome.status == "exists":
            report.exists += 1
        elif outcome.status == "conflict":
            report.conflicts += 1
        else:
            report.rejected += 1
    report.points = sum(amount for _, amount in totals)
    report.participants = len(totals)
    return report, sorted(totals)


def _book(conn: sa.Connection, batch_id: int, totals: Sequence[tuple[str, int]]) -> None:
    """One entry per 64 participants, one transfer each, from points:issued."""
    commands = [
        NewEntry(
            key=f"points:accrual:{batch_id}:{start // MAX_LEGS}",
            kind="points.accrual",
            legs=tuple(
                Leg(rules.ISSUED, f"points:{participant}", amount, rules.ASSET)
                for participant, amount in totals[start : start + MAX_LEGS]
            ),
            metadata={"batch_id": batch_id},
        )
        for start in range(0, len(totals), MAX_LEGS)
    ]
    for command, result in zip(commands, post_batch(conn, commands), strict=True):
        if result.status != "created":
            raise LedgerError(
                result.code or "booking_refused", f"{command.key}: {result.reason or result.status}"
            )
