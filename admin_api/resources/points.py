"""Points: scoring rules, participants, event batches, balances and history, claims, expiry.

Staff routes take an API key and every staff write is audited. A participant's own claim takes
no key: the EIP-712 ``ClaimPoints`` signature of the participant's registered wallet (nonce and
expiry included) is the authority, and a nonce is used once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import flask
import marshmallow as ma

from admin_api.auth import MANAGE_ROLES, POSTING_ROLES, READ_ROLES, current_actor, require_roles
from admin_api.errors import documents_problems
from admin_api.resources import BaseUnits, Blueprint, StrictSchema, ledger_state, page_limit, signed_int
from ledger import audit
from ledger.audit import Actor, AuditRecord
from ledger.errors import InvalidInput
from ledger.money import UINT256_LIMIT
from ledger.points import claims, expiry, ingest, rules, statements

blp = Blueprint("points", __name__, description="Points: rules, participants, events, balances, claims")

INGEST_ROLES = ("admin", "operator")
# A batch of 10,000 events does not fit the API's usual body limit; this route takes more.
EVENTS_BODY_MAX_BYTES = 8 * 1024 * 1024
CLAIM_ROLES = ("admin", "finance", "operator")
EXPIRE_ROLES = ("admin", "finance", "operator")


class Count(ma.fields.String):
    """A count of points as a string of digits, 0 allowed, below 2^256."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not text.isascii() or not text.isdigit() or len(text) > 78 or int(text) >= UINT256_LIMIT:
            raise ma.ValidationError("must be a string of digits below 2^256")
        return int(text)


class RuleInSchema(StrictSchema):
    event_type = ma.fields.String(required=True, validate=ma.validate.Length(1, 64))
    points = Count(required=True, metadata={"description": "Points per event (before the tier multiplier)"})
    tier_multipliers_bps = ma.fields.Dict(
        keys=ma.fields.String(),
        values=ma.fields.Integer(strict=True, validate=ma.validate.Range(0, rules.MULTIPLIER_MAX_BPS)),
        load_default=dict,
        metadata={"description": "Tier -> multiplier in basis points (10000 = 1x); other tiers score 1x"},
    )
    daily_cap = Count(
        allow_none=True, load_default=None, metadata={"description": "Per participant and UTC day"}
    )
    expires_after_s = ma.fields.Integer(
        strict=True, allow_none=True, load_default=None, validate=ma.validate.Range(1, rules.EXPIRY_MAX_S)
    )
    effective_at = ma.fields.AwareDateTime(
        load_default=None,
        metadata={"description": "When the version takes effect (default: now; never past)"},
    )


class RuleQuerySchema(StrictSchema):
    limit = page_limit()
    after = ma.fields.Integer(validate=ma.validate.Range(0, 2**63 - 1))
    event_type = ma.fields.String(validate=ma.validate.Length(1, 64))


class ParticipantInSchema(StrictSchema):
    tier = ma.fields.String(required=True, validate=ma.validate.Length(1, 32))
    wallet = ma.fields.String(allow_none=True, load_default=None, metadata={"description": "0x address"})


class ParticipantQuerySchema(StrictSchema):
    limit = page_limit()
    after = ma.fields.String(validate=ma.validate.Length(1, 100))


class EventsInSchema(StrictSchema):
    events = ma.fields.List(
        ma.fields.Dict(),
        required=True,
        metadata={
            "description": "Up to 10000 events: source, event_id, participant, type, occurred_at (ISO 8601"
            " with a zone), optional details (object)"
        },
    )


class HistoryQuerySchema(StrictSchema):
    limit = page_limit()
    after = ma.fields.Integer(validate=ma.validate.Range(0, 2**63 - 1))


class ClaimInSchema(StrictSchema):
    participant = ma.fields.String(required=True, validate=ma.validate.Length(1, 100))
    points = BaseUnits(required=True, metadata={"description": "Points to claim, a string of digits"})
    key = ma.fields.String(required=True, validate=ma.validate.Length(1, 200))


class SignedPointsClaimSchema(StrictSchema):
    request = ma.fields.Dict(
        required=True, metadata={"description": "The ClaimPoints fields: participant, points, nonce, expiry"}
    )
    signature = ma.fields.String(required=True, metadata={"description": "EIP-712 signature of the wallet"})


class ClaimQuerySchema(StrictSchema):
    limit = page_limit()
    after = ma.fields.Integer(validate=ma.validate.Range(0, 2**63 - 1))
    participant = ma.fields.String(validate=ma.validate.Length(1, 100))


F = TypeVar("F", bound=Callable[..., Any])


def _body_up_to(limit: int) -> Callable[[F], F]:
    """Let this route's body be up to ``limit`` bytes (set before the body is read)."""

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flask.request.max_content_length = limit
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def _audit(actor: Actor, action: str, target: str, before: Any, after: Any) -> AuditRecord:
    return AuditRecord(actor, action, target, before, after)


def _page(items: list[Any], limit: int, cursor: Any) -> dict[str, Any]:
    page = items[:limit]
    return {"items": [i.as_dict() for i in page], "next": cursor(page[-1]) if len(items) > limit else None}


def _chain() -> claims.Chain:
    deployment = ledger_state().deployment()
    return claims.Chain(deployment.chain_id, deployment.token, deployment.treasury)


# -- rules ------------------------------------------------------------------------------------------


@blp.route("/points/rules", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.arguments(RuleQuerySchema, location="query")
@blp.response(200)
def list_rules(query: dict[str, Any]) -> dict[str, Any]:
    """Every version of every rule, oldest first (pass `next` back as `after`)."""
    with ledger_state().engine.connect() as conn:
        found = rules.list_rules(
            conn, event_type=query.get("event_type"), after=query.get("after"), limit=query["limit"] + 1
        )
    return _page(found, query["limit"], lambda r: r.id)


@blp.route("/points/rules", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(409)
@blp.arguments(RuleInSchema)
@blp.response(201, description="The new version")
def add_rule(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A new version of an event type's rule. It applies to events occurring from `effective_at`
    (now by default; a time in the past is 400); events already scored keep their score. 409
    `rule_conflict` when a version already takes effect at or after that time."""
    actor = current_actor()
    new = rules.NewRule(
        event_type=body["event_type"],
        points=body["points"],
        tier_multipliers_bps=body["tier_multipliers_bps"],
        daily_cap=body["daily_cap"],
        expires_after_s=body["expires_after_s"],
        effective_at=body["effective_at"],
    )
    with ledger_state().engine.begin() as conn:
        rule = rules.add_rule_version(conn, new, actor.actor)
        audit.record(
            conn, [_audit(actor, "points.rule", f"points:rule:{rule.event_type}", None, rule.as_dict())]
        )
    return rule.as_dict(), 201


# -- participants -----------------------------------------------------------------------------------


@blp.route("/points/participants", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.arguments(ParticipantQuerySchema, location="query")
@blp.response(200)
def list_participants(query: dict[str, Any]) -> dict[str, Any]:
    """Participants by id (pass `next` back as `after`)."""
    with ledger_state().engine.connect() as conn:
        found = rules.list_participants(conn, query.get("after"), query["limit"] + 1)
    return _page(found, query["limit"], lambda p: p.id)


@blp.route("/points/participants/<participant_id>", methods=["PUT"])
@require_roles(*POSTING_ROLES)
@blp.arguments(ParticipantInSchema)
@blp.response(201, description="Registered, with its points account")
@blp.alt_response(200, description="Known: tier and wallet as given now")
def set_participant(body: dict[str, Any], participant_id: str) -> tuple[dict[str, Any], int]:
    """Register a participant or change its tier or wallet (a tier applies to events scored
    after the change; the wallet receives claims and signs the participant's own claims)."""
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        before, after, status = rules.set_participant(
            conn, participant_id, body["tier"], body["wallet"], actor.actor
        )
        if before is None or before != after:
            record = _audit(
                actor,
                "points.participant",
                f"points:participant:{participant_id}",
                None if before is None else before.as_dict(),
                after.as_dict(),
            )
            audit.record(conn, [record])
    return after.as_dict(), 201 if status == "created" else 200


@blp.route("/points/participants/<participant_id>", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200)
def get_participant(participant_id: str) -> dict[str, Any]:
    with ledger_state().engine.connect() as conn:
        return rules.get_participant(conn, rules.check_participant_id(participant_id)).as_dict()


@blp.route("/points/participants/<participant_id>/balance", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200)
def participant_balance(participant_id: str) -> dict[str, Any]:
    """Posted points, held by pending claims, available, claimable now (unexpired) and the next expiry."""
    with ledger_state().engine.connect() as conn:
        return statements.balance(conn, rules.check_participant_id(participant_id)).as_dict()


@blp.route("/points/participants/<participant_id>/history", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.arguments(HistoryQuerySchema, location="query")
@blp.response(200)
def participant_history(query: dict[str, Any], participant_id: str) -> dict[str, Any]:
    """The participant's accruals, newest first, each with the rule version, tier, multiplier,
    cap and the reason in words (pass `next` back as `after`)."""
    with ledger_state().engine.connect() as conn:
        found = statements.history(
            conn,
            rules.check_participant_id(participant_id),
            after=query.get("after"),
            limit=query["limit"] + 1,
        )
    return _page(found, query["limit"], lambda a: a.id)


# -- events -----------------------------------------------------------------------------------------


@blp.route("/points/events", methods=["POST"])
@require_roles(*INGEST_ROLES)
@documents_problems(413, 503)
@_body_up_to(EVENTS_BODY_MAX_BYTES)
@blp.arguments(EventsInSchema)
@blp.response(200, description="What the batch did: counts, points, and each event that accrued nothing")
def post_events(body: dict[str, Any]) -> dict[str, Any]:
    """Accrue a batch of events in one transaction. Each event counts once by (source, event_id):
    the same event again is `exists`, the same id with other content a `conflict`; events of
    unknown participants, with no rule in force or from the future are `rejected`. None of these
    writes anything; a malformed batch is 400 and writes nothing at all. The body may take up to
    8 MiB (a batch of 10,000 events fits)."""
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        report = ingest.ingest(conn, body["events"])
        summary = report.as_dict(details_max=0)
        del summary["skipped"]
        audit.record(conn, [_audit(actor, "points.ingest", f"points:batch:{report.batch_id}", None, summary)])
    return report.as_dict()


# -- claims -----------------------------------------------------------------------------------------


@blp.route("/points/claims", methods=["POST"])
@require_roles(*CLAIM_ROLES)
@documents_problems(404, 409, 422, 503)
@blp.arguments(ClaimInSchema)
@blp.response(201, description="Claimed: points and mint held, the mint queued")
@blp.alt_response(200, description="The same claim under the same key again")
def create_claim(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Claim a participant's points as TRACE minted to its wallet, at `TRACE_POINTS_PER_TRACE`:
    the payout rounds down and only the points that pay it are taken. 422 `insufficient_points`,
    `no_wallet`, `claim_too_small`; 409 `idempotency_conflict` for another claim under `key`."""
    actor = current_actor()
    state = ledger_state()
    chain = _chain()
    with state.engine.begin() as conn:
        claim, status = claims.create_claim(
            conn,
            chain,
            rules.check_participant_id(body["participant"]),
            body["points"],
            f"staff:{body['key']}",
            state.settings.points_per_trace,
            actor.actor,
        )
        if status == "created":
            audit.record(
                conn, [_audit(actor, "points.claim", f"points:claim:{claim.id}", None, claim.as_dict())]
            )
    return claim.as_dict(), 201 if status == "created" else 200


@blp.route("/party/points/claims", methods=["POST"])
@documents_problems(404, 409, 422, 503)
@blp.arguments(SignedPointsClaimSchema)
@blp.response(201, description="Claimed")
@blp.alt_response(200, description="The same signed claim again")
def create_signed_claim(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A participant's own claim (no API key): an EIP-712 `ClaimPoints` message (`participant,
    points, nonce, expiry`) signed by the participant's registered wallet under the domain
    `TraceChain Settlement` / `1` / chain id / TRACE token. Another signer, other terms or an
    expired request are 400; the nonce with another request is 409 `nonce_replayed`."""
    state = ledger_state()
    chain = _chain()
    raw = body["request"]
    names = ("participant", "points", "nonce", "expiry")
    if set(raw) != set(names):
        raise InvalidInput(f"request fields must be exactly {list(names)}")
    request = claims.ClaimPointsRequest(
        participant=raw["participant"],
        points=signed_int(raw, "points"),
        nonce=signed_int(raw, "nonce"),
        expiry=signed_int(raw, "expiry"),
    )
    with state.engine.begin() as conn:
        claim, status = claims.create_signed_claim(
            conn, chain, request, body["signature"], state.settings.points_per_trace, datetime.now(UTC)
        )
    return claim.as_dict(), 201 if status == "created" else 200


@blp.route("/points/claims", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.arguments(ClaimQuerySchema, location="query")
@blp.response(200)
def list_claims(query: dict[str, Any]) -> dict[str, Any]:
    """Claims, newest first, with their state (pending, paid, failed); pass `next` back as `after`."""
    participant = query.get("participant")
    with ledger_state().engine.connect() as conn:
        found = claims.list_claims(
            conn,
            participant_id=None if participant is None else rules.check_participant_id(participant),
            after=query.get("after"),
            limit=query["limit"] + 1,
        )
    return _page(found, query["limit"], lambda c: c.id)


@blp.route("/points/claims/<int:claim_id>", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200)
def get_claim(claim_id: int) -> dict[str, Any]:
    with ledger_state().engine.connect() as conn:
        return claims.get_claim(conn, claim_id).as_dict()


# -- expiry -----------------------------------------------------------------------------------------


@blp.route("/points/expiry", methods=["POST"])
@require_roles(*EXPIRE_ROLES)
@blp.response(200, description="Lots expired and points returned to points:issued")
def sweep_expiry() -> dict[str, Any]:
    """Run one round of the expiry sweep now (beat runs it every `TRACE_POINTS_EXPIRY_INTERVAL_S`):
    `lots` expired, `points` returned, `examined` lots past their expiry; `more` when a round could
    not look at them all (call again)."""
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        report = expiry.expire_points(conn)
        if report.lots:
            audit.record(conn, [_audit(actor, "points.expire", "points:expiry", None, report.as_dict())])
    return {**report.as_dict(), "more": report.examined == expiry.SWEEP_MAX_LOTS}
