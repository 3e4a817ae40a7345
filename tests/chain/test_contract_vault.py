"""TraceStakingVault on py-evm: pools, stakes, unlock times, minimum positions, roles."""

from __future__ import annotations

import pytest

from contracts.bindings import DEFAULT_ADMIN_ROLE, deploy
from contracts.deploy import COMPOUNDER_ROLE, POOL_MANAGER_ROLE
from tests.chain.conftest import MAX_UINT256, TRACE, Chain
from tests.chain.test_contract_reentrancy import POOL as HOSTILE_POOL
from tests.chain.test_contract_reentrancy import STAKED, Hostile, arm, assert_refused_inside, hostile

__all__ = ["hostile"]  # the hostile token's vault, a module fixture shared with the reentrancy tests

POOL = 7
LOCK_S = 30 * 24 * 3600
MIN_STAKE = 10 * TRACE


def set_pool(
    chain: Chain, pool: int = POOL, lock_s: int = LOCK_S, min_stake: int = MIN_STAKE, active: bool = True
) -> None:
    chain.send(chain.vault.functions.setPool(pool, lock_s, min_stake, active), chain.parties.admin)


def position(chain: Chain, staker: str, pool: int = POOL) -> tuple[int, int]:
    amount, unlock_at = chain.vault.functions.positions(pool, staker).call()
    return int(amount), int(unlock_at)


def test_admin_sets_and_changes_pools(chain: Chain) -> None:
    assert chain.vault.functions.pools(POOL).call() == [0, 0, False, False]
    receipt = chain.send(chain.vault.functions.setPool(POOL, LOCK_S, MIN_STAKE, True), chain.parties.admin)
    [event] = chain.events(receipt, "PoolSet")
    assert event.args == {"poolId": POOL, "lockSeconds": LOCK_S, "minStake": MIN_STAKE, "active": True}
    assert chain.vault.functions.pools(POOL).call() == [LOCK_S, MIN_STAKE, True, True]
    set_pool(chain, lock_s=60, min_stake=1, active=False)
    assert chain.vault.functions.pools(POOL).call() == [60, 1, False, True]
    assert chain.vault.functions.token().call() == chain.token.address


@pytest.mark.parametrize("who", ["staker", "other"])
def test_only_a_pool_manager_sets_pools(chain: Chain, who: str) -> None:
    caller = getattr(chain.parties, who)
    with chain.reverts("AccessControlUnauthorizedAccount", account=caller, neededRole=POOL_MANAGER_ROLE):
        chain.send(chain.vault.functions.setPool(POOL, LOCK_S, MIN_STAKE, True), caller)
    with chain.reverts("AccessControlUnauthorizedAccount", account=caller, neededRole=POOL_MANAGER_ROLE):
        chain.send(chain.vault.functions.configurePool(POOL, LOCK_S, MIN_STAKE, TRACE, True), caller)
    assert chain.vault.functions.pools(POOL).call()[3] is False


def test_the_admin_grants_the_pool_manager_role_and_only_the_admin(chain: Chain) -> None:
    p = chain.parties
    assert chain.vault.functions.hasRole(POOL_MANAGER_ROLE, p.admin).call() is True
    with chain.reverts("AccessControlUnauthorizedAccount", account=p.other, neededRole=DEFAULT_ADMIN_ROLE):
        chain.send(chain.vault.functions.grantRole(POOL_MANAGER_ROLE, p.other), p.other)
    chain.send(chain.vault.functions.grantRole(POOL_MANAGER_ROLE, p.other), p.admin)
    chain.send(chain.vault.functions.setPool(POOL, 60, 1, True), p.other)
    assert chain.vault.functions.pools(POOL).call() == [60, 1, True, True]
    chain.send(chain.vault.functions.revokeRole(POOL_MANAGER_ROLE, p.other), p.admin)
    with chain.reverts("AccessControlUnauthorizedAccount", account=p.other, neededRole=POOL_MANAGER_ROLE):
        chain.send(chain.vault.functions.setPool(POOL, 61, 1, True), p.other)


def test_configure_pool_sets_a_cap_that_refuses_later_stakes(chain: Chain) -> None:
    p = chain.parties
    receipt = chain.send(chain.vault.functions.configurePool(POOL, 0, 0, 30 * TRACE, True), p.admin)
    assert [e.args for e in chain.events(receipt, "PoolCapSet")] == [{"poolId": POOL, "cap": 30 * TRACE}]
    assert chain.events(receipt, "PoolSet")[0].args["active"] is True
    assert chain.vault.functions.poolCap(POOL).call() == 30 * TRACE
    chain.send(chain.vault.functions.stake(POOL, 20 * TRACE), p.staker)
    with chain.reverts("PoolCapExceeded", poolId=POOL, newTotal=30 * TRACE + 1, cap=30 * TRACE):
        chain.send(chain.vault.functions.stake(POOL, 10 * TRACE + 1), p.other)
    chain.send(chain.vault.functions.stake(POOL, 10 * TRACE), p.other)
    # A lower cap keeps the positions above it and lets them leave; zero lifts it.
    chain.send(chain.vault.functions.configurePool(POOL, 0, 0, TRACE, True), p.admin)
    chain.send(chain.vault.functions.unstake(POOL, 5 * TRACE), p.other)
    with chain.reverts("PoolCapExceeded"):
        chain.send(chain.vault.functions.stake(POOL, 1), p.other)
    chain.send(chain.vault.functions.configurePool(POOL, 0, 0, 0, True), p.admin)
    chain.send(chain.vault.functions.stake(POOL, 100 * TRACE), p.other)
    assert chain.vault.functions.totalStaked(POOL).call() == 125 * TRACE


def test_stake_for_takes_the_callers_tokens_into_the_stakers_position(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    chain.send(chain.vault.functions.grantRole(COMPOUNDER_ROLE, p.other), p.admin)
    chain.send(chain.vault.functions.stake(POOL, MIN_STAKE), p.staker)
    staker_before, other_before = chain.balance(p.staker), chain.balance(p.other)
    receipt = chain.send(chain.vault.functions.stakeFor(POOL, p.staker, 3 * TRACE), p.other)
    [staked] = chain.events(receipt, "Staked")
    assert staked.args["staker"] == p.staker and staked.args["amount"] == 3 * TRACE
    assert staked.args["newBalance"] == MIN_STAKE + 3 * TRACE
    assert position(chain, p.staker)[0] == MIN_STAKE + 3 * TRACE
    assert position(chain, p.other) == (0, 0)
    assert chain.balance(p.staker) == staker_before
    assert chain.balance(p.other) == other_before - 3 * TRACE
    assert chain.balance(chain.vault.address) == MIN_STAKE + 3 * TRACE


@pytest.mark.parametrize("who", ["staker", "other", "admin"])
def test_only_a_compounder_stakes_for_others(chain: Chain, who: str) -> None:
    caller = getattr(chain.parties, who)
    set_pool(chain)
    with chain.reverts("AccessControlUnauthorizedAccount", account=caller, neededRole=COMPOUNDER_ROLE):
        chain.send(chain.vault.functions.stakeFor(POOL, chain.parties.buyer, MIN_STAKE), caller)
    assert position(chain, chain.parties.buyer) == (0, 0)


def test_stake_for_keeps_the_pool_rules(chain: Chain) -> None:
    p = chain.parties
    chain.send(chain.vault.functions.grantRole(COMPOUNDER_ROLE, p.other), p.admin)
    with chain.reverts("UnknownPool", poolId=POOL):
        chain.send(chain.vault.functions.stakeFor(POOL, p.staker, MIN_STAKE), p.other)
    set_pool(chain, active=False)
    with chain.reverts("PoolInactive", poolId=POOL):
        chain.send(chain.vault.functions.stakeFor(POOL, p.staker, MIN_STAKE), p.other)
    set_pool(chain)
    with chain.reverts("BelowMinStake", newBalance=MIN_STAKE - 1):
        chain.send(chain.vault.functions.stakeFor(POOL, p.staker, MIN_STAKE - 1), p.other)
    with chain.reverts("ZeroAddress"):
        chain.send(chain.vault.functions.stakeFor(POOL, "0x" + "0" * 40, MIN_STAKE), p.other)
    with chain.reverts("ZeroAmount"):
        chain.send(chain.vault.functions.stakeFor(POOL, p.staker, 0), p.other)
    # Without an allowance the pull fails and nothing is recorded.
    chain.send(chain.token.functions.approve(chain.vault.address, 0), p.other)
    with chain.reverts("ERC20InsufficientAllowance"):
        chain.send(chain.vault.functions.stakeFor(POOL, p.staker, MIN_STAKE), p.other)
    assert position(chain, p.staker) == (0, 0)
    chain.send(chain.token.functions.approve(chain.vault.address, MAX_UINT256), p.other)
    assert chain.balance(chain.vault.address) == 0


def test_a_reentrant_unstake_during_a_stake_for_is_refused(chain: Chain, hostile: Hostile) -> None:
    p = chain.parties
    v = hostile.vault.functions
    chain.send(v.grantRole(COMPOUNDER_ROLE, p.buyer), p.admin)
    arm(chain, hostile, hostile.vault, "unstake", [HOSTILE_POOL, 10_000], bubble=False)
    chain.send(v.stakeFor(HOSTILE_POOL, p.staker, 1_000), p.buyer)
    assert_refused_inside(chain, hostile, attempts=1)
    assert v.positions(HOSTILE_POOL, p.staker).call()[0] == STAKED + 1_000
    assert (
        hostile.token.functions.balanceOf(hostile.vault.address).call() == v.totalStaked(HOSTILE_POOL).call()
    )
    arm(chain, hostile, hostile.vault, "unstake", [HOSTILE_POOL, 10_000], bubble=True)
    with chain.reverts("ReentrancyGuardReentrantCall"):
        chain.send(v.stakeFor(HOSTILE_POOL, p.staker, 1_000), p.buyer)
    assert v.positions(HOSTILE_POOL, p.staker).call()[0] == STAKED + 1_000


def test_stake_records_the_position_and_its_unlock_time(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    at = chain.next_timestamp() + 50
    chain.next_block_at(at)
    receipt = chain.send(chain.vault.functions.stake(POOL, 25 * TRACE), p.staker)
    [staked] = chain.events(receipt, "Staked")
    assert staked.args == {
        "poolId": POOL,
        "staker": p.staker,
        "amount": 25 * TRACE,
        "newBalance": 25 * TRACE,
        "unlockAt": at + LOCK_S,
    }
    assert position(chain, p.staker) == (25 * TRACE, at + LOCK_S)
    assert chain.vault.functions.totalStaked(POOL).call() == 25 * TRACE
    assert chain.balance(chain.vault.address) == 25 * TRACE


def test_stake_refuses_unknown_and_inactive_pools_and_zero(chain: Chain) -> None:
    p = chain.parties
    with chain.reverts("UnknownPool", poolId=POOL):
        chain.send(chain.vault.functions.stake(POOL, MIN_STAKE), p.staker)
    set_pool(chain, active=False)
    with chain.reverts("PoolInactive", poolId=POOL):
        chain.send(chain.vault.functions.stake(POOL, MIN_STAKE), p.staker)
    set_pool(chain)
    with chain.reverts("ZeroAmount"):
        chain.send(chain.vault.functions.stake(POOL, 0), p.staker)
    assert chain.balance(chain.vault.address) == 0


def test_the_position_after_a_stake_must_reach_the_minimum(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    with chain.reverts("BelowMinStake", poolId=POOL, newBalance=MIN_STAKE - 1, minStake=MIN_STAKE):
        chain.send(chain.vault.functions.stake(POOL, MIN_STAKE - 1), p.staker)
    chain.send(chain.vault.functions.stake(POOL, MIN_STAKE), p.staker)
    # Once the position is above the minimum, a small top-up is fine.
    chain.send(chain.vault.functions.stake(POOL, 1), p.staker)
    assert position(chain, p.staker)[0] == MIN_STAKE + 1


def test_a_later_stake_never_brings_the_unlock_time_forward(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    t0 = chain.next_timestamp() + 10
    chain.next_block_at(t0)
    chain.send(chain.vault.functions.stake(POOL, MIN_STAKE), p.staker)
    set_pool(chain, lock_s=24 * 3600)
    receipt = chain.send(chain.vault.functions.stake(POOL, TRACE), p.staker)
    assert chain.events(receipt, "Staked")[0].args["unlockAt"] == t0 + LOCK_S
    assert position(chain, p.staker) == (MIN_STAKE + TRACE, t0 + LOCK_S)

    # A stake whose own lock ends later pushes the whole position's unlock time out.
    set_pool(chain, lock_s=LOCK_S)
    t1 = t0 + 5 * 24 * 3600
    chain.next_block_at(t1)
    chain.send(chain.vault.functions.stake(POOL, TRACE), p.staker)
    assert position(chain, p.staker) == (MIN_STAKE + 2 * TRACE, t1 + LOCK_S)


def test_unstake_from_the_unlock_time_and_not_one_second_before(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    chain.send(chain.vault.functions.stake(POOL, 30 * TRACE), p.staker)
    _, unlock_at = position(chain, p.staker)

    chain.next_block_at(unlock_at - 1)
    with chain.reverts("StillLocked", poolId=POOL, unlockAt=unlock_at):
        chain.send(chain.vault.functions.unstake(POOL, 30 * TRACE), p.staker)

    chain.next_block_at(unlock_at)
    before = chain.balance(p.staker)
    receipt = chain.send(chain.vault.functions.unstake(POOL, 12 * TRACE), p.staker)
    [unstaked] = chain.events(receipt, "Unstaked")
    assert unstaked.args == {
        "poolId": POOL,
        "staker": p.staker,
        "amount": 12 * TRACE,
        "newBalance": 18 * TRACE,
    }
    assert position(chain, p.staker) == (18 * TRACE, unlock_at)
    assert chain.balance(p.staker) == before + 12 * TRACE
    assert chain.vault.functions.totalStaked(POOL).call() == 18 * TRACE


def test_unstake_leaves_nothing_or_at_least_the_minimum(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    chain.send(chain.vault.functions.stake(POOL, 15 * TRACE), p.staker)
    chain.next_block_at(position(chain, p.staker)[1])
    with chain.reverts("BelowMinStake", newBalance=MIN_STAKE - 1, minStake=MIN_STAKE):
        chain.send(chain.vault.functions.unstake(POOL, 5 * TRACE + 1), p.staker)
    with chain.reverts("AmountExceedsStake", poolId=POOL, requested=15 * TRACE + 1, staked=15 * TRACE):
        chain.send(chain.vault.functions.unstake(POOL, 15 * TRACE + 1), p.staker)
    with chain.reverts("ZeroAmount"):
        chain.send(chain.vault.functions.unstake(POOL, 0), p.staker)
    chain.send(chain.vault.functions.unstake(POOL, 5 * TRACE), p.staker)
    assert position(chain, p.staker)[0] == MIN_STAKE
    chain.send(chain.vault.functions.unstake(POOL, MIN_STAKE), p.staker)
    assert position(chain, p.staker) == (0, 0)
    assert chain.balance(chain.vault.address) == 0


def test_a_raised_minimum_still_lets_a_smaller_position_leave_in_full(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    chain.send(chain.vault.functions.stake(POOL, 12 * TRACE), p.staker)
    set_pool(chain, min_stake=50 * TRACE, active=False)
    chain.next_block_at(position(chain, p.staker)[1])
    with chain.reverts("BelowMinStake", newBalance=11 * TRACE, minStake=50 * TRACE):
        chain.send(chain.vault.functions.unstake(POOL, TRACE), p.staker)
    chain.send(chain.vault.functions.unstake(POOL, 12 * TRACE), p.staker)
    assert position(chain, p.staker) == (0, 0)


def test_positions_are_per_staker_and_per_pool(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain)
    set_pool(chain, pool=POOL + 1, lock_s=0, min_stake=0)
    chain.send(chain.vault.functions.stake(POOL, 20 * TRACE), p.staker)
    chain.send(chain.vault.functions.stake(POOL, 30 * TRACE), p.other)
    chain.send(chain.vault.functions.stake(POOL + 1, 1), p.staker)
    assert chain.vault.functions.totalStaked(POOL).call() == 50 * TRACE
    assert chain.vault.functions.totalStaked(POOL + 1).call() == 1
    # No lock in the second pool: out at once, while the first pool stays locked.
    chain.send(chain.vault.functions.unstake(POOL + 1, 1), p.staker)
    with chain.reverts("StillLocked"):
        chain.send(chain.vault.functions.unstake(POOL, 20 * TRACE), p.staker)
    assert chain.balance(chain.vault.address) == 50 * TRACE
    with chain.reverts("AmountExceedsStake", requested=1, staked=0):
        chain.send(chain.vault.functions.unstake(POOL + 2, 1), p.staker)


def test_a_lock_beyond_uint64_is_clamped_not_wrapped(chain: Chain) -> None:
    p = chain.parties
    set_pool(chain, lock_s=2**64 - 1)
    chain.send(chain.vault.functions.stake(POOL, MIN_STAKE), p.staker)
    assert position(chain, p.staker)[1] == 2**64 - 1
    with chain.reverts("StillLocked", unlockAt=2**64 - 1):
        chain.send(chain.vault.functions.unstake(POOL, MIN_STAKE), p.staker)


def test_constructor_refuses_zero_addresses(chain: Chain) -> None:
    zero = "0x" + "0" * 40
    for args in ((zero, chain.parties.admin), (chain.token.address, zero)):
        with chain.reverts("ZeroAddress"):
            deploy(chain.w3, "TraceStakingVault", *args, sender=chain.parties.admin)
