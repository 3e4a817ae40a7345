"""The embedded development chain: an EVM JSON-RPC 2.0 server over HTTP, backed by py-evm.

It needs nothing beyond pip: py-evm runs the EVM (Prague rules), eth-tester's ``PyEVMBackend``
builds the genesis and mines; this module speaks the wire format of a real node (hex quantities,
0x-hex data, nulls, geth's error codes) so that web3.py's ``HTTPProvider``, our indexer and our
sender cannot tell it from geth or anvil for the methods they use.

Behaviour worth knowing:

- **State lives in memory only.** Stopping the server forgets every block and balance.
- **Accounts** come from the well-known development mnemonic (the one anvil and hardhat use), so
  the addresses match theirs. The keys are public: they protect nothing, on any network.
- **Mining**: every accepted transaction is mined at once in its own block (automine); there is no
  mempool, so a transaction whose nonce is ahead of the account's is rejected ("nonce too high")
  rather than queued. With ``block_time_s > 0`` a background thread also mines a block every that
  many seconds, so that confirmations accrue while nothing is sent.
- **Time**: a block's timestamp is the wall clock (plus the ``evm_increaseTime`` offset) at the
  moment it is mined, and at least its parent's plus one second. ``evm_setNextBlockTimestamp``
  pins the next block's; later blocks continue from there.
- **Finality**: the chain never reorganises by itself, so "safe" and "finalized" are "latest".
  ``evm_snapshot`` / ``evm_revert`` rewind it, which looks like a reorganisation to a client.
- **Limits**: a batch holds at most 1,000 calls, a body at most 16 MiB, and ``eth_getLogs``
  refuses a query matching more than ``max_logs`` entries (-32005, as hosted providers do).
- ``eth_call`` and ``eth_estimateGas`` run as geth runs them: on the state after the block named,
  in that block's context ("pending": the next block, at the time it would be mined), with a zero
  base fee so that an account without ether can call. A revert answers JSON-RPC error 3 with the
  revert data as ``data``.

One lock guards the EVM: every JSON-RPC call, and every block the interval miner mines, runs
alone, so the threaded HTTP server is safe.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from types import FrameType
from typing import Any, cast

import rlp  # type: ignore[import-untyped]
from eth.abc import BlockAPI, BlockHeaderAPI, ReceiptAPI, SignedTransactionAPI, StateAPI
from eth.chains.base import MiningChain
from eth.estimators.gas import binary_gas_search_1000_tolerance
from eth.exceptions import HeaderNotFound, Revert, VMError
from eth.vm.forks.london.transactions import LondonTransactionBuilder
from eth.vm.spoof import SpoofTransaction
from eth_abi.abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_account import Account
from eth_tester import PyEVMBackend  # type: ignore[import-untyped]
from eth_typing import Address, BlockNumber, Hash32
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError

log = logging.getLogger(__name__)

DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_HD_PATH = "m/44'/60'/0'/0"  # account i is DEV_HD_PATH/i, as in anvil and hardhat
DEFAULT_CHAIN_ID = 31337
DEFAULT_ACCOUNTS = 10
DEFAULT_BALANCE_WEI = 10_000 * 10**18
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8545
BLOCK_GAS_LIMIT = 30_000_000
PRIORITY_FEE_WEI = 10**9  # the tip suggested to clients and used when they give none
MAX_ACCOUNTS = 1_000
MAX_BATCH_CALLS = 1_000
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_LOGS = 10_000
MAX_MINED_AT_ONCE = 10_000
MAX_FEE_HISTORY_BLOCKS = 1_024
MAX_TOPICS = 4
IDLE_CONNECTION_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

# JSON-RPC error codes, as geth and anvil use them.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000  # the node refuses (nonce too low, header not found, ...)
LIMIT_EXCEEDED = -32005
EXECUTION_REVERTED = 3

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_QUANTITY = re.compile(r"0x[0-9a-fA-F]{1,64}")
_DATA = re.compile(r"0x(?:[0-9a-fA-F]{2})*")
_BLOCK_TAGS = frozenset({"latest", "earliest", "pending", "safe", "finalized"})
_MAX_UINT256 = 2**256 - 1

Json = Any  # a decoded JSON value
BlockRef = str | int | bytes  # a tag, a number or a block hash


class RpcError(Exception):
    """A JSON-RPC error answer: ``code``, ``message`` and optional ``data``."""

    def __init__(self, code: int, message: str, data: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Json]:
        """The ``error`` member of a response."""
        error: dict[str, Json] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True)
class DevAccount:
    """A pre-funded development account. Its key is public knowledge: development only."""

    address: str  # checksummed
    private_key: str  # 0x-hex


# --- parameters in --------------------------------------------------------------------------


def _bad(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message)


def _quantity(value: Json, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_UINT256:
        return value
    if isinstance(value, str) and _QUANTITY.fullmatch(value):
        return int(value, 16)
    raise _bad(f"{what}: expected a hex quantity such as 0x1a, got {value!r}")


def _data(value: Json, what: str) -> bytes:
    if isinstance(value, str) and _DATA.fullmatch(value):
        return bytes.fromhex(value[2:])
    raise _bad(f"{what}: expected 0x-prefixed hex bytes, got {value!r}")


def _fixed(value: Json, size: int, what: str) -> bytes:
    raw = _data(value, what)
    if len(raw) != size:
        raise _bad(f"{what}: expected {size} bytes, got {len(raw)}")
    return raw


def _address(value: Json, what: str) -> Address:
    return Address(_fixed(value, 20, what))


def _hash32(value: Json, what: str) -> Hash32:
    return Hash32(_fixed(value, 32, what))


def _flag(value: Json, what: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise _bad(f"{what}: expected true or false, got {value!r}")


def _block_ref(value: Json, what: str = "block") -> BlockRef:
    """A block tag, number, or EIP-1898 object; "latest" when left out."""
    if value is None:
        return "latest"
    if isinstance(value, str) and value in _BLOCK_TAGS:
        return value
    if isinstance(value, dict):
        if set(value) <= {"blockHash", "requireCanonical"} and "blockHash" in value:
            return _hash32(value["blockHash"], f"{what}.blockHash")
        if set(value) == {"blockNumber"}:
            return _block_ref(value["blockNumber"], f"{what}.blockNumber")
        raise _bad(f"{what}: expected {{'blockHash': ...}} or {{'blockNumber': ...}}")
    return _quantity(value, what)


def _arg(params: Sequence[Json], index: int) -> Json:
    return params[index] if index < len(params) else None


def _required(params: Sequence[Json], index: int, what: str) -> Json:
    if index >= len(params) or params[index] is None:
        raise _bad(f"missing value for required argument {index} ({what})")
    return params[index]


@dataclass(frozen=True)
class _TxRequest:
    """The transaction object of eth_call, eth_estimateGas and eth_sendTransaction."""

    sender: Address | None
    to: Address | None
    gas: int | None
    gas_price: int | None
    max_fee: int | None
    max_priority_fee: int | None
    value: int
    data: bytes
    nonce: int | None
    chain_id: int | None
    access_list: tuple[tuple[Address, tuple[int, ...]], ...]


_TX_FIELDS = frozenset(
    {
        "from", "to", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value",
        "data", "input", "nonce", "chainId", "accessList", "type",
    }
)  # fmt: skip


def _tx_request(value: Json) -> _TxRequest:
    if not isinstance(value, dict):
        raise _bad("transaction: expected an object")
    unknown = set(value) - _TX_FIELDS
    if unknown:
        raise _bad(f"transaction: unsupported fields {sorted(unknown)}")

    def optional(name: str, parse: Callable[[Json, str], Any]) -> Any:
        raw = value.get(name)
        return None if raw is None else parse(raw, f"transaction.{name}")

    data = optional("data", _data)
    payload = optional("input", _data)
    if data is not None and payload is not None and data != payload:
        raise _bad("transaction: both input and data are set and they differ")
    gas_price = optional("gasPrice", _quantity)
    max_fee = optional("maxFeePerGas", _quantity)
    max_priority_fee = optional("maxPriorityFeePerGas", _quantity)
    if gas_price is not None and (max_fee is not None or max_priority_fee is not None):
        raise _bad("transaction: gasPrice and maxFeePerGas/maxPriorityFeePerGas are exclusive")
    return _TxRequest(
        sender=optional("from", _address),
        to=optional("to", _address),
        gas=optional("gas", _quantity),
        gas_price=gas_price,
        max_fee=max_fee,
        max_priority_fee=max_priority_fee,
        value=optional("value", _quantity) or 0,
        data=payload if payload is not None else (data or b""),
        nonce=optional("nonce", _quantity),
        chain_id=optional("chainId", _quantity),
        access_list=_access_list(value.get("accessList")),
    )


def _access_list(value: Json) -> tuple[tuple[Address, tuple[int, ...]], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad("transaction.accessList: expected a list")
    entries = []
    for position, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("storageKeys", []), list):
            raise _bad(f"transaction.accessList[{position}]: expected {{address, storageKeys}}")
        address = _address(entry.get("address"), f"transaction.accessList[{position}].address")
        keys = tuple(
            int.from_bytes(_hash32(key, f"transaction.accessList[{position}].storageKeys"), "big")
            for key in entry.get("storageKeys", [])
        )
        entries.append((address, keys))
    return tuple(entries)


# --- results out ------------------------------------------------------------------------------


def _q(value: int) -> str:
    return hex(value)


def _hex(raw: bytes) -> str:
    return "0x" + raw.hex()


def _word(value: int) -> str:
    return _hex(value.to_bytes(32, "big"))


def _tx_type(tx: SignedTransactionAPI) -> int:
    return int(getattr(tx, "type_id", None) or 0)


def _revert_message(data: bytes) -> str:
    if data[:4] == _ERROR_STRING_SELECTOR:
        try:
            (reason,) = abi_decode(["string"], data[4:])
        except (DecodingError, ValueError):
            return "execution reverted"
        return f"execution reverted: {reason}"
    return "execution reverted"


def _client_version() -> str:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    return f"tracechain-devchain/v{version('tracechain-settlement')}/py-evm-{version('py-evm')}"


class DevChain:
    """A py-evm chain answering EVM JSON-RPC calls; thread safe (one lock around the EVM).

    ``call(method, params)`` answers one call (raising ``RpcError``); ``handle(payload)`` answers a
    decoded JSON-RPC request or batch. ``DevChainServer`` puts it behind HTTP.
    """

    def __init__(
        self,
        *,
        chain_id: int = DEFAULT_CHAIN_ID,
        accounts: int = DEFAULT_ACCOUNTS,
        balance_wei: int = DEFAULT_BALANCE_WEI,
        max_logs: int = MAX_LOGS,
    ) -> None:
        if not 1 <= accounts <= MAX_ACCOUNTS:
            raise ValueError(f"accounts must be between 1 and {MAX_ACCOUNTS}, got {accounts}")
        if chain_id < 1:
            raise ValueError(f"chain_id must be positive, got {chain_id}")
        if balance_wei < 0 or max_logs < 1:
            raise ValueError("balance_wei must be >= 0 and max_logs >= 1")
        self.chain_id = chain_id
        self.max_logs = max_logs
        self._lock = threading.Lock()
        self._backend = PyEVMBackend.from_mnemonic(
            DEV_MNEMONIC,
            genesis_state_overrides={"balance": balance_wei},
            num_accounts=accounts,
            genesis_parameters=PyEVMBackend.generate_genesis_params({"gas_limit": BLOCK_GAS_LIMIT}),
            hd_path=DEV_HD_PATH,
        )
        # eth-tester fixes the chain id on its chain class; a subclass carries ours, and
        # survives a revert to genesis (which rebuilds the chain from its class).
        tester_class = type(self._backend.chain)
        chain_class = type("TraceDevChain", (tester_class,), {"chain_id": chain_id})
        self._backend.chain = chain_class(self._backend.chain.chaindb.db)
        self._keys: dict[bytes, bytes] = {
            key.public_key.to_canonical_address(): key.to_bytes() for key in self._backend.account_keys
        }
        self.accounts = tuple(
            DevAccount(to_checksum_address(address), _hex(key)) for address, key in self._keys.items()
        )
        self._tx_blocks: dict[bytes, bytes] = {}  # tx hash -> hash of the block that mined it
        self._senders: dict[bytes, Address] = {}  # tx hash -> sender (recovering it is slow)
        self._snapshots: dict[int, bytes] = {}  # snapshot id -> hash of the latest block then
        self._snapshot_ids = itertools.count(1)
        self._time_offset_s = 0
        self._next_timestamp: int | None = None
        self._methods: dict[str, tuple[Callable[[list[Json]], Json], int]] = {
            "web3_clientVersion": (lambda _p: _client_version(), 0),
            "web3_sha3": (lambda p: _hex(keccak(_data(_required(p, 0, "data"), "data"))), 1),
            "net_version": (lambda _p: str(self.chain_id), 0),
            "net_listening": (lambda _p: True, 0),
            "net_peerCount": (lambda _p: "0x0", 0),
            "eth_chainId": (lambda _p: _q(self.chain_id), 0),
            "eth_syncing": (lambda _p: False, 0),
            "eth_accounts": (lambda _p: [_hex(address) for address in self._keys], 0),
            "eth_blockNumber": (lambda _p: _q(self._head().block_number), 0),
            "eth_gasPrice": (lambda _p: _q(self._pending_base_fee() + PRIORITY_FEE_WEI), 0),
            "eth_maxPriorityFeePerGas": (lambda _p: _q(PRIORITY_FEE_WEI), 0),
            "eth_feeHistory": (self._fee_history, 3),
            "eth_getBlockByNumber": (self._get_block_by_number, 2),
            "eth_getBlockByHash": (self._get_block_by_hash, 2),
            "eth_getBlockTransactionCountByNumber": (self._block_tx_count_by_number, 1),
            "eth_getBlockTransactionCountByHash": (self._block_tx_count_by_hash, 1),
            "eth_getBalance": (self._get_balance, 2),
            "eth_getCode": (self._get_code, 2),
            "eth_getTransactionCount": (self._get_transaction_count, 2),
            "eth_getStorageAt": (self._get_storage_at, 3),
            "eth_call": (self._eth_call, 3),
            "eth_estimateGas": (self._estimate_gas, 3),
            "eth_sendRawTransaction": (self._send_raw_transaction, 1),
            "eth_sendTransaction": (self._send_transaction, 1),
            "eth_getTransactionByHash": (self._get_transaction_by_hash, 1),
            "eth_getTransactionReceipt": (self._get_transaction_receipt, 1),
            "eth_getBlockReceipts": (self._get_block_receipts, 1),
            "eth_getLogs": (self._get_logs, 1),
            "evm_mine": (self._evm_mine, 1),
            "evm_snapshot": (self._evm_snapshot, 0),
            "evm_revert": (self._evm_revert, 1),
            "evm_increaseTime": (self._evm_increase_time, 1),
            "evm_setNextBlockTimestamp": (self._evm_set_next_block_timestamp, 1),
        }

    # --- entry points ---------------------------------------------------------------------

    def call(self, method: str, params: Sequence[Json] = ()) -> Json:
        """Answer one JSON-RPC call with its ``result``; raises ``RpcError``."""
        entry = self._methods.get(method)
        if entry is None:
            raise RpcError(METHOD_NOT_FOUND, f"the method {method} does not exist/is not available")
        handler, max_params = entry
        if len(params) > max_params:
            raise _bad(f"too many arguments, want at most {max_params}")
        with self._lock:
            return handler(list(params))

    def handle(self, payload: Json) -> Json | None:
        """Answer a decoded JSON-RPC request or batch; None when nothing is to be sent back."""
        if isinstance(payload, list):
            if not payload:
                return _error_response(None, RpcError(INVALID_REQUEST, "empty batch"))
            if len(payload) > MAX_BATCH_CALLS:
                return _error_response(
                    None, RpcError(INVALID_REQUEST, f"batch too large: at most {MAX_BATCH_CALLS} calls")
                )
            answers = [self._handle_one(request) for request in payload]
            return [answer for answer in answers if answer is not None] or None
        return self._handle_one(payload)

    def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` blocks (empty unless transactions are pending, which automine prevents)."""
        with self._lock:
            for _ in range(blocks):
                self._mine_block()

    def _handle_one(self, request: Json) -> Json | None:
        if not isinstance(request, dict):
            return _error_response(None, RpcError(INVALID_REQUEST, "a request must be a JSON object"))
        request_id = request.get("id")
        if not isinstance(request_id, str | int | None) or isinstance(request_id, bool):
            return _error_response(None, RpcError(INVALID_REQUEST, "id must be a string, number or null"))
        method = request.get("method")
        params = request.get("params", [])
        if request.get("jsonrpc", "2.0") != "2.0" or not isinstance(method, str):
            return _error_response(request_id, RpcError(INVALID_REQUEST, "not a JSON-RPC 2.0 request"))
        try:
            if params is None:
                params = []
            if not isinstance(params, list):
                raise _bad("params must be an array")
            result = self.call(method, params)
        except RpcError as exc:
            answer = _error_response(request_id, exc)
        except Exception as exc:
            log.exception("devchain: %s failed", method)
            answer = _error_response(request_id, RpcError(INTERNAL_ERROR, f"internal error: {exc}"))
        else:
            answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        return answer if "id" in request else None  # a notification gets no answer

    # --- chain access (callers hold the lock) ---------------------------------------------

    @property
    def _chain(self) -> MiningChain:
        chain: MiningChain = self._backend.chain  # replaced by a revert to genesis
        return chain

    def _head(self) -> BlockHeaderAPI:
        return self._chain.get_canonical_head()

    def _pending_base_fee(self) -> int:
        return self._chain.header.base_fee_per_gas or 0

    def _stamp_pending(self) -> None:
        """Give the pending block, while it is empty, the timestamp it would be mined with now."""
        chain = self._chain
        if chain.header.gas_used != 0:
            return
        if self._next_timestamp is not None:
            timestamp = self._next_timestamp
        else:
            timestamp = max(int(time.time()) + self._time_offset_s, self._head().timestamp + 1)
        if chain.header.timestamp != timestamp:
            chain.header = chain.header.copy(timestamp=timestamp)

    def _mine_block(self) -> BlockAPI:
        self._stamp_pending()
        if self._next_timestamp is not None:
            # Later blocks continue from the pinned time, as in anvil and hardhat.
            self._time_offset_s = self._next_timestamp - int(time.time())
            self._next_timestamp = None
        (block_hash,) = self._backend.mine_blocks(1)
        block: BlockAPI = self._chain.get_block_by_hash(block_hash)
        for tx in block.transactions:
            self._tx_blocks[tx.hash] = block.hash
        return block

    def _header(self, ref: BlockRef) -> BlockHeaderAPI | None:
        """The header a block reference names, the pending one included; None if unknown."""
        chain = self._chain
        if isinstance(ref, bytes):
            try:
                return chain.get_block_header_by_hash(Hash32(ref))
            except HeaderNotFound:
                return None
        if ref == "pending":
            self._stamp_pending()
            return chain.header
        head = self._head()
        if ref == "earliest":
            number = 0
        elif isinstance(ref, int):
            number = ref
        else:  # latest, safe, finalized: nothing here is ever reorganised away by itself
            return head
        if number > head.block_number:
            return None
        return chain.get_canonical_block_header_by_number(BlockNumber(number))

    def _known_header(self, ref: BlockRef) -> BlockHeaderAPI:
        header = self._header(ref)
        if header is None:
            raise RpcError(SERVER_ERROR, "header not found")
        return header

    def _is_pending(self, header: BlockHeaderAPI) -> bool:
        return header.hash == self._chain.header.hash

    def _block(self, header: BlockHeaderAPI) -> BlockAPI:
        if self._is_pending(header):
            return self._chain.get_vm(header).get_block()
        return self._chain.get_block_by_header(header)

    def _state(self, ref: BlockRef) -> StateAPI:
        return self._chain.get_vm(self._known_header(ref)).state

    def _sender(self, tx: SignedTransactionAPI) -> Address:
        sender = self._senders.get(tx.hash)
        if sender is None:
            sender = tx.sender
            self._senders[tx.hash] = sender
        return sender

    def _locate(self, tx_hash: bytes) -> tuple[BlockAPI, int] | None:
        """The canonical block holding a mined transaction, and its index there."""
        block_hash = self._tx_blocks.get(tx_hash)
        if block_hash is None:
            return None
        block: BlockAPI = self._chain.get_block_by_hash(Hash32(block_hash))
        head = self._head()
        if block.number > head.block_number:
            return None
        if self._chain.get_canonical_block_header_by_number(block.number).hash != block_hash:
            return None  # rewound by evm_revert
        for index, tx in enumerate(block.transactions):
            if tx.hash == tx_hash:
                return block, index
        return None

    # --- serialisation --------------------------------------------------------------------

    def _block_json(self, header: BlockHeaderAPI, full: bool) -> dict[str, Json]:
        block = self._block(header)
        pending = self._is_pending(header)
        transactions: list[Json] = [
            self._tx_json(tx, None if pending else block, index) if full else _hex(tx.hash)
            for index, tx in enumerate(block.transactions)
        ]
        answer: dict[str, Json] = {
            "number": _q(header.block_number),
            "hash": None if pending else _hex(header.hash),
            "parentHash": _hex(header.parent_hash),
            "nonce": None if pending else _hex(header.nonce),
            "mixHash": _hex(header.mix_hash),
            "sha3Uncles": _hex(header.uncles_hash),
            "logsBloom": _word_bytes(header.bloom, 256),
            "transactionsRoot": _hex(header.transaction_root),
            "stateRoot": _hex(header.state_root),
            "receiptsRoot": _hex(header.receipt_root),
            "miner": None if pending else _hex(header.coinbase),
            "difficulty": _q(header.difficulty),
            "extraData": _hex(header.extra_data),
            "size": _q(len(rlp.encode(block))),
            "gasLimit": _q(header.gas_limit),
            "gasUsed": _q(header.gas_used),
            "timestamp": _q(header.timestamp),
            "transactions": transactions,
            "uncles": [],
        }
        optional: dict[str, tuple[str, Callable[[Any], str]]] = {
            "baseFeePerGas": ("base_fee_per_gas", _q),
            "withdrawalsRoot": ("withdrawals_root", _hex),
            "blobGasUsed": ("blob_gas_used", _q),
            "excessBlobGas": ("excess_blob_gas", _q),
            "parentBeaconBlockRoot": ("parent_beacon_block_root", _hex),
            "requestsHash": ("requests_hash", _hex),
        }
        for name, (field, render) in optional.items():
            value = getattr(header, field, None)
            if value is not None:
                answer[name] = render(value)
        if hasattr(header, "withdrawals_root"):
            answer["withdrawals"] = []  # no consensus layer, so no withdrawals
        return answer

    def _tx_json(self, tx: SignedTransactionAPI, block: BlockAPI | None, index: int) -> dict[str, Json]:
        """A transaction as geth shows it; ``block`` None for a pending one."""
        kind = _tx_type(tx)
        base_fee = block.header.base_fee_per_gas if block is not None else None
        answer: dict[str, Json] = {
            "blockHash": None if block is None else _hex(block.hash),
            "blockNumber": None if block is None else _q(block.number),
            "from": _hex(self._sender(tx)),
            "gas": _q(tx.gas),
            "gasPrice": _q(_effective_gas_price(tx, base_fee)),
            "hash": _hex(tx.hash),
            "input": _hex(tx.data),
            "nonce": _q(tx.nonce),
            "to": _hex(tx.to) if tx.to else None,
            "transactionIndex": None if block is None else _q(index),
            "value": _q(tx.value),
            "type": _q(kind),
        }
        if kind >= 1:
            answer["chainId"] = _q(tx.chain_id or 0)
            answer["accessList"] = [
                {"address": _hex(address), "storageKeys": [_word(slot) for slot in slots]}
                for address, slots in tx.access_list
            ]
        if kind >= 2:
            answer["maxFeePerGas"] = _q(tx.max_fee_per_gas)
            answer["maxPriorityFeePerGas"] = _q(tx.max_priority_fee_per_gas)
        if kind == 3:
            answer["maxFeePerBlobGas"] = _q(tx.max_fee_per_blob_gas)
            answer["blobVersionedHashes"] = [_hex(h) for h in tx.blob_versioned_hashes]
        if kind == 4:
            answer["authorizationList"] = [
                {
                    "chainId": _q(auth.chain_id),
                    "address": _hex(auth.address),
                    "nonce": _q(auth.nonce),
                    "yParity": _q(auth.y_parity),
                    "r": _q(auth.r),
                    "s": _q(auth.s),
                }
                for auth in tx.authorization_list
            ]
        if kind == 0:
            v = _legacy_v(tx)
            if v >= 35:  # EIP-155: the chain id is folded into v
                answer["chainId"] = _q((v - 35) // 2)
            answer["v"] = _q(v)
        else:
            answer["v"] = _q(tx.y_parity)
            answer["yParity"] = _q(tx.y_parity)
        answer["r"] = _q(tx.r)
        answer["s"] = _q(tx.s)
        return answer

    def _receipts_json(self, block: BlockAPI) -> list[dict[str, Json]]:
        receipts: tuple[ReceiptAPI, ...] = block.get_receipts(self._chain.chaindb)
        answers = []
        gas_before = 0
        log_index = 0
        for index, (tx, receipt) in enumerate(zip(block.transactions, receipts, strict=True)):
            sender = self._sender(tx)
            logs = self._logs_json(block, tx, index, receipt, log_index)
            log_index += len(logs)
            created = None
            if not tx.to:
                created = _hex(keccak(rlp.encode([sender, tx.nonce]))[12:])
            answers.append(
                {
                    "blockHash": _hex(block.hash),
                    "blockNumber": _q(block.number),
                    "contractAddress": created,
                    "cumulativeGasUsed": _q(receipt.gas_used),
                    "effectiveGasPrice": _q(_effective_gas_price(tx, block.header.base_fee_per_gas)),
                    "from": _hex(sender),
                    "gasUsed": _q(receipt.gas_used - gas_before),
                    "logs": logs,
                    "logsBloom": _word_bytes(receipt.bloom, 256),
                    "status": "0x1" if receipt.state_root == b"\x01" else "0x0",
                    "to": _hex(tx.to) if tx.to else None,
                    "transactionHash": _hex(tx.hash),
                    "transactionIndex": _q(index),
                    "type": _q(_tx_type(tx)),
                }
            )
            gas_before = receipt.gas_used  # py-evm receipts carry the cumulative figure
        return answers

    def _logs_json(
        self, block: BlockAPI, tx: SignedTransactionAPI, tx_index: int, receipt: ReceiptAPI, first_index: int
    ) -> list[dict[str, Json]]:
        return [
            {
                "address": _hex(entry.address),
                "topics": [_word(topic) for topic in entry.topics],
                "data": _hex(entry.data),
                "blockNumber": _q(block.number),
                "blockHash": _hex(block.hash),
                "blockTimestamp": _q(block.header.timestamp),
                "transactionHash": _hex(tx.hash),
                "transactionIndex": _q(tx_index),
                "logIndex": _q(first_index + offset),  # counted across the whole block
                "removed": False,
            }
            for offset, entry in enumerate(receipt.logs)
        ]

    # --- eth_* reads --------------------------------------------------------------------------

    def _get_block_by_number(self, params: list[Json]) -> Json:
        header = self._header(_block_ref(_required(params, 0, "block")))
        return None if header is None else self._block_json(header, _flag(_arg(params, 1), "full"))

    def _get_block_by_hash(self, params: list[Json]) -> Json:
        header = self._header(_hash32(_required(params, 0, "block hash"), "block hash"))
        return None if header is None else self._block_json(header, _flag(_arg(params, 1), "full"))

    def _block_tx_count_by_number(self, params: list[Json]) -> Json:
        header = self._header(_block_ref(_required(params, 0, "block")))
        return None if header is None else _q(len(self._block(header).transactions))

    def _block_tx_count_by_hash(self, params: list[Json]) -> Json:
        header = self._header(_hash32(_required(params, 0, "block hash"), "block hash"))
        return None if header is None else _q(len(self._block(header).transactions))

    def _get_balance(self, params: list[Json]) -> Json:
        address = _address(_required(params, 0, "address"), "address")
        return _q(self._state(_block_ref(_arg(params, 1))).get_balance(address))

    def _get_code(self, params: list[Json]) -> Json:
        address = _address(_required(params, 0, "address"), "address")
        return _hex(self._state(_block_ref(_arg(params, 1))).get_code(address))

    def _get_transaction_count(self, params: list[Json]) -> Json:
        address = _address(_required(params, 0, "address"), "address")
        return _q(self._state(_block_ref(_arg(params, 1))).get_nonce(address))

    def _get_storage_at(self, params: list[Json]) -> Json:
        address = _address(_required(params, 0, "address"), "address")
        slot = _quantity(_required(params, 1, "slot"), "slot")  # a 32-byte hex key is a quantity too
        return _word(self._state(_block_ref(_arg(params, 2))).get_storage(address, slot))

    def _get_transaction_by_hash(self, params: list[Json]) -> Json:
        found = self._locate(_hash32(_required(params, 0, "transaction hash"), "transaction hash"))
        if found is None:
            return None
        block, index = found
        return self._tx_json(block.transactions[index], block, index)

    def _get_transaction_receipt(self, params: list[Json]) -> Json:
        found = self._locate(_hash32(_required(params, 0, "transaction hash"), "transaction hash"))
        if found is None:
            return None
        block, index = found
        return self._receipts_json(block)[index]

    def _get_block_receipts(self, params: list[Json]) -> Json:
        header = self._header(_block_ref(_required(params, 0, "block")))
        if header is None or self._is_pending(header):
            return None
        return self._receipts_json(self._block(header))

    def _fee_history(self, params: list[Json]) -> Json:
        count = _quantity(_required(params, 0, "blockCount"), "blockCount")
        newest_ref = _block_ref(_required(params, 1, "newestBlock"), "newestBlock")
        percentiles = _arg(params, 2)
        if percentiles is not None and (
            not isinstance(percentiles, list)
            or not all(isinstance(p, int | float) and not isinstance(p, bool) for p in percentiles)
            or any(not 0 <= p <= 100 for p in percentiles)
            or percentiles != sorted(percentiles)
        ):
            raise _bad("rewardPercentiles: expected ascending numbers between 0 and 100")
        newest = self._known_header("latest" if newest_ref == "pending" else newest_ref)
        count = min(count, MAX_FEE_HISTORY_BLOCKS, newest.block_number + 1)
        oldest_number = newest.block_number - count + 1
        chain = self._chain
        base_fees: list[str] = []
        ratios: list[float] = []
        rewards: list[list[str]] = []
        for number in range(oldest_number, newest.block_number + 1):
            block = chain.get_canonical_block_by_number(BlockNumber(number))
            base_fees.append(_q(block.header.base_fee_per_gas or 0))
            ratios.append(block.header.gas_used / block.header.gas_limit)
            if percentiles is not None:
                rewards.append([_q(tip) for tip in self._tips_at(block, percentiles)])
        if count:
            following = self._header(newest.block_number + 1) or chain.header
            base_fees.append(_q(following.base_fee_per_gas or 0))
        answer: dict[str, Json] = {
            "oldestBlock": _q(oldest_number if count else newest.block_number),
            "baseFeePerGas": base_fees,
            "gasUsedRatio": ratios,
        }
        if percentiles is not None:
            answer["reward"] = rewards
        return answer

    def _tips_at(self, block: BlockAPI, percentiles: list[float]) -> list[int]:
        """Effective tips at gas-weighted percentiles of a block's transactions (geth's method)."""
        if not block.transactions:
            return [0 for _ in percentiles]
        base_fee = block.header.base_fee_per_gas or 0
        receipts = block.get_receipts(self._chain.chaindb)
        used: list[tuple[int, int]] = []
        before = 0
        for tx, receipt in zip(block.transactions, receipts, strict=True):
            used.append((_effective_gas_price(tx, base_fee) - base_fee, receipt.gas_used - before))
            before = receipt.gas_used
        used.sort()
        tips = []
        for percentile in percentiles:
            threshold = block.header.gas_used * percentile / 100
            total = 0
            chosen = used[-1][0]
            for tip, gas in used:
                total += gas
                if total >= threshold:
                    chosen = tip
                    break
            tips.append(chosen)
        return tips

    def _get_logs(self, params: list[Json]) -> Json:
        query = _required(params, 0, "filter")
        if not isinstance(query, dict):
            raise _bad("filter: expected an object")
        unknown = set(query) - {"fromBlock", "toBlock", "address", "topics", "blockHash"}
        if unknown:
            raise _bad(f"filter: unsupported fields {sorted(unknown)}")
        addresses = _filter_addresses(query.get("address"))
        topics = _filter_topics(query.get("topics"))
        if query.get("blockHash") is not None:
            if query.get("fromBlock") is not None or query.get("toBlock") is not None:
                raise _bad("filter: blockHash excludes fromBlock and toBlock")
            header = self._header(_hash32(query["blockHash"], "filter.blockHash"))
            if header is None:
                raise RpcError(SERVER_ERROR, "unknown block")
            blocks: Iterator[BlockAPI] = iter([self._block(header)])
        else:
            head = self._head().block_number
            first = self._range_end(_block_ref(query.get("fromBlock"), "filter.fromBlock"), head)
            last = self._range_end(_block_ref(query.get("toBlock"), "filter.toBlock"), head)
            if first > last:
                if first > head:
                    return []
                raise _bad("invalid block range params: fromBlock is after toBlock")
            chain = self._chain
            blocks = (
                chain.get_canonical_block_by_number(BlockNumber(n)) for n in range(first, min(last, head) + 1)
            )
        found: list[dict[str, Json]] = []
        for block in blocks:
            if block.header.bloom == 0:
                continue  # no logs at all in this block
            for receipt in self._receipts_json(block):
                for entry in receipt["logs"]:
                    if _log_matches(entry, addresses, topics):
                        found.append(entry)
                        if len(found) > self.max_logs:
                            raise RpcError(
                                LIMIT_EXCEEDED,
                                f"query returned more than {self.max_logs} results;"
                                " ask for a smaller block range",
                            )
        return found

    def _range_end(self, ref: BlockRef, head: int) -> int:
        if isinstance(ref, int):
            return ref
        if ref == "earliest":
            return 0
        if ref == "pending":
            return head + 1
        if isinstance(ref, bytes):
            raise _bad("filter: fromBlock/toBlock take numbers or tags; use blockHash for a hash")
        return head

    # --- execution ----------------------------------------------------------------------------

    def _spoofed(self, request: _TxRequest, state: StateAPI, gas: int) -> SignedTransactionAPI:
        """An unsigned transaction as sent by ``request.sender``, for calls and estimates."""
        sender = request.sender or Address(b"\x00" * 20)
        if request.gas_price is not None:
            max_fee = max_priority_fee = request.gas_price
        else:
            max_fee = request.max_fee or 0
            max_priority_fee = request.max_priority_fee or 0
            if request.max_fee is None:
                max_fee = max_priority_fee
        builder = self._chain.get_vm().get_transaction_builder()
        if not issubclass(builder, LondonTransactionBuilder):
            raise RuntimeError(f"the dev chain needs a post-London VM, got {builder.__name__}")
        unsigned = builder.new_unsigned_dynamic_fee_transaction(
            chain_id=self.chain_id,
            nonce=request.nonce if request.nonce is not None else state.get_nonce(sender),
            max_priority_fee_per_gas=max_priority_fee,
            max_fee_per_gas=max_fee,
            gas=gas,
            to=request.to or Address(b""),  # empty: a contract creation
            value=request.value,
            data=request.data,
            access_list=request.access_list,
        )
        spoofed = SpoofTransaction(unsigned, from_=sender)
        return cast(SignedTransactionAPI, spoofed)  # what py-evm's own estimators pass, too

    def _costless(self, params: list[Json]) -> tuple[_TxRequest, StateAPI]:
        """The request of eth_call/eth_estimateGas, and a throwaway state to run it on.

        As in geth, it runs on the state after the block named, in that block's context (number,
        timestamp; "pending" is the next block, with its timestamp), with a zero base fee: callers
        need no ether for gas they do not price.
        """
        if _arg(params, 2) is not None:
            raise _bad("state overrides are not supported")
        request = _tx_request(_required(params, 0, "transaction"))
        header = self._known_header(_block_ref(_arg(params, 1)))
        free_header = header.copy(base_fee_per_gas=0) if header.base_fee_per_gas is not None else header
        state = self._chain.get_vm(free_header).state  # never persisted
        sender = request.sender or Address(b"\x00" * 20)
        price = request.gas_price if request.gas_price is not None else (request.max_fee or 0)
        cost = request.value + (request.gas or 0) * price
        balance = state.get_balance(sender)
        if balance < cost:
            raise _insufficient_funds(sender, balance, cost)
        return request, state

    def _eth_call(self, params: list[Json]) -> Json:
        request, state = self._costless(params)
        tx = self._spoofed(request, state, request.gas or state.gas_limit)
        try:
            computation = state.apply_transaction(tx)
        except ValidationError as exc:
            raise RpcError(SERVER_ERROR, str(exc)) from exc
        if computation.is_error:
            raise _execution_error(computation.error)
        return _hex(computation.output)

    def _estimate_gas(self, params: list[Json]) -> Json:
        request, state = self._costless(params)
        try:
            estimate = binary_gas_search_1000_tolerance(state, self._spoofed(request, state, 21_000))
        except VMError as exc:
            raise _execution_error(exc) from exc
        except ValidationError as exc:
            raise RpcError(SERVER_ERROR, str(exc)) from exc
        if request.gas is not None and estimate > request.gas:
            raise RpcError(SERVER_ERROR, f"gas required exceeds allowance ({request.gas})")
        return _q(int(estimate))

    def _send_raw_transaction(self, params: list[Json]) -> Json:
        raw = _data(_required(params, 0, "signed transaction"), "signed transaction")
        return _hex(self._submit(raw))

    def _send_transaction(self, params: list[Json]) -> Json:
        request = _tx_request(_required(params, 0, "transaction"))
        if request.sender is None:
            raise _bad("transaction.from is required")
        key = self._keys.get(request.sender)
        if key is None:
            raise RpcError(
                SERVER_ERROR, f"unknown account {_hex(request.sender)}: only the dev accounts sign"
            )
        if request.chain_id is not None and request.chain_id != self.chain_id:
            raise RpcError(SERVER_ERROR, f"invalid chain id: have {request.chain_id} want {self.chain_id}")
        self._stamp_pending()
        nonce = request.nonce
        if nonce is None:
            nonce = self._chain.get_vm().state.get_nonce(request.sender)
        gas = request.gas
        if gas is None:
            gas = int(self._estimate_gas([_tx_fields(request, nonce)]), 16)
        fields: dict[str, Any] = {
            "nonce": nonce,
            "gas": gas,
            "value": request.value,
            "data": request.data,
            "chainId": self.chain_id,
        }
        if request.to is not None:
            fields["to"] = to_checksum_address(request.to)
        if request.gas_price is not None:
            fields["gasPrice"] = request.gas_price
        else:
            tip = request.max_priority_fee if request.max_priority_fee is not None else PRIORITY_FEE_WEI
            fields["maxPriorityFeePerGas"] = tip
            fields["maxFeePerGas"] = (
                request.max_fee if request.max_fee is not None else 2 * self._pending_base_fee() + tip
            )
        if request.access_list:
            fields["accessList"] = [
                {"address": to_checksum_address(a), "storageKeys": [_word(k) for k in keys]}
                for a, keys in request.access_list
            ]
        signed = Account.sign_transaction(fields, key)
        return _hex(self._submit(bytes(signed.raw_transaction)))

    def _submit(self, raw: bytes) -> bytes:
        """Validate a signed transaction as a node's pool would, apply it and mine its block."""
        self._stamp_pending()
        chain = self._chain
        vm = chain.get_vm()
        try:
            tx = vm.get_transaction_builder().decode(raw)
        except Exception as exc:  # rlp and py-evm raise a variety of decoding errors
            raise _bad(f"invalid signed transaction: {exc}") from exc
        tx_chain_id = tx.chain_id if _tx_type(tx) or _legacy_v(tx) >= 35 else None
        if tx_chain_id is not None and tx_chain_id != self.chain_id:
            raise RpcError(
                SERVER_ERROR, f"invalid chain id for signer: have {tx_chain_id} want {self.chain_id}"
            )
        if tx.gas > chain.header.gas_limit:
            raise RpcError(SERVER_ERROR, "exceeds block gas limit")
        if tx.gas < tx.intrinsic_gas:
            raise RpcError(SERVER_ERROR, f"intrinsic gas too low: have {tx.gas}, want {tx.intrinsic_gas}")
        try:
            sender = tx.sender
        except Exception as exc:  # a signature that recovers no key
            raise RpcError(SERVER_ERROR, "invalid sender") from exc
        base_fee = self._pending_base_fee()
        max_fee = tx.max_fee_per_gas
        if tx.max_priority_fee_per_gas > max_fee:
            raise RpcError(SERVER_ERROR, "max priority fee per gas higher than max fee per gas")
        if max_fee < base_fee:
            raise RpcError(
                SERVER_ERROR,
                f"max fee per gas less than block base fee: address {_hex(sender)}, "
                f"maxFeePerGas: {max_fee}, baseFee: {base_fee}",
            )
        state = vm.state
        expected_nonce = state.get_nonce(sender)
        if tx.nonce < expected_nonce:
            raise RpcError(SERVER_ERROR, f"nonce too low: next nonce {expected_nonce}, tx nonce {tx.nonce}")
        if tx.nonce > expected_nonce:
            # No mempool: a transaction that cannot be mined now is refused, not queued.
            raise RpcError(SERVER_ERROR, f"nonce too high: next nonce {expected_nonce}, tx nonce {tx.nonce}")
        balance = state.get_balance(sender)
        cost = tx.gas * max_fee + tx.value
        if balance < cost:
            raise _insufficient_funds(sender, balance, cost)
        try:
            chain.apply_transaction(tx)
        except ValidationError as exc:
            raise RpcError(SERVER_ERROR, str(exc)) from exc
        self._senders[tx.hash] = sender  # kept for mined transactions only
        self._mine_block()
        return tx.hash

    # --- evm_* development controls -----------------------------------------------------------

    def _evm_mine(self, params: list[Json]) -> Json:
        option = _arg(params, 0)
        blocks = 1
        timestamp: int | None = None
        if isinstance(option, dict):
            if set(option) - {"timestamp", "blocks"}:
                raise _bad("evm_mine: options are timestamp and blocks")
            if option.get("blocks") is not None:
                blocks = _quantity(option["blocks"], "blocks")
            if option.get("timestamp") is not None:
                timestamp = _quantity(option["timestamp"], "timestamp")
        elif option is not None:
            timestamp = _quantity(option, "timestamp")
        if not 1 <= blocks <= MAX_MINED_AT_ONCE:
            raise _bad(f"blocks: between 1 and {MAX_MINED_AT_ONCE}")
        if timestamp is not None:
            self._pin_next_timestamp(timestamp)
        for _ in range(blocks):
            self._mine_block()
        return "0x0"

    def _evm_snapshot(self, params: list[Json]) -> Json:
        snapshot_id = next(self._snapshot_ids)
        self._snapshots[snapshot_id] = self._head().hash
        return _q(snapshot_id)

    def _evm_revert(self, params: list[Json]) -> Json:
        snapshot_id = _quantity(_required(params, 0, "snapshot id"), "snapshot id")
        block_hash = self._snapshots.get(snapshot_id)
        if block_hash is None:
            return False
        self._backend.revert_to_snapshot(block_hash)
        # As in anvil and hardhat, a snapshot is used up by reverting to it, and so are later ones.
        for later in [known for known in self._snapshots if known >= snapshot_id]:
            del self._snapshots[later]
        return True

    def _evm_increase_time(self, params: list[Json]) -> Json:
        seconds = _quantity(_required(params, 0, "seconds"), "seconds")
        self._time_offset_s += seconds
        return self._time_offset_s

    def _evm_set_next_block_timestamp(self, params: list[Json]) -> Json:
        self._pin_next_timestamp(_quantity(_required(params, 0, "timestamp"), "timestamp"))
        return None

    def _pin_next_timestamp(self, timestamp: int) -> None:
        latest = self._head().timestamp
        if timestamp <= latest:
            raise RpcError(
                SERVER_ERROR, f"timestamp {timestamp} is not after the latest block's timestamp {latest}"
            )
        self._next_timestamp = timestamp


def _legacy_v(tx: SignedTransactionAPI) -> int:
    return int(tx.v)  # type: ignore[attr-defined]  # legacy transactions only


def _word_bytes(value: int, size: int) -> str:
    return _hex(value.to_bytes(size, "big"))


def _effective_gas_price(tx: SignedTransactionAPI, base_fee: int | None) -> int:
    if _tx_type(tx) < 2:
        return int(tx.gas_price)
    if base_fee is None:  # pending: the most it may pay
        return int(tx.max_fee_per_gas)
    return int(min(tx.max_fee_per_gas, tx.max_priority_fee_per_gas + base_fee))


def _insufficient_funds(sender: bytes, balance: int, cost: int) -> RpcError:
    return RpcError(
        SERVER_ERROR,
        f"insufficient funds for gas * price + value: address {_hex(sender)} have {balance} want {cost}",
    )


def _execution_error(error: BaseException) -> RpcError:
    if isinstance(error, Revert):
        data = error.args[0] if error.args and isinstance(error.args[0], bytes) else b""
        return RpcError(EXECUTION_REVERTED, _revert_message(data), _hex(data))
    return RpcError(SERVER_ERROR, f"execution failed: {type(error).__name__} {error}".strip())


def _tx_fields(request: _TxRequest, nonce: int) -> dict[str, Json]:
    """``request`` back as a JSON-RPC transaction object (to estimate its gas)."""
    fields: dict[str, Json] = {"value": _q(request.value), "input": _hex(request.data), "nonce": _q(nonce)}
    if request.sender is not None:
        fields["from"] = _hex(request.sender)
    if request.to is not None:
        fields["to"] = _hex(request.to)
    if request.access_list:
        fields["accessList"] = [
            {"address": _hex(a), "storageKeys": [_word(k) for k in keys]} for a, keys in request.access_list
        ]
    return fields


def _filter_addresses(value: Json) -> frozenset[str] | None:
    if value is None:
        return None
    listed = value if isinstance(value, list) else [value]
    return frozenset(_hex(_address(item, "filter.address")) for item in listed)


def _filter_topics(value: Json) -> list[frozenset[str] | None]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOPICS:
        raise _bad(f"filter.topics: expected a list of at most {MAX_TOPICS} positions")
    positions: list[frozenset[str] | None] = []
    for index, position in enumerate(value):
        if position is None:
            positions.append(None)
            continue
        alternatives = position if isinstance(position, list) else [position]
        hashes = frozenset(_hex(_hash32(t, f"filter.topics[{index}]")) for t in alternatives if t is not None)
        # An empty list, or one holding null, matches anything at that position (as geth).
        positions.append(None if not hashes or None in alternatives else hashes)
    return positions


def _log_matches(
    entry: dict[str, Json], addresses: frozenset[str] | None, topics: list[frozenset[str] | None]
) -> bool:
    if addresses is not None and entry["address"] not in addresses:
        return False
    logged: list[str] = entry["topics"]
    if len(topics) > len(logged):
        return False
    return all(wanted is None or logged[i] in wanted for i, wanted in enumerate(topics))


def _error_response(request_id: Json, error: RpcError) -> dict[str, Json]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


# --- HTTP -------------------------------------------------------------------------------------


class _RpcRequestHandler(BaseHTTPRequestHandler):
    """JSON-RPC over HTTP POST; keep-alive, as web3's HTTPProvider reuses its connection."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_TIMEOUT_S
    server: _RpcHttpServer

    def do_POST(self) -> None:
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.isdigit():
            self._reply(HTTPStatus.LENGTH_REQUIRED, b"")
            return
        length = int(length_header)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"")
            return
        body = self.rfile.read(length)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            answer: Json = _error_response(None, RpcError(PARSE_ERROR, "parse error"))
        else:
            answer = self.server.chain.handle(payload)
        encoded = b"" if answer is None else json.dumps(answer, separators=(",", ":")).encode()
        self._reply(HTTPStatus.OK, encoded)

    def do_OPTIONS(self) -> None:
        self._reply(HTTPStatus.NO_CONTENT, b"")  # CORS preflight, for browser wallets and dapps

    def do_GET(self) -> None:
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, b"POST JSON-RPC 2.0 requests here\n", "text/plain")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Content-Type")
        self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("devchain http: " + format, *args)


class _RpcHttpServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold up the stop

    def __init__(self, address: tuple[str, int], chain: DevChain) -> None:
        self.chain = chain
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _RpcRequestHandler)


class DevChainServer:
    """A ``DevChain`` served over HTTP from background threads; binds when built.

    ``start()`` serves, ``stop()`` stops and waits; also a context manager. Port 0 takes a free
    port (see ``port`` and ``url``). With ``block_time_s > 0`` a thread mines a block that often.
    """

    def __init__(
        self,
        chain: DevChain,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        block_time_s: int = 0,
    ) -> None:
        if block_time_s < 0:
            raise ValueError(f"block_time_s must be >= 0, got {block_time_s}")
        self.chain = chain
        self.block_time_s = block_time_s
        self._http = _RpcHttpServer((host, port), chain)
        self.host = host
        self.port: int = self._http.server_address[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        """The JSON-RPC URL clients use."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> DevChainServer:
        """Serve (and mine on the interval, if any) from background threads."""
        if self._threads:
            raise RuntimeError("the dev chain server is already started")
        self._threads.append(
            threading.Thread(target=self._http.serve_forever, name="devchain-http", daemon=True)
        )
        if self.block_time_s > 0:
            self._threads.append(
                threading.Thread(target=self._mine_on_interval, name="devchain-miner", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and mining, and wait for both to end."""
        self._stop.set()
        if self._threads:
            self._http.shutdown()
        self._http.server_close()
        for thread in self._threads:
            thread.join(STOP_TIMEOUT_S)

    def __enter__(self) -> DevChainServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _mine_on_interval(self) -> None:
        while not self._stop.wait(self.block_time_s):
            try:
                self.chain.mine()
            except Exception:
                log.exception("devchain: mining on the interval failed")


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    chain_id: int = DEFAULT_CHAIN_ID,
    accounts: int = DEFAULT_ACCOUNTS,
    block_time_s: int = 0,
    on_ready: Callable[[DevChainServer], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run a dev chain until ``stop`` is set or, from the main thread, until SIGINT or SIGTERM.

    ``on_ready`` is called once the server listens (to print its URL and accounts). Raises
    ``OSError`` when the address cannot be bound.
    """
    stop = stop or threading.Event()
    server = DevChainServer(
        DevChain(chain_id=chain_id, accounts=accounts), host, port, block_time_s=block_time_s
    )

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("devchain: stopping on %s", signal.Signals(signum).name)
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if on_ready is not None:
            on_ready(server)
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
