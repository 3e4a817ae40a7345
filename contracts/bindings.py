"""Python side of the TRACE contracts: deploy, send, and read back their events.

Senders are either a local signing account (the transaction is signed here and sent raw) or the address of
an account the node has unlocked (dev chains, tests). A transaction that reverts, at gas estimation or once
mined, raises ChainTxFailed with the contract's custom error decoded when the ABI knows it.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from eth_abi import abi as eth_abi
from eth_abi.exceptions import DecodingError
from eth_account.datastructures import SignedTransaction
from eth_account.signers.local import LocalAccount
from eth_typing import ABI, ABIError, ABIEvent, ChecksumAddress
from eth_utils.abi import collapse_if_tuple, event_abi_to_log_topic, function_abi_to_4byte_selector
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractLogicError
from web3.types import LogReceipt, Nonce, TxParams, TxReceipt, Wei

from contracts.artifacts import PRODUCTION_CONTRACTS, Artifact, load_artifact

DEFAULT_ADMIN_ROLE: Final[bytes] = bytes(32)
MINTER_ROLE: Final[bytes] = keccak(text="MINTER_ROLE")
ARBITER_ROLE: Final[bytes] = keccak(text="ARBITER_ROLE")

DEFAULT_TIMEOUT_S: Final = 120.0
# Headroom over the node's gas estimate for transactions signed here (a node's own `transact` adds its own).
_GAS_HEADROOM_PERCENT: Final = 20

# Reverts that are not custom errors: require(..., "reason") and compiler panics (overflow, ...).
_BUILTIN_ERRORS: Final[tuple[ABIError, ...]] = (
    {"type": "error", "name": "Error", "inputs": [{"name": "reason", "type": "string"}]},
    {"type": "error", "name": "Panic", "inputs": [{"name": "code", "type": "uint256"}]},
)

Sender = LocalAccount | str
"""A local signing account, or the address of an account the node has unlocked."""


class ChainTxFailed(Exception):
    """A transaction was refused: it reverted at estimation, or was mined with status 0."""

    code = "chain_tx_failed"

    def __init__(
        self,
        action: str,
        *,
        error_name: str | None = None,
        error_args: Mapping[str, Any] | None = None,
        revert_data: bytes | None = None,
        tx_hash: bytes | None = None,
    ) -> None:
        self.action = action
        self.error_name = error_name
        self.error_args: dict[str, Any] = dict(error_args or {})
        self.revert_data = revert_data
        self.tx_hash = HexBytes(tx_hash) if tx_hash is not None else None
        reason = error_name or "reverted without a known error"
        if self.error_args:
            reason += "(" + ", ".join(f"{k}={_show(v)}" for k, v in self.error_args.items()) + ")"
        where = f" in {self.tx_hash.to_0x_hex()}" if self.tx_hash is not None else ""
        super().__init__(f"{action} failed{where}: {reason}")


@dataclass(frozen=True)
class DecodedEvent:
    """One log of our contracts with its arguments decoded (addresses checksummed, bytes32 as bytes)."""

    address: ChecksumAddress
    event: str
    args: dict[str, Any]
    block_number: int
    block_hash: HexBytes
    tx_hash: HexBytes
    log_index: int


def contract_at(w3: Web3, name: str, address: str) -> Contract:
    """Contract `name` (see load_artifact) at its deployed `address`; refuses an address without code."""
    checksum = Web3.to_checksum_address(address)
    if not w3.eth.get_code(checksum):
        raise LookupError(f"no contract code at {checksum}")
    return w3.eth.contract(address=checksum, abi=load_artifact(name).abi)


def deploy(w3: Web3, name: str, *args: Any, sender: Sender, timeout_s: float = DEFAULT_TIMEOUT_S) -> Contract:
    """Deploys contract `name` with constructor `args` from `sender`; returns it once the receipt is in."""
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    receipt = _send(w3, factory.constructor(*args), artifact.abi, f"deploy {name}", sender, timeout_s)
    address = receipt["contractAddress"]
    if address is None:
        raise ChainTxFailed(f"deploy {name}", tx_hash=receipt["transactionHash"])
    return w3.eth.contract(address=address, abi=artifact.abi)


def transact(
    w3: Web3, contract_fn: ContractFunction, sender: Sender, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> TxReceipt:
    """Sends `contract_fn` (e.g. `escrow.functions.release(id, 90, 10)`) from `sender` and waits for it.

    Raises ChainTxFailed if it reverts, before sending or once mined.
    """
    return _send(w3, contract_fn, contract_fn.contract_abi, _describe(contract_fn), sender, timeout_s)


def build_signed(
    w3: Web3,
    contract_fn: ContractFunction,
    account: LocalAccount,
    *,
    nonce: int,
    gas: int | None = None,
    max_fee_per_gas: int | None = None,
    max_priority_fee_per_gas: int | None = None,
) -> SignedTransaction:
    """Signs `contract_fn` from `account` with an explicit nonce, without sending it.

    Gas and fees the caller leaves out are estimated by the node; a call that would revert raises
    ChainTxFailed here already.
    """
    return _sign(
        w3,
        contract_fn,
        contract_fn.contract_abi,
        _describe(contract_fn),
        account,
        nonce=nonce,
        gas=gas,
        max_fee_per_gas=max_fee_per_gas,
        max_priority_fee_per_gas=max_priority_fee_per_gas,
    )


def check_receipt(w3: Web3, contract_fn: ContractFunction, receipt: TxReceipt) -> TxReceipt:
    """Returns `receipt` of a sent `contract_fn` if it succeeded; raises ChainTxFailed if mined with status 0.

    The error is named by replaying the call on the state before its block, which usually reproduces it.
    """
    if receipt["status"] != 1:
        action = _describe(contract_fn)
        _raise_mined_failure(w3, contract_fn.contract_abi, action, receipt)
    return receipt


def event_abis_by_topic(*sources: Artifact | Contract) -> dict[bytes, ABIEvent]:
    """The event ABIs of `sources` (default: all our production contracts) keyed by their topic0."""
    abis = [s.abi for s in sources] if sources else [load_artifact(n).abi for n in PRODUCTION_CONTRACTS]
    by_topic: dict[bytes, ABIEvent] = {}
    for abi in abis:
        for element in abi:
            if element["type"] != "event" or element.get("anonymous", False):
                continue
            topic = bytes(event_abi_to_log_topic(element))
            known = by_topic.setdefault(topic, element)
            # Same signature with other indexed fields would decode wrongly; refuse rather than guess.
            if [i.get("indexed") for i in known.get("inputs", [])] != [
                i.get("indexed") for i in element.get("inputs", [])
            ]:
                raise ValueError(f"event {element['name']} is declared with different indexed fields")
    return by_topic


def decode_logs(
    source: Artifact | Contract | Mapping[bytes, ABIEvent], logs: Iterable[LogReceipt]
) -> list[DecodedEvent]:
    """Decodes the logs whose topic0 `source` knows, in the order given; other logs are skipped."""
    by_topic = source if isinstance(source, Mapping) else event_abis_by_topic(source)
    decoded: list[DecodedEvent] = []
    for log in logs:
        topics = log["topics"]
        if not topics:
            continue
        event_abi = by_topic.get(bytes(topics[0]))
        if event_abi is not None:
            decoded.append(_decode_log(event_abi, log))
    return decoded


def _describe(contract_fn: ContractFunction) -> str:
    return f"{contract_fn.fn_name} on {contract_fn.address}"


def _send(
    w3: Web3,
    buildable: ContractFunction | ContractConstructor,
    abi: ABI,
    action: str,
    sender: Sender,
    timeout_s: float,
) -> TxReceipt:
    if isinstance(sender, str):
        try:
            tx_hash = buildable.transact({"from": Web3.to_checksum_address(sender)})
        except Exception as exc:
            _raise_if_revert(exc, abi, action)
            raise
    else:
        nonce = w3.eth.get_transaction_count(sender.address, "pending")
        signed = _sign(w3, buildable, abi, action, sender, nonce=nonce)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout_s)
    if receipt["status"] != 1:
        _raise_mined_failure(w3, abi, action, receipt)
    return receipt


def _sign(
    w3: Web3,
    buildable: ContractFunction | ContractConstructor,
    abi: ABI,
    action: str,
    account: LocalAccount,
    *,
    nonce: int,
    gas: int | None = None,
    max_fee_per_gas: int | None = None,
    max_priority_fee_per_gas: int | None = None,
) -> SignedTransaction:
    params: TxParams = {"from": account.address, "nonce": Nonce(nonce), "chainId": w3.eth.chain_id}
    if max_fee_per_gas is not None:
        params["maxFeePerGas"] = Wei(max_fee_per_gas)
    if max_priority_fee_per_gas is not None:
        params["maxPriorityFeePerGas"] = Wei(max_priority_fee_per_gas)
    try:
        if gas is None:
            estimate = buildable.estimate_gas({"from": account.address})
            gas = estimate + estimate * _GAS_HEADROOM_PERCENT // 100
        params["gas"] = gas
        tx = buildable.build_transaction(params)
    except Exception as exc:
        _raise_if_revert(exc, abi, action)
        raise
    return account.sign_transaction(cast(dict[str, Any], tx))


def _raise_mined_failure(w3: Web3, abi: ABI, action: str, receipt: TxReceipt) -> None:
    tx_hash = receipt["transactionHash"]
    # Replaying the transaction on the parent block's state usually reproduces the revert, naming the error.
    sent = w3.eth.get_transaction(tx_hash)
    replay: TxParams = {
        "from": sent["from"],
        "data": sent["input"],
        "value": sent["value"],
        "gas": sent["gas"],
    }
    if sent.get("to"):
        replay["to"] = sent["to"]
    try:
        w3.eth.call(replay, block_identifier=max(receipt["blockNumber"] - 1, 0))
    except Exception as exc:
        _raise_if_revert(exc, abi, action, tx_hash=tx_hash)
    raise ChainTxFailed(action, tx_hash=tx_hash)


def _raise_if_revert(exc: Exception, abi: ABI, action: str, *, tx_hash: bytes | None = None) -> None:
    """Turns a node's revert report into ChainTxFailed; returns when `exc` is not a revert."""
    revert = _revert_of(exc)
    if revert is None:
        return
    data, reason = revert
    if reason is not None:
        name: str | None = "Error"
        args: dict[str, Any] = {"reason": reason}
    else:
        name, args = _decode_error(abi, data)
    raise ChainTxFailed(
        action, error_name=name, error_args=args, revert_data=data or None, tx_hash=tx_hash
    ) from exc


def _revert_of(exc: Exception) -> tuple[bytes, str | None] | None:
    """(revert data, plain reason) of a revert as either kind of provider reports it; None if not a revert."""
    if isinstance(exc, ContractLogicError):
        data = exc.data if isinstance(exc.data, str) else None
        return bytes(HexBytes(data)) if data else b"", None
    # eth-tester (in-process py-evm) raises its own TransactionFailed, carrying either the decoded reason
    # string or the raw revert data as a bytes literal. Matched by name: production code does not import it.
    if type(exc).__name__ != "TransactionFailed" or not type(exc).__module__.startswith("eth_tester"):
        return None
    message = str(exc.args[0]) if exc.args else ""
    detail = message.removeprefix("execution reverted: ")
    if detail.startswith(("b'", 'b"')):
        try:
            raw = ast.literal_eval(detail)
        except (ValueError, SyntaxError):
            return b"", detail
        if isinstance(raw, bytes):
            return raw, None
    return b"", detail


def _decode_error(abi: ABI, data: bytes) -> tuple[str | None, dict[str, Any]]:
    if len(data) < 4:
        return None, {}
    error_abi = {**_known_errors(), **_errors_by_selector(abi)}.get(data[:4])
    if error_abi is None:
        return None, {}
    inputs = error_abi.get("inputs", [])
    try:
        values = eth_abi.decode([collapse_if_tuple(dict(i)) for i in inputs], data[4:])
    except DecodingError:
        return error_abi["name"], {}
    pairs = enumerate(zip(inputs, values, strict=True))
    return error_abi["name"], {i.get("name") or f"arg{n}": _plain(i["type"], v) for n, (i, v) in pairs}


@functools.cache
def _known_errors() -> dict[bytes, ABIError]:
    """Errors of every production contract, so that an error bubbling up from a callee is named too."""
    known = _errors_by_selector(_BUILTIN_ERRORS)
    for name in PRODUCTION_CONTRACTS:
        known.update(_errors_by_selector(load_artifact(name).abi))
    return known


def _errors_by_selector(abi: Iterable[Any]) -> dict[bytes, ABIError]:
    # An error's selector is computed like a function's: first 4 bytes of keccak of its signature.
    return {bytes(function_abi_to_4byte_selector(e)): e for e in abi if e["type"] == "error"}


def _decode_log(event_abi: ABIEvent, log: LogReceipt) -> DecodedEvent:
    inputs = event_abi.get("inputs", [])
    indexed = [i for i in inputs if i.get("indexed")]
    topics = log["topics"][1:]
    if len(topics) != len(indexed):
        raise ValueError(
            f"log {log['transactionHash'].to_0x_hex()}:{log['logIndex']} has {len(topics)} indexed values, "
            f"event {event_abi['name']} declares {len(indexed)}"
        )
    by_name: dict[str, Any] = {}
    for item, topic in zip(indexed, topics, strict=True):
        kind = collapse_if_tuple(dict(item))
        # Indexed strings, bytes, arrays and structs are stored as the keccak of their encoding.
        hashed = kind in ("string", "bytes") or kind.endswith("]") or kind.startswith("(")
        by_name[item["name"]] = bytes(topic) if hashed else _plain(kind, eth_abi.decode([kind], topic)[0])
    plain_inputs = [i for i in inputs if not i.get("indexed")]
    values = eth_abi.decode([collapse_if_tuple(dict(i)) for i in plain_inputs], log["data"])
    for item, value in zip(plain_inputs, values, strict=True):
        by_name[item["name"]] = _plain(collapse_if_tuple(dict(item)), value)
    return DecodedEvent(
        address=Web3.to_checksum_address(log["address"]),
        event=event_abi["name"],
        args={i["name"]: by_name[i["name"]] for i in inputs},
        block_number=log["blockNumber"],
        block_hash=HexBytes(log["blockHash"]),
        tx_hash=HexBytes(log["transactionHash"]),
        log_index=log["logIndex"],
    )


def _plain(kind: str, value: Any) -> Any:
    if kind == "address":
        return Web3.to_checksum_address(value)
    return value


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)
