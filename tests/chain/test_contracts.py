"""TraceToken, the committed artifacts and the Python bindings (deploy, transact, signing, log decoding)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

import contracts
from contracts.artifacts import ARTIFACTS_DIR, PRODUCTION_CONTRACTS, Artifact, load_artifact
from contracts.bindings import (
    ARBITER_ROLE,
    DEFAULT_ADMIN_ROLE,
    MINTER_ROLE,
    ChainTxFailed,
    build_signed,
    check_receipt,
    contract_at,
    decode_logs,
    deploy,
    event_abis_by_topic,
    transact,
)
from tests.chain.conftest import START_BALANCE, TRACE, Chain

CONTRACTS_DIR = Path(contracts.__file__).resolve().parent


@pytest.fixture
def signer(chain: Chain) -> LocalAccount:
    """A local key with some ether, as the platform's sender uses."""
    account: LocalAccount = Account.from_key(b"\x42" * 32)
    chain.w3.eth.send_transaction({"from": chain.parties.admin, "to": account.address, "value": 10**18})
    return account


# --- TraceToken ------------------------------------------------------------------------------------------


def test_token_metadata_and_roles(chain: Chain) -> None:
    t = chain.token.functions
    assert (t.name().call(), t.symbol().call(), t.decimals().call()) == ("Trace", "TRACE", 18)
    assert t.totalSupply().call() == 3 * START_BALANCE
    assert t.MINTER_ROLE().call() == MINTER_ROLE
    assert t.DEFAULT_ADMIN_ROLE().call() == DEFAULT_ADMIN_ROLE
    assert chain.escrow.functions.ARBITER_ROLE().call() == ARBITER_ROLE
    assert t.hasRole(DEFAULT_ADMIN_ROLE, chain.parties.admin).call() is True
    assert t.hasRole(DEFAULT_ADMIN_ROLE, chain.parties.other).call() is False


def test_minter_mints(chain: Chain) -> None:
    p = chain.parties
    receipt = chain.send(chain.token.functions.mint(p.seller, 5 * TRACE), p.admin)
    [transfer] = chain.events(receipt, "Transfer")
    assert transfer.args == {"from": "0x" + "0" * 40, "to": p.seller, "value": 5 * TRACE}
    assert chain.balance(p.seller) == 5 * TRACE
    assert chain.token.functions.totalSupply().call() == 3 * START_BALANCE + 5 * TRACE


def test_non_minter_cannot_mint(chain: Chain) -> None:
    p = chain.parties
    with chain.reverts("AccessControlUnauthorizedAccount", account=p.other, neededRole=MINTER_ROLE):
        chain.send(chain.token.functions.mint(p.other, 1), p.other)
    assert chain.token.functions.totalSupply().call() == 3 * START_BALANCE


def test_admin_grants_and_revokes_the_minter_role(chain: Chain) -> None:
    p = chain.parties
    receipt = chain.send(chain.token.functions.grantRole(MINTER_ROLE, p.other), p.admin)
    [granted] = chain.events(receipt, "RoleGranted")
    assert granted.args == {"role": MINTER_ROLE, "account": p.other, "sender": p.admin}
    chain.send(chain.token.functions.mint(p.seller, 1), p.other)
    chain.send(chain.token.functions.revokeRole(MINTER_ROLE, p.other), p.admin)
    with chain.reverts("AccessControlUnauthorizedAccount", account=p.other):
        chain.send(chain.token.functions.mint(p.seller, 1), p.other)
    with chain.reverts("AccessControlUnauthorizedAccount", account=p.other, neededRole=DEFAULT_ADMIN_ROLE):
        chain.send(chain.token.functions.grantRole(MINTER_ROLE, p.other), p.other)
    assert chain.balance(p.seller) == 1


def test_token_transfers_and_allowances(chain: Chain) -> None:
    p = chain.parties
    chain.send(chain.token.functions.transfer(p.seller, 3), p.buyer)
    chain.send(chain.token.functions.approve(p.seller, 2), p.buyer)
    receipt = chain.send(chain.token.functions.transferFrom(p.buyer, p.fees, 2), p.seller)
    assert [e.event for e in chain.events(receipt)] == ["Transfer"]
    assert (chain.balance(p.seller), chain.balance(p.fees)) == (3, 2)
    with chain.reverts("ERC20InsufficientBalance", sender=p.seller, balance=3, needed=4):
        chain.send(chain.token.functions.transfer(p.buyer, 4), p.seller)


def test_token_constructor_refuses_a_zero_admin(chain: Chain) -> None:
    with chain.reverts("ZeroAddress"):
        deploy(chain.w3, "TraceToken", "T", "T", "0x" + "0" * 40, sender=chain.parties.admin)


# --- artifacts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRODUCTION_CONTRACTS)
def test_artifacts_match_the_sources_in_the_tree(name: str) -> None:
    raw = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
    for unit, digest in raw["sources"].items():
        if unit.startswith("src/"):
            assert hashlib.sha256((CONTRACTS_DIR / unit).read_bytes()).hexdigest() == digest, unit
    listing = "".join(f"{digest}  {unit}\n" for unit, digest in sorted(raw["sources"].items()))
    artifact = load_artifact(name)
    assert artifact.source_hash == hashlib.sha256(listing.encode()).hexdigest()
    assert raw["compiler"]["evmVersion"] == "prague"
    assert raw["compiler"]["version"].startswith("0.8.37+")
    assert artifact.name == name
    # CBOR trailer {"solc": 0.8.37} and no metadata hash: the code depends on the sources' content only.
    assert artifact.bytecode.endswith(bytes.fromhex("a164736f6c6343000825000a"))
    assert artifact.deployed_bytecode.endswith(bytes.fromhex("a164736f6c6343000825000a"))


def test_deployed_code_is_the_artifacts_runtime_code(chain: Chain) -> None:
    # TraceToken has no immutables, so its code on chain is exactly the artifact's runtime code.
    assert chain.w3.eth.get_code(chain.token.address) == load_artifact("TraceToken").deployed_bytecode


@pytest.mark.parametrize("name", ["../TraceToken", "test/../TraceToken", "", "Trace Token", "/etc/passwd"])
def test_load_artifact_refuses_names_that_are_not_contract_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a contract name"):
        load_artifact(name)


def test_load_artifact_of_an_unknown_contract() -> None:
    with pytest.raises(LookupError):
        load_artifact("NoSuchContract")
    assert load_artifact("test/HostileToken").name == "HostileToken"


# --- bindings --------------------------------------------------------------------------------------------


def test_deploy_and_transact_with_a_local_signing_key(chain: Chain, signer: LocalAccount) -> None:
    w3 = chain.w3
    token = deploy(w3, "TraceToken", "Local", "LCL", signer.address, sender=signer)
    assert token.functions.hasRole(DEFAULT_ADMIN_ROLE, signer.address).call() is True
    transact(w3, token.functions.grantRole(MINTER_ROLE, signer.address), signer)
    receipt = transact(w3, token.functions.mint(chain.parties.seller, 7), signer)
    assert receipt["status"] == 1
    assert token.functions.balanceOf(chain.parties.seller).call() == 7
    assert contract_at(w3, "TraceToken", token.address).functions.symbol().call() == "LCL"


def test_a_refused_signed_transaction_is_never_sent(chain: Chain, signer: LocalAccount) -> None:
    nonce = chain.w3.eth.get_transaction_count(signer.address)
    with chain.reverts("AccessControlUnauthorizedAccount", account=signer.address) as info:
        transact(chain.w3, chain.token.functions.mint(signer.address, 1), signer)
    assert info.value.tx_hash is None
    assert info.value.code == "chain_tx_failed"
    assert "AccessControlUnauthorizedAccount(account=" in str(info.value)
    assert chain.w3.eth.get_transaction_count(signer.address) == nonce


def test_build_signed_uses_the_given_nonce_and_fees(chain: Chain, signer: LocalAccount) -> None:
    w3 = chain.w3
    chain.send(chain.token.functions.transfer(signer.address, 10), chain.parties.buyer)
    nonce = w3.eth.get_transaction_count(signer.address)
    fee_cap = 5 * 10**9
    signed = build_signed(
        w3,
        chain.token.functions.transfer(chain.parties.seller, 4),
        signer,
        nonce=nonce,
        max_fee_per_gas=fee_cap,
        max_priority_fee_per_gas=10**9,
    )
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    assert tx_hash == signed.hash
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    assert receipt["status"] == 1
    tx = w3.eth.get_transaction(tx_hash)
    assert (tx["nonce"], tx["maxFeePerGas"]) == (nonce, fee_cap)
    assert chain.balance(chain.parties.seller) == 4
    with chain.reverts("ERC20InsufficientBalance", balance=6, needed=7):
        build_signed(w3, chain.token.functions.transfer(chain.parties.seller, 7), signer, nonce=nonce + 1)


def test_a_transaction_mined_with_status_zero_is_explained(chain: Chain, signer: LocalAccount) -> None:
    w3 = chain.w3
    mint = chain.token.functions.mint(signer.address, 1)
    # An explicit gas limit skips estimation, so this revert only shows once mined.
    nonce = w3.eth.get_transaction_count(signer.address)
    signed = build_signed(w3, mint, signer, nonce=nonce, gas=100_000)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))
    assert receipt["status"] == 0
    with chain.reverts(
        "AccessControlUnauthorizedAccount", account=signer.address, neededRole=MINTER_ROLE
    ) as info:
        check_receipt(w3, mint, receipt)
    assert info.value.tx_hash == signed.hash
    assert chain.token.functions.balanceOf(signer.address).call() == 0

    chain.send(chain.token.functions.grantRole(MINTER_ROLE, signer.address), chain.parties.admin)
    signed = build_signed(w3, mint, signer, nonce=nonce + 1)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))
    assert check_receipt(w3, mint, receipt) is receipt


def test_revert_with_a_panic_is_named(chain: Chain) -> None:
    p = chain.parties
    escrow_id = b"\x05" * 32
    chain.send(chain.escrow.functions.fund(escrow_id, p.seller, 1, chain.next_timestamp() + 3600), p.buyer)
    with chain.reverts("Panic", code=0x11) as info:
        chain.send(chain.escrow.functions.release(escrow_id, 2**256 - 1, 2**256 - 1), p.arbiter)
    assert info.value.revert_data is not None
    assert info.value.revert_data[:4] == bytes.fromhex("4e487b71")


def test_decode_logs_of_several_contracts_in_one_receipt(chain: Chain) -> None:
    p = chain.parties
    escrow_id = b"\x06" * 32
    deadline = chain.next_timestamp() + 3600
    receipt = chain.send(chain.escrow.functions.fund(escrow_id, p.seller, 9, deadline), p.buyer)

    every = decode_logs(event_abis_by_topic(), receipt["logs"])
    assert [(e.event, e.address) for e in every] == [
        ("Funded", chain.escrow.address),
        ("Transfer", chain.token.address),
    ]
    for event, log in zip(every, receipt["logs"], strict=True):
        assert event.block_number == receipt["blockNumber"]
        assert event.block_hash == receipt["blockHash"]
        assert event.tx_hash == receipt["transactionHash"]
        assert event.log_index == log["logIndex"]
    assert every[0].args == {
        "id": escrow_id,
        "buyer": p.buyer,
        "seller": p.seller,
        "amount": 9,
        "deadline": deadline,
    }

    # One contract's ABI decodes that contract's events and leaves the rest.
    assert [e.event for e in decode_logs(load_artifact("TraceEscrow"), receipt["logs"])] == ["Funded"]
    assert [e.event for e in decode_logs(chain.token, receipt["logs"])] == ["Transfer"]


def test_event_map_refuses_one_signature_with_two_layouts() -> None:
    def with_transfer(indexed: list[bool]) -> Artifact:
        inputs = [
            {"name": n, "type": t, "indexed": i}
            for n, t, i in zip(
                ("from", "to", "value"), ("address", "address", "uint256"), indexed, strict=True
            )
        ]
        abi = [{"type": "event", "name": "Transfer", "anonymous": False, "inputs": inputs}]
        return Artifact(name="X", abi=abi, bytecode=b"", deployed_bytecode=b"", source_hash="")  # type: ignore[arg-type]

    erc20 = with_transfer([True, True, False])
    erc721 = with_transfer([True, True, True])
    assert len(event_abis_by_topic(erc20, load_artifact("TraceToken"))) == len(
        event_abis_by_topic(load_artifact("TraceToken"))
    )
    with pytest.raises(ValueError, match="different indexed fields"):
        event_abis_by_topic(erc20, erc721)


def test_chain_tx_failed_carries_the_error(chain: Chain) -> None:
    with pytest.raises(ChainTxFailed) as info:
        transact(chain.w3, chain.escrow.functions.release(b"\x07" * 32, 1, 0), chain.parties.arbiter)
    assert info.value.error_name == "UnknownEscrow"
    assert info.value.error_args == {"id": b"\x07" * 32}
    assert str(info.value).startswith(f"release on {chain.escrow.address} failed: UnknownEscrow(id=0x0707")
