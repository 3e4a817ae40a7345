"""Staking: pools (staff), the liability report (finance, auditors), each staker's rewards to the
second (public) and their signed claims.

Staff writes are audited. A staker needs no key: reading the rewards of a public address is
public, and a claim carries the staker's EIP-712 ``ClaimRewards`` signature (under the staking
vault's domain) with a nonce used once.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import marshmallow as ma

from admin_api.auth import MANAGE_ROLES, READ_ROLES, current_actor, require_roles
from admin_api.errors import documents_problems
from admin_api.resources import (
    BaseUnits,
    Blueprint,
    ServiceUnavailable,
    StrictBoolean,
    StrictSchema,
    id_cursor,
    ledger_state,
    page_limit,
    signed_int,
)
from admin_api.resources.escrows import Units
from ledger import audit
from ledger.audit import Actor, AuditRecord
from ledger.custody import check_address, mirror_code
from ledger.errors import InvalidInput
from ledger.escrow import party
from ledger.staking import service
from ledger.staking.accumulator import POOL_KINDS
from workers import staking_saga

blp = Blueprint("staking", __name__, description="Staking pools, rewards, claims and liabilities")

LIABILITY_ROLES = ("admin", "finance", "auditor")


_UINT64 = ma.validate.Range(0, 2**64 - 1)


class PoolInSchema(StrictSchema):
    name = ma.fields.String(required=True, validate=ma.validate.Length(1, service.NAME_MAX_CHARS))
    kind = ma.fields.String(required=True, validate=ma.validate.OneOf(POOL_KINDS))
    apr_bps = ma.fields.Integer(
        strict=True, validate=ma.validate.Range(0, service.APR_BPS_MAX), metadata={"description": "fixed_apr"}
    )
    rate_per_s = Units(metadata={"description": "emission: base units a second, shared pro rata"})
    lock_seconds = ma.fields.Integer(strict=True, required=True, validate=_UINT64)
    min_stake = Units(required=True)
    cap = BaseUnits(load_default=None, allow_none=True)
    active = StrictBoolean(load_default=True)


class PoolChangeSchema(StrictSchema):
    apr_bps = ma.fields.Integer(strict=True, validate=ma.validate.Range(0, service.APR_BPS_MAX))
    rate_per_s = Units()
    lock_seconds = ma.fields.Integer(strict=True, validate=_UINT64)
    min_stake = Units()
    cap = BaseUnits(allow_none=True)
    active = StrictBoolean()


class FundSchema(StrictSchema):
    key = ma.fields.String(required=True, validate=ma.validate.Length(1, 200))
    amount = BaseUnits(required=True)


class PoolListArgs(StrictSchema):
    limit = page_limit()
    after = id_cursor()


class ClaimRequestSchema(StrictSchema):
    poolId = ma.fields.Raw(required=True)
    amount = ma.fields.Raw(required=True)
    compound = ma.fields.Raw(required=True)
    nonce = ma.fields.Raw(required=True)
    expiry = ma.fields.Raw(required=True)


class SignedRewardsClaimSchema(StrictSchema):
    request = ma.fields.Nested(ClaimRequestSchema, required=True)
    signature = ma.fields.String(required=True, validate=ma.validate.Length(1, 200))


class PoolSchema(ma.Schema):
    id = ma.fields.Integer()
    name = ma.fields.String()
    chain_id = ma.fields.Integer()
    vault = ma.fields.String()
    kind = ma.fields.String()
    apr_bps = ma.fields.Integer(allow_none=True)
    rate_per_s = ma.fields.String(allow_none=True)
    lock_seconds = ma.fields.Integer()
    min_stake = ma.fields.String()
    cap = ma.fields.String(allow_none=True)
    active = ma.fields.Boolean()
    total_staked = ma.fields.String()
    emitted = ma.fields.String()
    last_tick_s = ma.fields.Integer()
    budget_exhausted = ma.fields.Boolean()
    exhausted_since_s = ma.fields.Integer(allow_none=True)
    accounts = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.String())


class PoolPageSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(PoolSchema))
    next = ma.fields.Integer(allow_none=True)


class FundedSchema(ma.Schema):
    pool = ma.fields.Nested(PoolSchema)
    entry_id = ma.fields.Integer()
    key = ma.fields.String()
    amount = ma.fields.String()


class RewardSchema(ma.Schema):
    pool_id = ma.fields.Integer()
    pool = ma.fields.String()
    kind = ma.fields.String()
    stake = ma.fields.String()
    unlock_at_s = ma.fields.Integer()
    unlocked = ma.fields.Boolean()
    accrued = ma.fields.String()
    claimable = ma.fields.String()
    apr_bps = ma.fields.Integer(allow_none=True)
    apr = ma.fields.String(allow_none=True)
    apy = ma.fields.String(allow_none=True)
    budget_exhausted = ma.fields.Boolean()
    as_of_s = ma.fields.Integer()


class RewardsSchema(ma.Schema):
    staker = ma.fields.String()
    as_of_s = ma.fields.Integer()
    pools = ma.fields.List(ma.fields.Nested(RewardSchema))


class ClaimSchema(ma.Schema):
    pool_id = ma.fields.Integer()
    staker = ma.fields.String()
    mode = ma.fields.String()
    amount = ma.fields.String()
    outbox = ma.fields.String()
    status = ma.fields.String()


class LiabilitySchema(ma.Schema):
    pool_id = ma.fields.Integer()
    pool = ma.fields.String()
    funded = ma.fields.String()
    budget_remaining = ma.fields.String()
    emitted = ma.fields.String()
    paid = ma.fields.String()
    paying = ma.fields.String()
    accrued_unpaid = ma.fields.String()
    accrued_unpaid_to_now = ma.fields.String()
    budget_remaining_to_now = ma.fields.String()
    remainder = ma.fields.String()
    stakers = ma.fields.Integer()
    stakers_accrued = ma.fields.String()
    budget_exhausted = ma.fields.Boolean()
    as_of_s = ma.fields.Integer()


class TreasurySchema(ma.Schema):
    account = ma.fields.String()
    holds = ma.fields.String()
    committed = ma.fields.String()
    covered = ma.fields.Boolean()


class LiabilityReportSchema(ma.Schema):
    as_of_s = ma.fields.Integer()
    pools = ma.fields.List(ma.fields.Nested(LiabilitySchema))
    treasury = ma.fields.Nested(TreasurySchema, allow_none=True)


def _now_s() -> int:
    return int(time.time())


def _audit(actor: Actor, action: str, target: str, before: Any, after: Any) -> AuditRecord:
    return AuditRecord(actor, action, target, before, after)


# -- pools ----------------------------------------------------------------------------------


@blp.route("/staking/pools", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(409, 503)
@blp.arguments(PoolInSchema)
@blp.response(201, PoolSchema, description="Created, and its mirror on the vault queued")
@blp.alt_response(200, schema=PoolSchema, description="The same pool was created already")
def create_pool(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Create a pool: `fixed_apr` with `apr_bps`, or `emission` with `rate_per_s`. Its settings
    are mirrored on the staking vault (`configurePool`, through the outbox); its id is the
    vault's pool id. The same name with other settings is 409 `pool_conflict`."""
    actor = current_actor()
    state = ledger_state()
    deployment = state.deployment()
    settings = service.PoolSettings(
        kind=body["kind"],
        apr_bps=body.get("apr_bps"),
        rate_per_s=body.get("rate_per_s"),
        lock_seconds=body["lock_seconds"],
        min_stake=body["min_stake"],
        cap=body["cap"],
        active=body["active"],
    )
    with state.engine.begin() as conn:
        pool, status = staking_saga.create_pool(
            conn, deployment, body["name"], settings, actor.actor, _now_s()
        )
        if status == "created":
            audit.record(
                conn, [_audit(actor, "staking.pool.create", f"pool:{pool.id}", None, pool.as_dict())]
            )
    return pool.as_dict(), 201 if status == "created" else 200


@blp.route("/staking/pools", methods=["GET"])
@require_roles(*READ_ROLES)
@blp.arguments(PoolListArgs, location="query")
@blp.response(200, PoolPageSchema)
def list_pools(args: dict[str, Any]) -> dict[str, Any]:
    """Pools in id order (keyset pages)."""
    limit = args["limit"]
    with ledger_state().engine.connect() as conn:
        pools = service.list_pools(conn, after=args.get("after", 0), limit=limit + 1)
    page = pools[:limit]
    return {"items": [p.as_dict() for p in page], "next": page[-1].id if len(pools) > limit else None}


@blp.route("/staking/pools/<int:pool_id>", methods=["GET"])
@require_roles(*READ_ROLES)
@documents_problems(404)
@blp.response(200, PoolSchema)
def show_pool(pool_id: int) -> dict[str, Any]:
    """One pool, its settings, accumulator totals and accounts."""
    with ledger_state().engine.connect() as conn:
        return service.get_pool(conn, pool_id).as_dict()


@blp.route("/staking/pools/<int:pool_id>", methods=["PATCH"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404, 503)
@blp.arguments(PoolChangeSchema)
@blp.response(200, PoolSchema)
def change_pool(body: dict[str, Any], pool_id: int) -> dict[str, Any]:
    """Change a pool's rate or settings from now on: the pool ticks at the old rate first. Lock,
    minimum, cap and active are mirrored on the vault. The kind cannot change."""
    if not body:
        raise InvalidInput("name at least one setting to change")
    actor = current_actor()
    state = ledger_state()
    deployment = state.deployment()
    with state.engine.begin() as conn:
        before, after = staking_saga.change_pool(conn, deployment, pool_id, body, actor.actor, _now_s())
        audit.record(
            conn, [_audit(actor, "staking.pool.change", f"pool:{pool_id}", before.as_dict(), after.as_dict())]
        )
    return after.as_dict()


@blp.route("/staking/pools/<int:pool_id>/fund", methods=["POST"])
@require_roles(*MANAGE_ROLES)
@documents_problems(404, 409)
@blp.arguments(FundSchema)
@blp.response(201, FundedSchema, description="Funded")
@blp.alt_response(200, schema=FundedSchema, description="Funded earlier under the same key")
def fund_pool(body: dict[str, Any], pool_id: int) -> tuple[dict[str, Any], int]:
    """Add to a pool's rewards budget (`staking:rewards:expense` → `rewards:{pool}:budget`) under
    the caller's idempotency `key`; the same key for another amount or pool is 409
    `idempotency_conflict`. A pool that ran dry resumes from now; the time it stood still is not
    paid back."""
    actor = current_actor()
    with ledger_state().engine.begin() as conn:
        entry_id, status = service.fund_pool(
            conn, pool_id, body["amount"], key=body["key"], actor=actor.actor, now_s=_now_s()
        )
        pool = service.get_pool(conn, pool_id)
        out = {
            "pool": pool.as_dict(),
            "entry_id": entry_id,
            "key": body["key"],
            "amount": str(body["amount"]),
        }
        if status == "created":
            audit.record(conn, [_audit(actor, "staking.pool.fund", f"pool:{pool_id}", None, out)])
    return out, 201 if status == "created" else 200


@blp.route("/staking/liabilities", methods=["GET"])
@require_roles(*LIABILITY_ROLES)
@blp.response(200, LiabilityReportSchema)
def liabilities() -> dict[str, Any]:
    """Per pool: funded budget, what is left, emitted, paid, accrued but unpaid (booked, and to
    this second), the remainder carried forward, and the stakers' own accrued sum. `treasury`:
    what the treasury wallet's custody mirror holds against what the pools have committed (null
    before the platform is deployed)."""
    now_s = _now_s()
    state = ledger_state()
    try:
        deployment = state.deployment()
    except ServiceUnavailable:
        deployment = None
    with state.engine.connect() as conn:
        pools = service.liability_report(conn, now_s)
        treasury = (
            None
            if deployment is None
            else service.treasury_cover(conn, mirror_code(deployment.chain_id, deployment.treasury), pools)
        )
    return {"as_of_s": now_s, "pools": pools, "treasury": treasury}


# -- stakers --------------------------------------------------------------------------------


@blp.route("/stakers/<address>/rewards", methods=["GET"])
@blp.response(200, RewardsSchema)
def rewards(address: str) -> dict[str, Any]:
    """A staker's positions and rewards to the second, per pool: stake, unlock time, accrued,
    claimable, APR and the APY it compounds to (daily), and whether the pool's budget ran out.
    Public: no key for a public address."""
    staker = check_address(address, "address")
    now_s = _now_s()
    with ledger_state().engine.connect() as conn:
        return {"staker": staker, "as_of_s": now_s, "pools": service.rewards_of(conn, staker, now_s)}


@blp.route("/stakers/<address>/claims", methods=["POST"])
@documents_problems(404, 409, 422, 503)
@blp.arguments(SignedRewardsClaimSchema)
@blp.response(202, ClaimSchema, description="The claim is on its way to the chain")
@blp.alt_response(200, schema=ClaimSchema, description="The same signed claim again")
def claim(body: dict[str, Any], address: str) -> tuple[dict[str, Any], int]:
    """Claim rewards with an EIP-712 `ClaimRewards` signature (`poolId, amount, compound, nonce,
    expiry`; `amount` 0 claims everything accrued) under the domain `TraceChain Settlement` /
    `1` / chain id / staking vault. Paid from the treasury, or with `compound` staked into the
    staker's position. Another wallet's signature is 400; a used nonce with other terms 409
    `nonce_replayed`; more than accrued 422 `exceeds_accrued`, nothing accrued 422
    `nothing_to_claim`."""
    staker = check_address(address, "address")
    state = ledger_state()
    deployment = state.deployment()
    raw = body["request"]
    compound = raw["compound"]
    if not isinstance(compound, bool):
        raise InvalidInput("request.compound must be true or false")
    request = party.ClaimRewardsRequest(
        pool_id=signed_int(raw, "poolId"),
        amount=signed_int(raw, "amount"),
        compound=compound,
        nonce=signed_int(raw, "nonce"),
        expiry=signed_int(raw, "expiry"),
    )
    party.require_signer(
        request,
        body["signature"],
        deployment.chain_id,
        deployment.vault,
        staker,
        datetime.fromtimestamp(_now_s(), UTC),
    )
    digest = request.digest(deployment.chain_id, deployment.vault)
    key = staking_saga.claim_key(staker, request.nonce)
    with state.engine.begin() as conn:
        earlier = party.use_nonce(conn, staker, request.nonce, "staking.claim", digest, key)
        if earlier is not None:
            found = staking_saga.get_claim(conn, earlier)
            if found is None:
                raise InvalidInput("the nonce was used by another kind of request")
            return found.as_dict(), 200
        made = staking_saga.enqueue_claim(
            conn,
            deployment,
            request.pool_id,
            staker,
            request.amount or None,
            "compound" if request.compound else "pay",
            request.nonce,
            _now_s(),
        )
    return made.as_dict(), 202
