"""The staking sagas' chain side: pool settings mirrored on the vault, and claims paid out or
compounded through the outbox, each in the same commit as the change (or the ledger hold) that
makes it meaningful.

- A pool's creation, and any change of its lock, minimum, cap or active flag, enqueues
  ``TraceStakingVault.configurePool`` from the platform key (the vault's pool manager).
- A paid claim holds ``rewards:{pool}:payable`` → ``clearing:outbox:{chain}`` and enqueues
  ``TraceToken.transfer(staker, amount)`` from the treasury, settled by the sender like an
  escrow release.
- A compounded claim holds ``rewards:{pool}:payable`` → ``clearing:outbox:{chain}`` too and
  enqueues ``TraceStakingVault.stakeFor(pool, staker, amount)`` from the treasury (the vault's
  compounder), which pulls the TRACE from the treasury. The treasury approves the vault once,
  for good: the first compounding claim on a vault also enqueues ``approve(vault, 2^256 - 1)``
  under a key of its own, so it is sent once and always before any ``stakeFor``. The confirmed
  ``Staked`` event then raises the position and moves the amount from clearing to
  ``stake:{pool}:{staker}``, in the indexer's transaction that moves the custody mirrors.
- A claim whose transaction fails has its hold voided by the sender; :func:`return_failed_claims`
  gives the amount back to the staker's accrued reward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from contracts.deployment import Deployment
from ledger import outbox
from ledger.accounts import Created
from ledger.commands import Leg, NewEntry
from ledger.custody import TOKEN_ASSET, clearing_code
from ledger.errors import InvalidInput
from ledger.staking import service
from workers.base import unit_of_work

CONFIGURE_GAS_LIMIT = 150_000
PAYOUT_GAS_LIMIT = 100_000
COMPOUND_GAS_LIMIT = 200_000
APPROVE_GAS_LIMIT = 80_000
UINT256_MAX = 2**256 - 1
_CONFIGURE = keccak(text="configurePool(uint256,uint64,uint256,uint256,bool)")[:4]
_STAKE_FOR = keccak(text="stakeFor(uint256,address,uint256)")[:4]
_TRANSFER = keccak(text="transfer(address,uint256)")[:4]
_APPROVE = keccak(text="approve(address,uint256)")[:4]
_MIRRORED = ("lock_seconds", "min_stake", "cap", "active")

ClaimMode = Literal["pay", "compound"]


def configure_calldata(pool: service.Pool) -> bytes:
    s = pool.settings
    return _CONFIGURE + encode(
        ["uint256", "uint64", "uint256", "uint256", "bool"],
        [pool.id, s.lock_seconds, s.min_stake, s.cap or 0, s.active],
    )


def _mirror(conn: sa.Connection, deployment: Deployment, pool: service.Pool) -> outbox.OutboxRow:
    """Enqueue ``configurePool`` with the pool's current settings, keyed by how many times its
    settings were written (so a retry of the same change finds its row)."""
    writes = conn.execute(
        sa.text(
            "SELECT count(*) FROM staking_moves"
            " WHERE pool_id = :p AND kind IN ('pool_created', 'pool_changed')"
        ),
        {"p": pool.id},
    ).scalar_one()
    action = outbox.ChainAction(
        key=f"staking:configure:{pool.id}:{int(writes)}",
        chain_id=deployment.chain_id,
        signer=deployment.treasury,
        action="staking.configure_pool",
        to_address=deployment.vault,
        data=configure_calldata(pool),
        gas_limit=CONFIGURE_GAS_LIMIT,
        metadata={"pool": pool.id, **{k: v for k, v in pool.settings.as_dict().items() if k in _MIRRORED}},
    )
    row, _ = outbox.enqueue(conn, action)
    return row


def create_pool(
    conn: sa.Connection,
    deployment: Deployment,
    name: str,
    settings: service.PoolSettings,
    actor: str,
    now_s: int,
) -> tuple[service.Pool, Created]:
    """Create a pool on the deployment's vault and mirror it there, in the caller's transaction."""
    pool, status = service.create_pool(
        conn, name, settings, chain_id=deployment.chain_id, vault=deployment.vault, actor=actor, now_s=now_s
    )
    if status == "created":
        _mirror(conn, deployment, pool)
    return pool, status


def change_pool(
    conn: sa.Connection,
    deployment: Deployment,
    pool_id: int,
    changes: dict[str, Any],
    actor: str,
    now_s: int,
) -> tuple[service.Pool, service.Pool]:
    """Change a pool (it ticks first at the old rate); a change the vault keeps too is mirrored."""
    before, after = service.change_pool(conn, pool_id, changes, actor=actor, now_s=now_s)
    if any(getattr(before.settings, k) != getattr(after.settings, k) for k in _MIRRORED):
        _mirror(conn, deployment, after)
    return before, after


@dataclass(frozen=True, slots=True)
class Claim:
    pool_id: int
    staker: str
    mode: ClaimMode
    amount: int
    outbox_key: str
    status: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool_id": self.pool_id,
            "staker": self.staker,
            "mode": self.mode,
            "amount": str(self.amount),
            "outbox": self.outbox_key,
            "status": self.status,
        }


def claim_key(staker: str, nonce: int) -> str:
    return f"staking:claim:{staker}:{nonce}"


def _approve_vault(conn: sa.Connection, deployment: Deployment) -> None:
    action = outbox.ChainAction(
        key=f"staking:approve:{deployment.chain_id}:{deployment.vault}",
        chain_id=deployment.chain_id,
        signer=deployment.treasury,
        action="staking.approve_vault",
        to_address=deployment.token,
        data=_APPROVE + encode(["address", "uint256"], [deployment.vault, UINT256_MAX]),
        gas_limit=APPROVE_GAS_LIMIT,
        metadata={"spender": deployment.vault},
    )
    outbox.enqueue(conn, action)


def enqueue_claim(
    conn: sa.Connection,
    deployment: Deployment,
    pool_id: int,
    staker: str,
    amount: int | None,
    mode: ClaimMode,
    nonce: int,
    now_s: int,
) -> Claim:
    """Take the claim out of the staker's accrued reward, hold it on the payable account and
    enqueue its transaction, all in the caller's transaction (the nonce spent by the caller too)."""
    if mode not in ("pay", "compound"):
        raise InvalidInput("mode must be pay or compound")
    pool = service.get_pool(conn, pool_id)
    if pool.chain_id != deployment.chain_id or pool.vault != deployment.vault:
        raise InvalidInput(f"pool {pool_id} is not on this deployment's vault")
    key = claim_key(staker, nonce)
    taken = service.reserve_claim(
        conn,
        pool_id,
        staker,
        amount,
        actor=f"party:{staker}",
        now_s=now_s,
        details={"outbox": key, "mode": mode},
    )
    if mode == "pay":
        to, data, gas = (
            deployment.token,
            _TRANSFER + encode(["address", "uint256"], [staker, taken]),
            PAYOUT_GAS_LIMIT,
        )
    else:
        _approve_vault(conn, deployment)
        to, data, gas = (
            deployment.vault,
            _STAKE_FOR + encode(["uint256", "address", "uint256"], [pool_id, staker, taken]),
            COMPOUND_GAS_LIMIT,
        )
    conn.execute(
        sa.text(
            "INSERT INTO staking_claims (pool_id, staker, mode, amount, nonce, outbox_key)"
            " VALUES (:p, :s, :m, :a, :n, :k)"
        ),
        {"p": pool_id, "s": staker, "m": mode, "a": taken, "n": str(nonce), "k": key},
    )
    hold = NewEntry(
        key=f"{key}:hold",
        legs=(
            Leg(
                service.payable_account(pool_id),
                clearing_code(deployment.chain_id),
                taken,
                TOKEN_ASSET,
                pending=True,
            ),
        ),
        kind="staking.claim",
        metadata={"pool": pool_id, "staker": staker, "mode": mode},
    )
    action = outbox.ChainAction(
        key=key,
        chain_id=deployment.chain_id,
        signer=deployment.treasury,
        action="staking.payout" if mode == "pay" else "staking.compound",
        to_address=to,
        data=data,
        gas_limit=gas,
        metadata={"pool": pool_id, "staker": staker, "amount": str(taken)},
    )
    row, _ = outbox.enqueue(conn, action, (hold,))
    return Claim(pool_id, staker, mode, taken, row.key, row.status)


def get_claim(conn: sa.Connection, key: str) -> Claim | None:
    row = conn.execute(
        sa.text(
            "SELECT c.pool_id, c.staker, c.mode, c.amount, c.outbox_key, o.status FROM staking_claims c"
            " JOIN chain_outbox o ON o.key = c.outbox_key WHERE c.outbox_key = :k"
        ),
        {"k": key},
    ).first()
    if row is None:
        return None
    return Claim(row.pool_id, row.staker, row.mode, int(row.amount), row.outbox_key, row.status)


def return_failed_claims(conn: sa.Connection, limit: int = 500) -> int:
    """Give every claim whose transaction failed (its hold voided) back to the staker's accrued
    reward, once. Returns how many were given back."""
    rows = conn.execute(
        sa.text(
            "SELECT c.pool_id, c.staker, c.amount, c.outbox_key FROM staking_claims c"
            " JOIN chain_outbox o ON o.key = c.outbox_key AND o.status = 'failed'"
            " WHERE NOT EXISTS (SELECT 1 FROM staking_moves m WHERE m.kind = 'claim_returned'"
            "                   AND m.event_key = c.outbox_key)"
            " ORDER BY c.id LIMIT :limit"
        ),
        {"limit": limit},
    ).all()
    for r in rows:
        service.return_claim(conn, int(r.pool_id), r.staker, int(r.amount), r.outbox_key)
    return len(rows)


@dataclass(frozen=True, slots=True)
class TickRun:
    pools: int
    entries: int
    returned: int
    exhausted: int

    def as_dict(self) -> dict[str, int]:
        return {
            "pools": self.pools,
            "entries": self.entries,
            "returned": self.returned,
            "exhausted": self.exhausted,
        }


def tick_all(engine: sa.Engine, now_s: int | None = None) -> TickRun:
    """Tick every pool, each in a transaction of its own, then give failed claims back."""
    entries = exhausted = 0
    with engine.connect() as conn:
        ids = service.pool_ids(conn)
    for pool_id in ids:
        with unit_of_work(engine) as work:
            report = service.tick_pool(work.conn, pool_id, int(time.time()) if now_s is None else now_s)
        entries += report.entry_key is not None
        exhausted += report.exhausted
    with unit_of_work(engine) as work:
        returned = return_failed_claims(work.conn)
    return TickRun(len(ids), entries, returned, exhausted)
