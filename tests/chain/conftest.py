"""Fixtures of the contract tests: py-evm in process, our contracts deployed once per module.

A test that takes `chain` runs between a snapshot and a revert to it, so each one starts from the same
freshly deployed state whatever the tests before it did (including time travel).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_tester import EthereumTester, PyEVMBackend
from eth_typing import ChecksumAddress
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.types import TxReceipt

from contracts.bindings import (
    ARBITER_ROLE,
    MINTER_ROLE,
    ChainTxFailed,
    DecodedEvent,
    decode_logs,
    deploy,
    event_abis_by_topic,
    transact,
)

TRACE = 10**18
GRACE_S = 3 * 24 * 3600
START_BALANCE = 1_000_000 * TRACE
MAX_UINT256 = 2**256 - 1


@dataclass(frozen=True)
class Parties:
    admin: ChecksumAddress
    arbiter: ChecksumAddress
    buyer: ChecksumAddress
    seller: ChecksumAddress
    fees: ChecksumAddress
    staker: ChecksumAddress
    other: ChecksumAddress


@dataclass(frozen=True)
class Chain:
    """A chain with TraceToken, TraceEscrow and TraceStakingVault deployed and the parties funded."""

    w3: Web3
    tester: EthereumTester
    parties: Parties
    token: Contract
    escrow: Contract
    vault: Contract

    def send(self, fn: ContractFunction, sender: str) -> TxReceipt:
        return transact(self.w3, fn, sender)

    def events(self, receipt: TxReceipt, name: str | None = None) -> list[DecodedEvent]:
        """Events of our contracts in `receipt`, optionally only those called `name`."""
        decoded = decode_logs(event_abis_by_topic(), receipt["logs"])
        return [e for e in decoded if name is None or e.event == name]

    def balance(self, who: str) -> int:
        return int(self.token.functions.balanceOf(who).call())

    def next_timestamp(self) -> int:
        """The timestamp the next transaction will be mined with."""
        return int(self.w3.eth.get_block("pending")["timestamp"])

    def next_block_at(self, timestamp: int) -> None:
        """Makes the next transaction run in a block with exactly `timestamp`."""
        self.w3.testing.timeTravel(timestamp)
        if self.next_timestamp() != timestamp:
            raise RuntimeError(f"could not place the next block at {timestamp}")

    @contextlib.contextmanager
    def reverts(self, error_name: str, **expected_args: Any) -> Iterator[pytest.ExceptionInfo[ChainTxFailed]]:
        """Expects ChainTxFailed with custom error `error_name` and at least the arguments given."""
        with pytest.raises(ChainTxFailed) as info:
            yield info
        assert info.value.error_name == error_name, str(info.value)
        for key, value in expected_args.items():
            assert info.value.error_args[key] == value, (key, info.value.error_args)


def new_chain() -> tuple[Web3, EthereumTester]:
    tester = EthereumTester(PyEVMBackend())
    return Web3(EthereumTesterProvider(tester)), tester


@pytest.fixture(scope="module")
def deployed_chain() -> Chain:
    """The chain of one test module, deployed once; tests take it through `chain`."""
    w3, tester = new_chain()
    accounts = w3.eth.accounts
    parties = Parties(*accounts[:7])
    admin = parties.admin
    token = deploy(w3, "TraceToken", "Trace", "TRACE", admin, sender=admin)
    escrow = deploy(w3, "TraceEscrow", token.address, admin, parties.fees, GRACE_S, sender=admin)
    vault = deploy(w3, "TraceStakingVault", token.address, admin, sender=admin)
    transact(w3, token.functions.grantRole(MINTER_ROLE, admin), admin)
    transact(w3, escrow.functions.grantRole(ARBITER_ROLE, parties.arbiter), admin)
    for holder in (parties.buyer, parties.staker, parties.other):
        transact(w3, token.functions.mint(holder, START_BALANCE), admin)
        transact(w3, token.functions.approve(escrow.address, MAX_UINT256), holder)
        transact(w3, token.functions.approve(vault.address, MAX_UINT256), holder)
    return Chain(w3, tester, parties, token, escrow, vault)


@pytest.fixture
def chain(deployed_chain: Chain) -> Iterator[Chain]:
    """The module's deployed chain, rewound to its deployed state after the test."""
    snapshot = deployed_chain.w3.testing.snapshot()
    yield deployed_chain
    deployed_chain.w3.testing.revert(snapshot)
