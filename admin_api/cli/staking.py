"""`tracechain staking`: pools, ticks, a staker's rewards and the liability report from a shell
(the admin API does the same). Writes are audited under the shell user (``cli:<user>``)."""

from __future__ import annotations

import time
from typing import Any

import click

from admin_api.cli.runtime import Failed, app_engine, base_units, cli_actor, emit, emit_line, load_deployment
from contracts.deployment import Deployment
from ledger import audit
from ledger.audit import AuditRecord
from ledger.custody import mirror_code
from ledger.settings import Settings
from ledger.staking import service
from ledger.staking.accumulator import POOL_KINDS
from workers import staking_saga

_UINT64 = click.IntRange(0, 2**64 - 1)


def _now_s() -> int:
    return int(time.time())


@click.group("staking")
def staking() -> None:
    """Staking pools: create, change, fund, list, show, tick; rewards; liabilities."""


@staking.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(POOL_KINDS), required=True)
@click.option("--apr-bps", type=click.IntRange(0, service.APR_BPS_MAX), help="fixed_apr pools.")
@click.option("--rate", "rate_per_s", callback=base_units, help="emission pools: base units a second.")
@click.option("--lock-seconds", type=_UINT64, default=0, show_default=True)
@click.option("--min-stake", callback=base_units, default="0", show_default=True, help="Base units.")
@click.option("--cap", callback=base_units, help="Base units (default: no cap).")
@click.option("--inactive", is_flag=True, help="Create the pool closed to new stakes.")
@click.pass_obj
def create(
    settings: Settings,
    name: str,
    kind: Any,
    apr_bps: int | None,
    rate_per_s: int | None,
    lock_seconds: int,
    min_stake: int,
    cap: int | None,
    inactive: bool,
) -> None:
    """Create a pool and queue its mirror on the vault; prints the pool and `result`."""
    actor = cli_actor("staking-create")
    deployment = load_deployment(settings)
    pool_settings = service.PoolSettings(
        kind, apr_bps, rate_per_s, lock_seconds, min_stake, cap or None, not inactive
    )
    with app_engine(settings) as engine, engine.begin() as conn:
        pool, status = staking_saga.create_pool(conn, deployment, name, pool_settings, actor.actor, _now_s())
        if status == "created":
            audit.record(
                conn, [AuditRecord(actor, "staking.pool.create", f"pool:{pool.id}", None, pool.as_dict())]
            )
    emit({**pool.as_dict(), "result": status})


@staking.command("change")
@click.argument("pool_id", type=click.IntRange(1))
@click.option("--apr-bps", type=click.IntRange(0, service.APR_BPS_MAX))
@click.option("--rate", "rate_per_s", callback=base_units)
@click.option("--lock-seconds", type=_UINT64)
@click.option("--min-stake", callback=base_units)
@click.option("--cap", callback=base_units, help="Base units; 0 removes the cap.")
@click.option("--active/--inactive", default=None)
@click.pass_obj
def change(settings: Settings, /, pool_id: int, **options: Any) -> None:
    """Change a pool's rate or settings from now on (it ticks first at the old rate)."""
    changes = {k: v for k, v in options.items() if v is not None}
    if "cap" in changes:
        changes["cap"] = changes["cap"] or None
    actor = cli_actor("staking-change")
    deployment = load_deployment(settings)
    with app_engine(settings) as engine, engine.begin() as conn:
        before, after = staking_saga.change_pool(conn, deployment, pool_id, changes, actor.actor, _now_s())
        audit.record(
            conn,
            [AuditRecord(actor, "staking.pool.change", f"pool:{pool_id}", before.as_dict(), after.as_dict())],
        )
    emit(after.as_dict())


@staking.command("fund")
@click.argument("pool_id", type=click.IntRange(1))
@click.option("--amount", callback=base_units, required=True, help="Base units.")
@click.option("--key", required=True, help="Idempotency key: the same key again books nothing more.")
@click.pass_obj
def fund(settings: Settings, pool_id: int, amount: int, key: str) -> None:
    """Add to a pool's rewards budget; prints `{pool_id, key, amount, entry_id, result}`."""
    actor = cli_actor("staking-fund")
    with app_engine(settings) as engine, engine.begin() as conn:
        entry_id, status = service.fund_pool(
            conn, pool_id, amount, key=key, actor=actor.actor, now_s=_now_s()
        )
        out = {"pool_id": pool_id, "key": key, "amount": str(amount), "entry_id": entry_id}
        if status == "created":
            audit.record(conn, [AuditRecord(actor, "staking.pool.fund", f"pool:{pool_id}", None, out)])
    emit({**out, "result": status})


@staking.command("list")
@click.pass_obj
def list_(settings: Settings) -> None:
    """One JSON line per pool, by id."""
    with app_engine(settings) as engine, engine.connect() as conn:
        pools = service.list_pools(conn, limit=1000)
    for pool in pools:
        emit_line(pool.as_dict())


@staking.command("show")
@click.argument("pool_id", type=click.IntRange(1))
@click.pass_obj
def show(settings: Settings, pool_id: int) -> None:
    """One pool: settings, accumulator totals, accounts."""
    with app_engine(settings) as engine, engine.connect() as conn:
        emit(service.get_pool(conn, pool_id).as_dict())


@staking.command("tick")
@click.pass_obj
def tick(settings: Settings) -> None:
    """Tick every pool now (beat does it every TRACE_STAKING_TICK_INTERVAL_S) and give failed
    claims back; prints `{pools, entries, returned, exhausted}`."""
    with app_engine(settings) as engine:
        emit(staking_saga.tick_all(engine, _now_s()).as_dict())


@staking.command("rewards")
@click.argument("address")
@click.pass_obj
def rewards(settings: Settings, address: str) -> None:
    """A staker's rewards to the second, per pool (as `GET /stakers/{address}/rewards`)."""
    now_s = _now_s()
    with app_engine(settings) as engine, engine.connect() as conn:
        pools = service.rewards_of(conn, address, now_s)
    emit({"staker": address.lower(), "as_of_s": now_s, "pools": pools})


@staking.command("liabilities")
@click.pass_obj
def liabilities(settings: Settings) -> None:
    """Accrued-but-unpaid rewards against the funded budget, per pool (as `GET /staking/liabilities`)."""
    now_s = _now_s()
    try:
        deployment: Deployment | None = load_deployment(settings)
    except Failed:
        deployment = None
    with app_engine(settings) as engine, engine.connect() as conn:
        pools = service.liability_report(conn, now_s)
        treasury = (
            None
            if deployment is None
            else service.treasury_cover(conn, mirror_code(deployment.chain_id, deployment.treasury), pools)
        )
    emit({"as_of_s": now_s, "pools": pools, "treasury": treasury})
