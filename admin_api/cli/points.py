"""`tracechain points`: rules, participants, event files, balances, history, claims and the
expiry sweep from a shell (the admin API does the same). Writes are audited as ``cli:<user>``.

Exit codes as everywhere: 0 done, 1 refused (or some events of a file accrued nothing because
they conflict or cannot be scored), 2 bad usage or malformed input (nothing written).
"""

from __future__ import annotations

from typing import IO, Any

import click

from admin_api.cli.runtime import (
    Failed,
    app_engine,
    cli_actor,
    emit,
    emit_line,
    load_deployment,
    parse_timestamp,
)
from ledger import audit, jsonsafe
from ledger.audit import AuditRecord
from ledger.errors import InvalidInput
from ledger.money import parse_amount
from ledger.points import claims, expiry, ingest, rules, statements
from ledger.settings import Settings

SWEEP_ROUNDS_MAX = 1000


def _count(_ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Option callback: a count of points, digits only, 0 allowed."""
    if value is None:
        return None
    if value == "0":
        return 0
    try:
        return parse_amount(value, what=param.name or "value")
    except InvalidInput as exc:
        raise click.BadParameter(exc.message, param=param) from None


def _multipliers(_ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in value:
        tier, _, bps = item.partition("=")
        if not bps.isdigit():
            raise click.BadParameter(f"{item!r}: give TIER=BASIS_POINTS, e.g. gold=15000", param=param)
        out[tier] = int(bps)
    return out


@click.group("points")
def points() -> None:
    """Points: rules, participants, ingest, balance, history, claim, expire."""


@points.group("rules")
def rules_group() -> None:
    """Scoring rules: every version, and new versions."""


@rules_group.command("list")
@click.option("--event-type")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True)
@click.pass_obj
def rules_list(settings: Settings, event_type: str | None, limit: int) -> None:
    """One JSON line per rule version, oldest first."""
    with app_engine(settings) as engine, engine.connect() as conn:
        for rule in rules.list_rules(conn, event_type=event_type, limit=limit):
            emit_line(rule.as_dict())


@rules_group.command("set")
@click.argument("event_type")
@click.option("--points", "points_", required=True, callback=_count, help="Points per event.")
@click.option(
    "--tier-multiplier", multiple=True, callback=_multipliers, help="TIER=BASIS_POINTS (10000 = 1x)."
)
@click.option("--daily-cap", callback=_count, help="Most points per participant and UTC day.")
@click.option("--expires-after-s", type=click.IntRange(1, rules.EXPIRY_MAX_S))
@click.option("--effective-at", callback=parse_timestamp, help="ISO 8601 with a zone; default now.")
@click.pass_obj
def rules_set(
    settings: Settings,
    event_type: str,
    points_: int,
    tier_multiplier: dict[str, int],
    daily_cap: int | None,
    expires_after_s: int | None,
    effective_at: Any,
) -> None:
    """Add the next version of EVENT_TYPE's rule (it applies to events from its effective time)."""
    actor = cli_actor("points-rule")
    new = rules.NewRule(event_type, points_, tier_multiplier, daily_cap, expires_after_s, effective_at)
    with app_engine(settings) as engine, engine.begin() as conn:
        rule = rules.add_rule_version(conn, new, actor.actor)
        audit.record(
            conn, [AuditRecord(actor, "points.rule", f"points:rule:{event_type}", None, rule.as_dict())]
        )
    emit(rule.as_dict())


@points.group("participant")
def participant_group() -> None:
    """Participants: register, change tier or wallet."""


@participant_group.command("set")
@click.argument("participant_id")
@click.option("--tier", required=True)
@click.option("--wallet", help="0x address that receives claims and signs the participant's own.")
@click.pass_obj
def participant_set(settings: Settings, participant_id: str, tier: str, wallet: str | None) -> None:
    """Register PARTICIPANT_ID (with its points account) or change its tier and wallet."""
    actor = cli_actor("points-participant")
    with app_engine(settings) as engine, engine.begin() as conn:
        before, after, status = rules.set_participant(conn, participant_id, tier, wallet, actor.actor)
        if before != after:
            record = AuditRecord(
                actor,
                "points.participant",
                f"points:participant:{participant_id}",
                None if before is None else before.as_dict(),
                after.as_dict(),
            )
            audit.record(conn, [record])
    emit({**after.as_dict(), "result": status})


def _read_batches(source: IO[str]) -> list[list[Any]]:
    """Every event of a JSON Lines file, in batches; the whole file is checked before anything is
    written (a malformed line is bad usage, nothing accrues)."""
    events: list[Any] = []
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            events.append(jsonsafe.loads(line))
        except (ValueError, RecursionError) as exc:
            raise InvalidInput(f"line {number} is not JSON: {exc}") from exc
    if not events:
        raise InvalidInput("no events in the input")
    size = ingest.BATCH_MAX_EVENTS
    batches = [events[start : start + size] for start in range(0, len(events), size)]
    for index, batch in enumerate(batches):
        try:
            ingest.parse_events(batch)
        except InvalidInput as exc:
            raise InvalidInput(f"batch {index} (lines from event {index * size}): {exc.message}") from exc
    return batches


@points.command("ingest")
@click.argument("source", type=click.File("r"))
@click.pass_obj
def ingest_file(settings: Settings, source: IO[str]) -> None:
    """Accrue the events of SOURCE (JSON Lines, `-` for stdin), 10,000 to a transaction.

    Prints the totals and every event that accrued nothing; exits 1 if any conflicted or could
    not be scored (already accrued events are fine: a file can be ingested again)."""
    batches = _read_batches(source)
    actor = cli_actor("points-ingest")
    totals = {
        "batches": 0,
        "received": 0,
        "created": 0,
        "exists": 0,
        "conflicts": 0,
        "rejected": 0,
        "points": 0,
    }
    skipped: list[dict[str, Any]] = []
    with app_engine(settings) as engine:
        for offset, batch in enumerate(batches):
            with engine.begin() as conn:
                report = ingest.ingest(conn, batch)
                summary = {k: v for k, v in report.as_dict().items() if k != "skipped"}
                audit.record(
                    conn,
                    [AuditRecord(actor, "points.ingest", f"points:batch:{report.batch_id}", None, summary)],
                )
            totals["batches"] += 1
            for name in ("received", "created", "exists", "conflicts", "rejected", "points"):
                totals[name] += getattr(report, name)
            base = offset * ingest.BATCH_MAX_EVENTS
            skipped.extend(
                {**s.as_dict(), "index": base + s.index} for s in report.skipped if s.status != "exists"
            )
    emit({**totals, "points": str(totals["points"]), "skipped": skipped[:1000]})
    if totals["conflicts"] or totals["rejected"]:
        raise Failed(f"{totals['conflicts']} events conflict and {totals['rejected']} could not be scored")


@points.command("balance")
@click.argument("participant_id")
@click.pass_obj
def balance(settings: Settings, participant_id: str) -> None:
    """Posted, held, available and claimable points, and the next expiry."""
    with app_engine(settings) as engine, engine.connect() as conn:
        emit(statements.balance(conn, participant_id).as_dict())


@points.command("history")
@click.argument("participant_id")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.pass_obj
def history(settings: Settings, participant_id: str, limit: int) -> None:
    """One JSON line per accrual, newest first, with its reason."""
    with app_engine(settings) as engine, engine.connect() as conn:
        for accrual in statements.history(conn, participant_id, limit=limit):
            emit_line(accrual.as_dict())


@points.command("claim")
@click.argument("participant_id")
@click.option("--points", "points_", required=True, callback=_count)
@click.option("--key", required=True, help="Idempotency key: the same claim again is not a second claim.")
@click.pass_obj
def claim(settings: Settings, participant_id: str, points_: int, key: str) -> None:
    """Claim points as TRACE minted to the participant's wallet (staff claim)."""
    actor = cli_actor("points-claim")
    deployment = load_deployment(settings)
    chain = claims.Chain(deployment.chain_id, deployment.token, deployment.treasury)
    with app_engine(settings) as engine, engine.begin() as conn:
        made, status = claims.create_claim(
            conn, chain, participant_id, points_, f"staff:{key}", settings.points_per_trace, actor.actor
        )
        if status == "created":
            audit.record(
                conn, [AuditRecord(actor, "points.claim", f"points:claim:{made.id}", None, made.as_dict())]
            )
    emit({**made.as_dict(), "result": status})


@points.command("expire")
@click.pass_obj
def expire(settings: Settings) -> None:
    """Run the expiry sweep until no expired lot holds points."""
    actor = cli_actor("points-expire")
    total = expiry.ExpiryReport()
    with app_engine(settings) as engine:
        for _ in range(SWEEP_ROUNDS_MAX):
            with engine.begin() as conn:
                report = expiry.expire_points(conn, after=total.last_lot)
                if report.lots:
                    audit.record(
                        conn, [AuditRecord(actor, "points.expire", "points:expiry", None, report.as_dict())]
                    )
            total.lots += report.lots
            total.points += report.points
            total.examined += report.examined
            total.last_lot = report.last_lot
            if report.examined < expiry.SWEEP_MAX_LOTS:
                break
    emit(total.as_dict())
