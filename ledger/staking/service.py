"""Staking pools, positions, ticks, reward reads, claims and the liability report (DESIGN §8).

Accounts of pool ``{pool}`` (all TRACE liabilities that may not go below zero):

- ``rewards:{pool}:budget``: what the pool may still emit. Funding it books the rewards
  programme's cost, ``staking:rewards:expense`` (an expense account) → budget; the tokens stay
  in the treasury wallet (its custody mirror) until a claim pays them out.
- ``rewards:{pool}:payable``: emitted, unpaid rewards of all the pool's stakers together. Each
  staker's share is computed from the accumulator, so a tick books one entry whatever the
  number of stakers.
- ``rewards:{pool}:remainder``: flooring dust, handed out again with the next tick.
- ``stake:{pool}:{staker}``: the principal the vault owes the staker back.

Every function takes the time (``now_s``, Unix seconds) explicitly and works in the caller's
transaction. A pool's row is locked before its accounts, always.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_DOWN, Decimal, localcontext
from typing import Any, Final, cast

import sqlalchemy as sa

from ledger import accounts, exceptions_queue
from ledger.commands import ChainRef, Leg, NewEntry
from ledger.custody import TOKEN_ASSET, TOKEN_SCALE, check_address, clearing_code
from ledger.engine import post_batch
from ledger.errors import Conflict, InvalidInput, LedgerError, NotFound
from ledger.money import UINT256_LIMIT, check_amount
from ledger.staking import accumulator
from ledger.staking.accumulator import BPS, YEAR_S, PoolKind

EXPENSE_ACCOUNT: Final = "staking:rewards:expense"
NAME_MAX_CHARS: Final = 100
APR_BPS_MAX: Final = 1_000_000
UINT64_LIMIT: Final = 2**64
# How often a fixed APR compounds into the APY the API shows (daily).
COMPOUNDS_PER_YEAR: Final = 365
_NO_FLAGS: Final = ("debits_must_not_exceed_credits",)


def budget_account(pool_id: int) -> str:
    return f"rewards:{pool_id}:budget"


def payable_account(pool_id: int) -> str:
    return f"rewards:{pool_id}:payable"


def remainder_account(pool_id: int) -> str:
    return f"rewards:{pool_id}:remainder"


def stake_account(pool_id: int, staker: str) -> str:
    return f"stake:{pool_id}:{check_address(staker)}"


def _check_uint(value: object, limit: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise InvalidInput(f"{what} must be an integer from 0 to {limit - 1}")
    return value


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """What staff set on a pool. ``apr_bps`` for ``fixed_apr`` pools, ``rate_per_s`` (base units
    a second, shared pro rata) for ``emission`` pools; ``cap`` None means no cap."""

    kind: PoolKind
    apr_bps: int | None
    rate_per_s: int | None
    lock_seconds: int
    min_stake: int
    cap: int | None
    active: bool

    def __post_init__(self) -> None:
        if self.kind not in accumulator.POOL_KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(accumulator.POOL_KINDS)}")
        if self.kind == "fixed_apr":
            if self.apr_bps is None or self.rate_per_s is not None:
                raise InvalidInput("a fixed_apr pool takes apr_bps and no rate_per_s")
            _check_uint(self.apr_bps, APR_BPS_MAX + 1, "apr_bps")
        else:
            if self.rate_per_s is None or self.apr_bps is not None:
                raise InvalidInput("an emission pool takes rate_per_s and no apr_bps")
            _check_uint(self.rate_per_s, UINT256_LIMIT, "rate_per_s")
        _check_uint(self.lock_seconds, UINT64_LIMIT, "lock_seconds")
        _check_uint(self.min_stake, UINT256_LIMIT, "min_stake")
        if self.cap is not None:
            check_amount(self.cap, what="cap")
        if not isinstance(self.active, bool):
            raise InvalidInput("active must be true or false")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "apr_bps": self.apr_bps,
            "rate_per_s": None if self.rate_per_s is None else str(self.rate_per_s),
            "lock_seconds": self.lock_seconds,
            "min_stake": str(self.min_stake),
            "cap": None if self.cap is None else str(self.cap),
            "active": self.active,
        }


@dataclass(frozen=True, slots=True)
class Pool:
    id: int
    name: str
    chain_id: int
    vault: str
    settings: PoolSettings
    acc: int
    slack: int
    total_staked: int
    last_tick_s: int
    tick_seq: int
    emitted: int
    exhausted_since_s: int | None

    @property
    def state(self) -> accumulator.PoolState:
        s = self.settings
        return accumulator.PoolState(
            s.kind,
            s.apr_bps or 0,
            s.rate_per_s or 0,
            self.acc,
            self.slack,
            self.total_staked,
            self.last_tick_s,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "chain_id": self.chain_id,
            "vault": self.vault,
            **self.settings.as_dict(),
            "total_staked": str(self.total_staked),
            "emitted": str(self.emitted),
            "last_tick_s": self.last_tick_s,
            "budget_exhausted": self.exhausted_since_s is not None,
            "exhausted_since_s": self.exhausted_since_s,
            "accounts": {
                "budget": budget_account(self.id),
                "payable": payable_account(self.id),
                "remainder": remainder_account(self.id),
            },
        }


_POOL_SELECT = (
    "SELECT id, name, chain_id, vault, kind, apr_bps, rate_per_s, lock_seconds, min_stake, cap, active,"
    " acc, slack, total_staked, last_tick_s, tick_seq, emitted, exhausted_since_s FROM staking_pools"
)


def _pool_from_row(r: Any) -> Pool:
    settings = PoolSettings(
        kind=r.kind,
        apr_bps=r.apr_bps,
        rate_per_s=None if r.rate_per_s is None else int(r.rate_per_s),
        lock_seconds=int(r.lock_seconds),
        min_stake=int(r.min_stake),
        cap=None if r.cap is None else int(r.cap),
        active=r.active,
    )
    return Pool(
        r.id,
        r.name,
        r.chain_id,
        r.vault,
        settings,
        int(r.acc),
        int(r.slack),
        int(r.total_staked),
        int(r.last_tick_s),
        int(r.tick_seq),
        int(r.emitted),
        None if r.exhausted_since_s is None else int(r.exhausted_since_s),
    )


def get_pool(conn: sa.Connection, pool_id: int, *, for_update: bool = False) -> Pool:
    if isinstance(pool_id, bool) or not isinstance(pool_id, int) or not 0 < pool_id < 2**63:
        raise InvalidInput("pool id must be a positive integer")
    lock = " FOR UPDATE" if for_update else ""
    row = conn.execute(sa.text(f"{_POOL_SELECT} WHERE id = :id{lock}"), {"id": pool_id}).first()
    if row is None:
        raise NotFound("pool_not_found", f"no staking pool {pool_id}")
    return _pool_from_row(row)


def list_pools(conn: sa.Connection, *, after: int = 0, limit: int = 100) -> list[Pool]:
    rows = conn.execute(
        sa.text(f"{_POOL_SELECT} WHERE id > :after ORDER BY id LIMIT :limit"),
        {"after": after, "limit": max(1, min(limit, 1000))},
    )
    return [_pool_from_row(r) for r in rows]


def _move(
    conn: sa.Connection,
    pool_id: int,
    kind: str,
    actor: str,
    details: Mapping[str, Any],
    *,
    staker: str | None = None,
    amount: int | None = None,
    event_key: str | None = None,
) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO staking_moves (pool_id, staker, kind, amount, event_key, actor, details)"
            " VALUES (:p, :s, :k, :a, :e, :actor, CAST(:d AS jsonb))"
        ),
        {
            "p": pool_id,
            "s": staker,
            "k": kind,
            "a": amount,
            "e": event_key,
            "actor": actor,
            "d": json.dumps(dict(details), sort_keys=True),
        },
    )


def ensure_accounts(conn: sa.Connection, pool_id: int) -> None:
    """The token asset, the expense account and the pool's three accounts (idempotent)."""
    accounts.create_asset(conn, TOKEN_ASSET, TOKEN_SCALE)
    accounts.create_account(conn, EXPENSE_ACCOUNT, TOKEN_ASSET, "expense")
    for code in (budget_account(pool_id), payable_account(pool_id), remainder_account(pool_id)):
        accounts.create_account(conn, code, TOKEN_ASSET, "liability", _NO_FLAGS, {"staking_pool": pool_id})


def ensure_stake_account(conn: sa.Connection, pool_id: int, staker: str) -> str:
    code = stake_account(pool_id, staker)
    accounts.create_account(conn, code, TOKEN_ASSET, "liability", _NO_FLAGS, {"staking_pool": pool_id})
    return code


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX_CHARS or not name.isprintable():
        raise InvalidInput(f"pool name must be 1 to {NAME_MAX_CHARS} printable characters")
    return name


def create_pool(
    conn: sa.Connection,
    name: str,
    settings: PoolSettings,
    *,
    chain_id: int,
    vault: str,
    actor: str,
    now_s: int,
) -> tuple[Pool, accounts.Created]:
    """Create a pool and its accounts. The same name with the same settings again is ``exists``;
    with others it is a conflict."""
    _check_name(name)
    vault = check_address(vault, "vault")
    row = conn.execute(
        sa.text(
            "INSERT INTO staking_pools (name, chain_id, vault, kind, apr_bps, rate_per_s, lock_seconds,"
            " min_stake, cap, active, last_tick_s, created_by)"
            " VALUES (:name, :chain, :vault, :kind, :apr, :rate, :lock, :min, :cap, :active, :now, :actor)"
            " ON CONFLICT (name) DO NOTHING RETURNING id"
        ),
        {
            "name": name,
            "chain": chain_id,
            "vault": vault,
            "kind": settings.kind,
            "apr": settings.apr_bps,
            "rate": settings.rate_per_s,
            "lock": settings.lock_seconds,
            "min": settings.min_stake,
            "cap": settings.cap,
            "active": settings.active,
            "now": now_s,
            "actor": actor,
        },
    ).scalar_one_or_none()
    if row is None:
        existing_id = conn.execute(
            sa.text("SELECT id FROM staking_pools WHERE name = :n"), {"n": name}
        ).scalar_one()
        existing = get_pool(conn, int(existing_id))
        if existing.settings != settings or existing.chain_id != chain_id or existing.vault != vault:
            raise Conflict("pool_conflict", f"pool {name!r} exists with other settings")
        return existing, "exists"
    pool_id = int(row)
    ensure_accounts(conn, pool_id)
    _move(conn, pool_id, "pool_created", actor, {"name": name, **settings.as_dict()})
    return get_pool(conn, pool_id), "created"


def change_pool(
    conn: sa.Connection, pool_id: int, changes: Mapping[str, Any], *, actor: str, now_s: int
) -> tuple[Pool, Pool]:
    """Change a pool's settings from ``now_s`` on: the pool ticks first at the old rate. Returns
    (before, after). The kind cannot change."""
    allowed = {"apr_bps", "rate_per_s", "lock_seconds", "min_stake", "cap", "active"}
    unknown = set(changes) - allowed
    if unknown:
        raise InvalidInput(f"unknown pool settings: {', '.join(sorted(unknown))}")
    if not changes:
        raise InvalidInput("name at least one setting to change")
    before = get_pool(conn, pool_id, for_update=True)
    settings = PoolSettings(**{**_settings_dict(before.settings), **changes})
    tick_locked(conn, before, now_s)
    conn.execute(
        sa.text(
            "UPDATE staking_pools SET apr_bps = :apr, rate_per_s = :rate, lock_seconds = :lock,"
            " min_stake = :min, cap = :cap, active = :active, updated_at = now() WHERE id = :id"
        ),
        {
            "apr": settings.apr_bps,
            "rate": settings.rate_per_s,
            "lock": settings.lock_seconds,
            "min": settings.min_stake,
            "cap": settings.cap,
            "active": settings.active,
            "id": pool_id,
        },
    )
    _move(
        conn,
        pool_id,
        "pool_changed",
        actor,
        {"before": before.settings.as_dict(), "after": settings.as_dict(), "from_s": now_s},
    )
    return before, get_pool(conn, pool_id)


def _settings_dict(settings: PoolSettings) -> dict[str, Any]:
    return {
        "kind": settings.kind,
        "apr_bps": settings.apr_bps,
        "rate_per_s": settings.rate_per_s,
        "lock_seconds": settings.lock_seconds,
        "min_stake": settings.min_stake,
        "cap": settings.cap,
        "active": settings.active,
    }


def fund_pool(
    conn: sa.Connection, pool_id: int, amount: int, *, key: str, actor: str, now_s: int
) -> tuple[int, accounts.Created]:
    """Add ``amount`` to the pool's budget under the caller's idempotency ``key`` (the same key
    and amount again is ``exists``). The pool ticks first, so a pool that ran dry earns nothing
    back for the time it stood still. Returns the ledger entry id."""
    check_amount(amount)
    pool = get_pool(conn, pool_id, for_update=True)
    tick_locked(conn, pool, now_s)
    entry = NewEntry(
        key=key,
        legs=(Leg(EXPENSE_ACCOUNT, budget_account(pool_id), amount, TOKEN_ASSET),),
        kind="staking.fund",
        metadata={"pool": pool_id, "actor": actor},
    )
    [result] = post_batch(conn, [entry])
    if result.status == "rejected":
        if result.code == "idempotency_conflict":
            raise Conflict("idempotency_conflict", result.reason or f"key {key!r} was used for another entry")
        raise LedgerError(result.code or "rejected", result.reason or "funding refused")
    if result.status == "created":
        _move(conn, pool_id, "funded", actor, {"entry_key": key}, amount=amount)
    return int(cast(int, result.entry_id)), result.status


def _available(conn: sa.Connection, codes: Sequence[str]) -> dict[str, int]:
    """Spendable balance of liability accounts: credits posted - debits posted and pending."""
    rows = conn.execute(
        sa.text(
            "SELECT code, credits_posted - debits_posted - debits_pending AS available"
            " FROM ledger_accounts WHERE code = ANY(:codes)"
        ),
        {"codes": list(codes)},
    )
    found = {r.code: int(r.available) for r in rows}
    missing = set(codes) - set(found)
    if missing:
        raise NotFound("unknown_account", f"missing staking accounts {sorted(missing)}")
    return found


@dataclass(frozen=True, slots=True)
class TickReport:
    pool_id: int
    last_tick_s: int
    from_budget: int
    to_payable: int
    dust: int
    exhausted: bool
    entry_key: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool_id": self.pool_id,
            "last_tick_s": self.last_tick_s,
            "from_budget": str(self.from_budget),
            "to_payable": str(self.to_payable),
            "dust": str(self.dust),
            "budget_exhausted": self.exhausted,
            "entry_key": self.entry_key,
        }


def virtual_tick(conn: sa.Connection, pool: Pool, now_s: int) -> accumulator.Tick:
    """What a tick at ``now_s`` would do, without writing."""
    available = _available(conn, (budget_account(pool.id), remainder_account(pool.id)))
    return accumulator.tick(
        pool.state, now_s, available[budget_account(pool.id)], available[remainder_account(pool.id)]
    )


def exhausted_now(conn: sa.Connection, pool: Pool, result: accumulator.Tick) -> bool:
    """Whether the pool's budget has run out as of the (virtual) tick ``result``: the tick was cut
    short, or the pool was marked exhausted and its budget is still empty."""
    if result.exhausted:
        return True
    if pool.exhausted_since_s is None:
        return False
    left = _available(conn, (budget_account(pool.id),))[budget_account(pool.id)] - result.from_budget
    return left == 0


def tick_locked(conn: sa.Connection, pool: Pool, now_s: int) -> TickReport:
    """Tick a pool whose row the caller has locked: one ledger entry (if any money moves) and
    one row update, whatever the number of stakers."""
    result = virtual_tick(conn, pool, now_s)
    entry_key = None
    if result.moves_money:
        seq = pool.tick_seq + 1
        entry_key = f"staking:tick:{pool.id}:{seq}"
        legs = []
        if result.from_budget:
            legs.append(
                Leg(budget_account(pool.id), remainder_account(pool.id), result.from_budget, TOKEN_ASSET)
            )
        if result.to_payable:
            legs.append(
                Leg(remainder_account(pool.id), payable_account(pool.id), result.to_payable, TOKEN_ASSET)
            )
        if result.dust:
            legs.append(Leg(payable_account(pool.id), remainder_account(pool.id), result.dust, TOKEN_ASSET))
        entry = NewEntry(
            key=entry_key,
            legs=tuple(legs),
            kind="staking.tick",
            metadata={"pool": pool.id, "from_s": pool.last_tick_s, "to_s": result.last_tick_s},
        )
        [booked] = post_batch(conn, [entry])
        if booked.status != "created":
            raise LedgerError(
                booked.code or "tick_refused", f"tick {entry_key}: {booked.reason or booked.status}"
            )
    else:
        seq = pool.tick_seq
    exhausted_since = pool.exhausted_since_s
    if result.exhausted and exhausted_since is None:
        exhausted_since = now_s
        _move(conn, pool.id, "exhausted", "system", {"at_s": now_s, "wanted": str(result.wanted)})
    elif exhausted_since is not None and result.wanted > 0 and not result.exhausted:
        exhausted_since = None
        _move(conn, pool.id, "replenished", "system", {"at_s": now_s})
    if (
        result.last_tick_s != pool.last_tick_s
        or seq != pool.tick_seq
        or exhausted_since != pool.exhausted_since_s
    ):
        conn.execute(
            sa.text(
                "UPDATE staking_pools SET acc = :acc, slack = :slack, last_tick_s = :t, tick_seq = :seq,"
                " emitted = emitted + :emitted, exhausted_since_s = :ex, updated_at = now() WHERE id = :id"
            ),
            {
                "acc": result.acc,
                "slack": result.slack,
                "t": result.last_tick_s,
                "seq": seq,
                "emitted": result.from_budget,
                "ex": exhausted_since,
                "id": pool.id,
            },
        )
    return TickReport(
        pool.id,
        result.last_tick_s,
        result.from_budget,
        result.to_payable,
        result.dust,
        exhausted_since is not None,
        entry_key,
    )


def tick_pool(conn: sa.Connection, pool_id: int, now_s: int) -> TickReport:
    """Lock and tick one pool (see :func:`tick_locked`)."""
    return tick_locked(conn, get_pool(conn, pool_id, for_update=True), now_s)


def pool_ids(conn: sa.Connection) -> list[int]:
    return [int(i) for i in conn.execute(sa.text("SELECT id FROM staking_pools ORDER BY id")).scalars()]


# -- positions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    pool_id: int
    staker: str
    stake: int
    snapshot: int
    accrued: int
    unlock_at_s: int


def _position(conn: sa.Connection, pool_id: int, staker: str, *, for_update: bool) -> Position | None:
    lock = " FOR UPDATE" if for_update else ""
    row = conn.execute(
        sa.text(
            "SELECT stake, snapshot, accrued, unlock_at_s FROM staking_positions"
            f" WHERE pool_id = :p AND staker = :s{lock}"
        ),
        {"p": pool_id, "s": staker},
    ).first()
    if row is None:
        return None
    return Position(
        pool_id, staker, int(row.stake), int(row.snapshot), int(row.accrued), int(row.unlock_at_s)
    )


def _settle_position(conn: sa.Connection, pool: Pool, staker: str, now_s: int) -> tuple[Pool, Position]:
    """Tick the (locked) pool to ``now_s`` and settle ``staker``'s position against it (created
    empty when new). Returns the pool as it now is and the settled position (not yet written
    back: the caller writes it with its change)."""
    tick_locked(conn, pool, now_s)
    pool = get_pool(conn, pool.id, for_update=True)
    position = _position(conn, pool.id, staker, for_update=True)
    if position is None:
        return pool, Position(pool.id, staker, 0, pool.acc, 0, 0)
    settled = accumulator.settle(position.stake, position.snapshot, position.accrued, pool.acc)
    if settled.fraction:
        conn.execute(
            sa.text("UPDATE staking_pools SET slack = slack + :f, updated_at = now() WHERE id = :id"),
            {"f": settled.fraction, "id": pool.id},
        )
    return pool, Position(
        pool.id, staker, position.stake, settled.snapshot, settled.accrued, position.unlock_at_s
    )


def _write_position(conn: sa.Connection, position: Position) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO staking_positions (pool_id, staker, stake, snapshot, accrued, unlock_at_s)"
            " VALUES (:p, :s, :stake, :snap, :acc, :unlock)"
            " ON CONFLICT (pool_id, staker) DO UPDATE SET stake = EXCLUDED.stake,"
            " snapshot = EXCLUDED.snapshot, accrued = EXCLUDED.accrued,"
            " unlock_at_s = EXCLUDED.unlock_at_s, updated_at = now()"
        ),
        {
            "p": position.pool_id,
            "s": position.staker,
            "stake": position.stake,
            "snap": position.snapshot,
            "acc": position.accrued,
            "unlock": position.unlock_at_s,
        },
    )


def _set_total(conn: sa.Connection, pool_id: int, delta: int) -> None:
    conn.execute(
        sa.text(
            "UPDATE staking_pools SET total_staked = total_staked + :d, updated_at = now() WHERE id = :id"
        ),
        {"d": delta, "id": pool_id},
    )


def settle_position(conn: sa.Connection, pool_id: int, staker: str, now_s: int) -> Position:
    """Tick the pool and settle one position (written back). Used before a claim."""
    staker = check_address(staker, "staker")
    pool = get_pool(conn, pool_id, for_update=True)
    _, position = _settle_position(conn, pool, staker, now_s)
    _write_position(conn, position)
    return position


@dataclass(frozen=True, slots=True)
class StakeEvent:
    """A confirmed ``Staked`` (``amount`` > 0 added) or ``Unstaked`` event of the vault.
    ``compounded``: the ``Staked`` of one of our compounding claims (``stakeFor`` from the
    treasury), whose tokens came through the outbox clearing account."""

    chain: ChainRef
    pool_id: int
    staker: str
    amount: int
    new_balance: int
    unlock_at_s: int | None
    staked: bool
    compounded: bool = False

    @property
    def key(self) -> str:
        kind = "staked" if self.staked else "unstaked"
        c = self.chain
        return f"staking_{kind}:{c.chain_id}:{c.tx_hash}:{c.log_index}"


def pool_on(
    conn: sa.Connection, chain_id: int, vault: str, pool_id: int, *, for_update: bool = False
) -> bool:
    """Whether ``pool_id`` is one of our pools on that vault. ``for_update`` locks its row (the
    pool before its accounts, as every writer of a pool does)."""
    if not 0 < pool_id < 2**63:
        return False
    lock = " FOR UPDATE" if for_update else ""
    row = conn.execute(
        sa.text(f"SELECT 1 FROM staking_pools WHERE id = :id AND chain_id = :c AND vault = :v{lock}"),
        {"id": pool_id, "c": chain_id, "v": vault},
    ).first()
    return row is not None


def _applied(conn: sa.Connection, key: str) -> bool:
    row = conn.execute(
        sa.text(
            "SELECT count(*) FILTER (WHERE kind <> 'undone') > count(*) FILTER (WHERE kind = 'undone')"
            " FROM staking_moves WHERE event_key = :k"
        ),
        {"k": key},
    ).scalar_one()
    return bool(row)


def apply_stake_event(conn: sa.Connection, vault: str, event: StakeEvent, now_s: int) -> str:
    """Apply a confirmed vault event to its position: the pool ticks to ``now_s`` (the booking
    time), the position settles, and the stake becomes the event's new balance, which is what
    the vault holds for the staker. Safe to run twice. Returns ``applied``, ``exists`` or
    ``unknown`` (a pool we do not know: an exception for finance)."""
    if not pool_on(conn, event.chain.chain_id, vault, event.pool_id):
        exceptions_queue.open_exception(
            conn,
            event.key,
            "staking_pool_unknown",
            {"pool": str(event.pool_id), "staker": event.staker, "amount": str(event.amount)},
            chain=event.chain,
        )
        return "unknown"
    pool = get_pool(conn, event.pool_id, for_update=True)
    if _applied(conn, event.key):
        return "exists"
    pool, position = _settle_position(conn, pool, event.staker, now_s)
    expected = position.stake + event.amount if event.staked else position.stake - event.amount
    if expected != event.new_balance:
        exceptions_queue.open_exception(
            conn,
            f"mismatch:{event.key}",
            "staking_position_mismatch",
            {
                "pool": event.pool_id,
                "staker": event.staker,
                "ledger_stake": str(position.stake),
                "chain_new_balance": str(event.new_balance),
                "amount": str(event.amount),
            },
            chain=event.chain,
        )
    unlock = position.unlock_at_s
    if event.unlock_at_s is not None:
        unlock = max(unlock, event.unlock_at_s)
    _write_position(
        conn,
        Position(pool.id, event.staker, event.new_balance, position.snapshot, position.accrued, unlock),
    )
    _set_total(conn, pool.id, event.new_balance - position.stake)
    _move(
        conn,
        pool.id,
        "staked" if event.staked else "unstaked",
        f"chain:{event.chain.chain_id}",
        {
            "before": str(position.stake),
            "after": str(event.new_balance),
            "tx_hash": event.chain.tx_hash,
            "block_hash": event.chain.block_hash,
        },
        staker=event.staker,
        amount=event.amount,
        event_key=event.key,
    )
    if event.compounded and event.staked:
        _book_compounded(conn, event)
    return "applied"


def _book_compounded(conn: sa.Connection, event: StakeEvent) -> None:
    """A compounding claim's stake is owed to the staker from the moment the vault holds it: the
    claim's posted hold credited the outbox clearing account, this moves it to the stake account
    (in the indexer's transaction, with the custody mirrors). It carries the event's chain
    reference, so a reorg's compensation reverses it; a re-included event books it under the next
    generation."""
    generation = conn.execute(
        sa.text("SELECT count(*) FROM staking_moves WHERE event_key = :k AND kind = 'undone'"),
        {"k": event.key},
    ).scalar_one()
    c = event.chain
    key = f"staking:compounded:{c.chain_id}:{c.tx_hash}:{c.log_index}"
    entry = NewEntry(
        key=key if generation == 0 else f"{key}:g{generation}",
        legs=(
            Leg(
                clearing_code(c.chain_id),
                ensure_stake_account(conn, event.pool_id, event.staker),
                event.amount,
                TOKEN_ASSET,
            ),
        ),
        kind="staking.compounded",
        metadata={"pool": event.pool_id, "staker": event.staker},
        chain=c,
    )
    [booked] = post_batch(conn, [entry])
    if booked.status == "rejected":
        raise LedgerError(booked.code or "rejected", f"compounded stake {entry.key}: {booked.reason}")


def undo_stake_event(conn: sa.Connection, vault: str, event: StakeEvent, now_s: int) -> str:
    """A reorg took an applied event away: its change of the stake is taken back (from
    ``now_s``; rewards accrued meanwhile stay) and finance gets an exception."""
    if not pool_on(conn, event.chain.chain_id, vault, event.pool_id):
        return "unknown"
    pool = get_pool(conn, event.pool_id, for_update=True)
    if not _applied(conn, event.key):
        return "exists"
    pool, position = _settle_position(conn, pool, event.staker, now_s)
    delta = -event.amount if event.staked else event.amount
    new_stake = max(0, position.stake + delta)
    _write_position(
        conn,
        Position(pool.id, event.staker, new_stake, position.snapshot, position.accrued, position.unlock_at_s),
    )
    _set_total(conn, pool.id, new_stake - position.stake)
    _move(
        conn,
        pool.id,
        "undone",
        f"chain:{event.chain.chain_id}",
        {"before": str(position.stake), "after": str(new_stake), "block_hash": event.chain.block_hash},
        staker=event.staker,
        amount=event.amount,
        event_key=event.key,
    )
    exceptions_queue.open_exception(
        conn,
        f"undo:{event.key}:{event.chain.block_hash}",
        "staking_event_orphaned",
        {"pool": event.pool_id, "staker": event.staker, "amount": str(event.amount), "staked": event.staked},
        chain=event.chain,
    )
    return "undone"


# -- claims ---------------------------------------------------------------------------------


def reserve_claim(
    conn: sa.Connection,
    pool_id: int,
    staker: str,
    amount: int | None,
    *,
    actor: str,
    now_s: int,
    details: Mapping[str, Any],
) -> int:
    """Take ``amount`` (None: all) out of the staker's accrued reward for a claim, after ticking
    and settling; the caller books the hold on the payable account in the same transaction.
    Returns the amount."""
    staker = check_address(staker, "staker")
    pool = get_pool(conn, pool_id, for_update=True)
    pool, position = _settle_position(conn, pool, staker, now_s)
    take = position.accrued if amount is None else check_amount(amount)
    if take <= 0:
        raise LedgerError("nothing_to_claim", f"{staker} has no reward to claim in pool {pool_id}")
    if take > position.accrued:
        raise LedgerError(
            "exceeds_accrued",
            f"claim of {take} is more than the {position.accrued} accrued in pool {pool_id}",
        )
    _write_position(
        conn,
        Position(
            pool.id, staker, position.stake, position.snapshot, position.accrued - take, position.unlock_at_s
        ),
    )
    _move(conn, pool.id, "claimed", actor, dict(details), staker=staker, amount=take)
    return take


def return_claim(conn: sa.Connection, pool_id: int, staker: str, amount: int, claim_key: str) -> bool:
    """A claim's transaction failed and its hold was voided: the amount goes back to the
    staker's accrued reward, once per claim. Returns whether it was given back now."""
    pool = get_pool(conn, pool_id, for_update=True)
    done = conn.execute(
        sa.text("SELECT 1 FROM staking_moves WHERE kind = 'claim_returned' AND event_key = :k"),
        {"k": claim_key},
    ).first()
    if done is not None:
        return False
    position = _position(conn, pool.id, staker, for_update=True)
    if position is None:
        raise NotFound("position_not_found", f"{staker} has no position in pool {pool_id}")
    _write_position(conn, replace(position, accrued=position.accrued + check_amount(amount)))
    _move(
        conn,
        pool.id,
        "claim_returned",
        "system",
        {"outbox": claim_key},
        staker=staker,
        amount=amount,
        event_key=claim_key,
    )
    return True


# -- reads ----------------------------------------------------------------------------------


def _apr_bps(pool: Pool) -> int | None:
    if pool.settings.kind == "fixed_apr":
        return pool.settings.apr_bps
    if pool.total_staked == 0:
        return None
    return (pool.settings.rate_per_s or 0) * YEAR_S * BPS // pool.total_staked


def apy_of(apr_bps: int) -> str | None:
    """The APY an APR compounds to (daily), as a fraction with 8 places, rounded down; None above
    ``APR_BPS_MAX`` (10,000 %), where the figure stops meaning anything."""
    if apr_bps > APR_BPS_MAX:
        return None
    with localcontext() as ctx:
        ctx.prec = 60
        rate = Decimal(apr_bps) / Decimal(BPS)
        apy = (Decimal(1) + rate / COMPOUNDS_PER_YEAR) ** COMPOUNDS_PER_YEAR - 1
        return str(apy.quantize(Decimal("0.00000001"), rounding=ROUND_DOWN))


def _fraction(bps: int) -> str:
    with localcontext() as ctx:
        ctx.prec = 60
        return str((Decimal(bps) / Decimal(BPS)).quantize(Decimal("0.00000001"), rounding=ROUND_DOWN))


_REWARDS_SQL = (
    "SELECT p.stake, p.snapshot, p.accrued, p.unlock_at_s, s.id, s.name, s.chain_id, s.vault, s.kind,"
    " s.apr_bps, s.rate_per_s, s.lock_seconds, s.min_stake, s.cap, s.active, s.acc, s.slack, s.total_staked,"
    " s.last_tick_s, s.tick_seq, s.emitted, s.exhausted_since_s,"
    " b.credits_posted - b.debits_posted - b.debits_pending AS budget_available,"
    " r.credits_posted - r.debits_posted - r.debits_pending AS remainder_available"
    " FROM staking_positions p JOIN staking_pools s ON s.id = p.pool_id"
    " JOIN ledger_accounts b ON b.code = 'rewards:' || s.id || :budget_suffix"
    " JOIN ledger_accounts r ON r.code = 'rewards:' || s.id || :remainder_suffix"
    " WHERE p.staker = :s ORDER BY p.pool_id"
)


def rewards_of(conn: sa.Connection, staker: str, now_s: int) -> list[dict[str, Any]]:
    """A staker's rewards in every pool they hold a position in, to the second ``now_s``,
    computed without writing: one statement, O(1) per pool."""
    staker = check_address(staker, "staker")
    out = []
    for r in conn.execute(
        sa.text(_REWARDS_SQL), {"s": staker, "budget_suffix": ":budget", "remainder_suffix": ":remainder"}
    ):
        pool = _pool_from_row(r)
        budget_available = int(r.budget_available)
        result = accumulator.tick(pool.state, now_s, budget_available, int(r.remainder_available))
        accrued = accumulator.accrued_at(int(r.stake), int(r.snapshot), int(r.accrued), result.acc)
        exhausted = result.exhausted or (
            pool.exhausted_since_s is not None and budget_available - result.from_budget == 0
        )
        apr = 0 if exhausted else _apr_bps(pool)
        out.append(
            {
                "pool_id": pool.id,
                "pool": pool.name,
                "kind": pool.settings.kind,
                "stake": str(r.stake),
                "unlock_at_s": int(r.unlock_at_s),
                "unlocked": now_s >= int(r.unlock_at_s),
                "accrued": str(accrued),
                "claimable": str(accrued),
                "apr_bps": apr,
                "apr": None if apr is None else _fraction(apr),
                "apy": None if apr is None else apy_of(apr),
                "budget_exhausted": exhausted,
                "as_of_s": max(now_s, pool.last_tick_s),
            }
        )
    return out


def treasury_cover(
    conn: sa.Connection, treasury_mirror: str, pools: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """What the treasury wallet holds (its custody mirror) against what the pools have committed
    to pay out of it: what their budgets still hold, what is accrued and unpaid, the remainders."""
    row = conn.execute(
        sa.text("SELECT debits_posted - credits_posted FROM ledger_accounts WHERE code = :c"),
        {"c": treasury_mirror},
    ).first()
    held = 0 if row is None else int(row[0])
    committed = sum(
        int(p["budget_remaining"]) + int(p["accrued_unpaid"]) + int(p["remainder"]) for p in pools
    )
    return {
        "account": treasury_mirror,
        "holds": str(held),
        "committed": str(committed),
        "covered": held >= committed,
    }


def liability_report(conn: sa.Connection, now_s: int) -> list[dict[str, Any]]:
    """Per pool: what was funded, emitted and paid, what is accrued but unpaid (booked, and to
    the second ``now_s``), what the budget still holds, and the stakers' own accrued sum."""
    out = []
    for pool in list_pools(conn, limit=1000):
        codes = (budget_account(pool.id), payable_account(pool.id), remainder_account(pool.id))
        acct = {
            r.code: r
            for r in conn.execute(
                sa.text(
                    "SELECT code, debits_posted, credits_posted, debits_pending FROM ledger_accounts"
                    " WHERE code = ANY(:c)"
                ),
                {"c": list(codes)},
            )
        }
        budget, payable, remainder = (acct[c] for c in codes)
        paid = conn.execute(
            sa.text(
                "SELECT COALESCE(sum(t.amount), 0) FROM ledger_transfers t"
                " JOIN ledger_accounts d ON d.id = t.debit_account_id"
                " JOIN ledger_accounts c ON c.id = t.credit_account_id"
                " WHERE d.code = :payable AND c.code <> :remainder AND t.kind IN ('posted', 'post_pending')"
            ),
            {"payable": codes[1], "remainder": codes[2]},
        ).scalar_one()
        stakers = conn.execute(
            sa.text(
                "SELECT COALESCE(sum(accrued), 0) AS settled,"
                " COALESCE(sum(stake * (:acc - snapshot)), 0) AS open, count(*) AS n"
                " FROM staking_positions WHERE pool_id = :p"
            ),
            {"acc": pool.acc, "p": pool.id},
        ).one()
        result = virtual_tick(conn, pool, now_s)
        booked_unpaid = int(payable.credits_posted) - int(payable.debits_posted)
        budget_left = int(budget.credits_posted) - int(budget.debits_posted) - int(budget.debits_pending)
        out.append(
            {
                "pool_id": pool.id,
                "pool": pool.name,
                "funded": str(int(budget.credits_posted)),
                "budget_remaining": str(budget_left),
                "emitted": str(pool.emitted),
                "paid": str(int(paid)),
                "paying": str(int(payable.debits_pending)),
                "accrued_unpaid": str(booked_unpaid),
                "accrued_unpaid_to_now": str(booked_unpaid + result.to_payable - result.dust),
                "budget_remaining_to_now": str(budget_left - result.from_budget),
                "remainder": str(int(remainder.credits_posted) - int(remainder.debits_posted)),
                "stakers": int(stakers.n),
                "stakers_accrued": str(int(stakers.settled) + int(stakers.open) // accumulator.SCALE),
                "budget_exhausted": exhausted_now(conn, pool, result),
                "as_of_s": max(now_s, pool.last_tick_s),
            }
        )
    return out
