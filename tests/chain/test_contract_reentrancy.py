"""Attacks through a hostile token: reentrancy into release, refund, fund and unstake, and short transfers.

The hostile token is itself an arbiter of the escrow and a staker of the vault, so the calls it makes back
are allowed by roles and amounts; only the reentrancy guard stops them. Each test also shows that the
same call succeeds when it is not made from inside the contract's own function.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_utils.crypto import keccak
from web3.contract import Contract

from contracts.bindings import ARBITER_ROLE, deploy
from tests.chain.conftest import GRACE_S, MAX_UINT256, Chain

ESCROW_ID = b"\xaa" * 32
FUNDED = 100_000
POOL = 1
TOKEN_OWN_STAKE = 50_000
STAKED = 100_000
REENTRANT_CALL = keccak(text="ReentrancyGuardReentrantCall()")[:4]


@dataclass(frozen=True)
class Hostile:
    token: Contract
    escrow: Contract
    vault: Contract


@pytest.fixture(scope="module")
def hostile(deployed_chain: Chain) -> Hostile:
    """An escrow and a vault on the hostile token, set up once per module (before each test's snapshot)."""
    chain = deployed_chain
    p = chain.parties
    token = deploy(chain.w3, "test/HostileToken", sender=p.admin)
    escrow = deploy(chain.w3, "TraceEscrow", token.address, p.admin, p.fees, GRACE_S, sender=p.admin)
    vault = deploy(chain.w3, "TraceStakingVault", token.address, p.admin, sender=p.admin)
    chain.send(escrow.functions.grantRole(ARBITER_ROLE, p.arbiter), p.admin)
    chain.send(escrow.functions.grantRole(ARBITER_ROLE, token.address), p.admin)
    chain.send(vault.functions.setPool(POOL, 0, 0, True), p.admin)
    for holder in (p.buyer, p.staker):
        chain.send(token.functions.mint(holder, 10 * FUNDED), p.admin)
        chain.send(token.functions.approve(escrow.address, MAX_UINT256), holder)
        chain.send(token.functions.approve(vault.address, MAX_UINT256), holder)
    deadline = chain.next_timestamp() + 30 * 24 * 3600
    chain.send(escrow.functions.fund(ESCROW_ID, p.seller, FUNDED, deadline), p.buyer)
    chain.send(vault.functions.stake(POOL, STAKED), p.staker)
    # The token stakes in its own name, so that an unstake it makes back is one it is entitled to.
    chain.send(token.functions.mint(token.address, TOKEN_OWN_STAKE), p.admin)
    chain.send(token.functions.approveFromSelf(vault.address, TOKEN_OWN_STAKE), p.admin)
    stake_call = vault.encode_abi("stake", [POOL, TOKEN_OWN_STAKE])
    chain.send(token.functions.callFromSelf(vault.address, stake_call), p.admin)
    return Hostile(token, escrow, vault)


def arm(chain: Chain, h: Hostile, target: Contract, fn_name: str, args: list[object], bubble: bool) -> None:
    payload = target.encode_abi(fn_name, args)
    chain.send(h.token.functions.arm(target.address, payload, bubble), chain.parties.admin)


def remaining(h: Hostile) -> int:
    return int(h.escrow.functions.escrows(ESCROW_ID).call()[3])


def assert_refused_inside(chain: Chain, h: Hostile, attempts: int) -> None:
    t = h.token.functions
    assert t.attempts().call() == attempts
    assert t.lastCallSucceeded().call() is False
    assert t.lastReturnData().call() == REENTRANT_CALL


def test_reentrant_release_during_a_release_is_refused(chain: Chain, hostile: Hostile) -> None:
    p = chain.parties
    arm(chain, hostile, hostile.escrow, "release", [ESCROW_ID, 1, 0], bubble=False)
    chain.send(hostile.escrow.functions.release(ESCROW_ID, 10_000, 100), p.arbiter)
    # Paying the seller and paying the fee each tried to release once more.
    assert_refused_inside(chain, hostile, attempts=2)
    assert remaining(hostile) == FUNDED - 10_100
    assert hostile.token.functions.balanceOf(hostile.escrow.address).call() == FUNDED - 10_100

    # Control: the very same call, made by the token outside of a release, goes through.
    chain.send(hostile.token.functions.disarm(), p.admin)
    call = hostile.escrow.encode_abi("release", [ESCROW_ID, 1, 0])
    chain.send(hostile.token.functions.callFromSelf(hostile.escrow.address, call), p.admin)
    assert remaining(hostile) == FUNDED - 10_101


def test_a_reentrancy_that_bubbles_up_undoes_the_whole_release(chain: Chain, hostile: Hostile) -> None:
    p = chain.parties
    arm(chain, hostile, hostile.escrow, "release", [ESCROW_ID, FUNDED - 10_000, 0], bubble=True)
    with chain.reverts("ReentrancyGuardReentrantCall"):
        chain.send(hostile.escrow.functions.release(ESCROW_ID, 10_000, 0), p.arbiter)
    assert remaining(hostile) == FUNDED
    assert hostile.token.functions.balanceOf(p.seller).call() == 0


@pytest.mark.parametrize("reentered", ["refund", "release"])
def test_reentrancy_during_a_refund_is_refused(chain: Chain, hostile: Hostile, reentered: str) -> None:
    p = chain.parties
    args: list[object] = [ESCROW_ID, 1] if reentered == "refund" else [ESCROW_ID, 1, 0]
    arm(chain, hostile, hostile.escrow, reentered, args, bubble=False)
    buyer_before = hostile.token.functions.balanceOf(p.buyer).call()
    chain.send(hostile.escrow.functions.refund(ESCROW_ID, 5_000), p.arbiter)
    assert_refused_inside(chain, hostile, attempts=1)
    assert remaining(hostile) == FUNDED - 5_000
    assert hostile.token.functions.balanceOf(p.buyer).call() == buyer_before + 5_000

    arm(chain, hostile, hostile.escrow, reentered, args, bubble=True)
    with chain.reverts("ReentrancyGuardReentrantCall"):
        chain.send(hostile.escrow.functions.refund(ESCROW_ID, 5_000), p.arbiter)
    assert remaining(hostile) == FUNDED - 5_000


def test_reentrancy_during_a_fund_is_refused(chain: Chain, hostile: Hostile) -> None:
    p = chain.parties
    arm(chain, hostile, hostile.escrow, "release", [ESCROW_ID, 1, 0], bubble=True)
    deadline = chain.next_timestamp() + 3600
    with chain.reverts("ReentrancyGuardReentrantCall"):
        chain.send(hostile.escrow.functions.fund(b"\xbb" * 32, p.seller, 10, deadline), p.buyer)
    assert hostile.escrow.functions.escrows(b"\xbb" * 32).call()[2] == 0
    assert remaining(hostile) == FUNDED


def test_reentrant_unstake_during_an_unstake_is_refused(chain: Chain, hostile: Hostile) -> None:
    p = chain.parties
    v = hostile.vault.functions
    arm(chain, hostile, hostile.vault, "unstake", [POOL, 10_000], bubble=False)
    chain.send(v.unstake(POOL, 20_000), p.staker)
    assert_refused_inside(chain, hostile, attempts=1)
    assert v.positions(POOL, p.staker).call()[0] == STAKED - 20_000
    assert v.positions(POOL, hostile.token.address).call()[0] == TOKEN_OWN_STAKE
    assert v.totalStaked(POOL).call() == STAKED - 20_000 + TOKEN_OWN_STAKE
    assert hostile.token.functions.balanceOf(hostile.vault.address).call() == v.totalStaked(POOL).call()

    arm(chain, hostile, hostile.vault, "unstake", [POOL, 10_000], bubble=True)
    with chain.reverts("ReentrancyGuardReentrantCall"):
        chain.send(v.unstake(POOL, 20_000), p.staker)
    assert v.positions(POOL, p.staker).call()[0] == STAKED - 20_000

    # Control: the token's own unstake, made directly, goes through.
    chain.send(hostile.token.functions.disarm(), p.admin)
    call = hostile.vault.encode_abi("unstake", [POOL, 10_000])
    chain.send(hostile.token.functions.callFromSelf(hostile.vault.address, call), p.admin)
    assert v.positions(POOL, hostile.token.address).call()[0] == TOKEN_OWN_STAKE - 10_000


def test_reentrant_unstake_during_a_stake_is_refused(chain: Chain, hostile: Hostile) -> None:
    p = chain.parties
    arm(chain, hostile, hostile.vault, "unstake", [POOL, 10_000], bubble=True)
    with chain.reverts("ReentrancyGuardReentrantCall"):
        chain.send(hostile.vault.functions.stake(POOL, 1_000), p.staker)
    assert hostile.vault.functions.positions(POOL, p.staker).call()[0] == STAKED


def test_a_token_that_delivers_less_than_asked_is_refused(chain: Chain, hostile: Hostile) -> None:
    p = chain.parties
    chain.send(hostile.token.functions.setSkim(7), p.admin)
    deadline = chain.next_timestamp() + 3600
    with chain.reverts("TransferAmountMismatch", expected=1_000, received=993):
        chain.send(hostile.escrow.functions.fund(b"\xcc" * 32, p.seller, 1_000, deadline), p.buyer)
    with chain.reverts("TransferAmountMismatch", expected=1_000, received=993):
        chain.send(hostile.vault.functions.stake(POOL, 1_000), p.staker)
    assert hostile.vault.functions.positions(POOL, p.staker).call()[0] == STAKED
