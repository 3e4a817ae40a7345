"""A small chain client over web3: heads, block headers and logs, batched where the provider can."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from web3 import Web3
from web3.exceptions import Web3Exception
from web3.providers import JSONBaseProvider
from web3.types import FilterParams, LogReceipt, RPCEndpoint

from contracts.deployment import Deployment

# Requests per JSON-RPC batch: hosted providers accept from 100 up to 1000 or so.
RPC_BATCH_MAX = 100


class ProviderError(Exception):
    """The node refused or failed a request (limits, timeouts, a node in trouble)."""


@dataclass(frozen=True, slots=True)
class Header:
    number: int
    hash: str
    parent_hash: str
    block_time: datetime


@dataclass(frozen=True, slots=True)
class RawLog:
    """A log as the node returned it, with hashes as lower-case 0x hex."""

    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    address: str
    topics: tuple[bytes, ...]
    data: bytes


def hex32(value: bytes | str) -> str:
    text = value.hex() if isinstance(value, bytes | bytearray) else str(value)
    text = text.lower()
    return text if text.startswith("0x") else "0x" + text


class ChainClient:
    """Reads what the indexer needs; every failure of the node is a :class:`ProviderError`."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3
        self._can_batch = True

    def chain_id(self) -> int:
        return int(self._call(lambda: self.w3.eth.chain_id))

    def head(self) -> int:
        return int(self._call(lambda: self.w3.eth.block_number))

    def headers(self, numbers: Sequence[int]) -> dict[int, Header | None]:
        """Headers of ``numbers`` (None where the chain has no such block any more)."""
        wanted = sorted(set(numbers))
        if not wanted:
            return {}
        blocks: list[Any] = []
        if self._can_batch and len(wanted) > 1:
            try:
                with self.w3.batch_requests() as batch:
                    batch.add_mapping({self.w3.eth.get_block: list(wanted)})
                    blocks = list(batch.execute())
            except (TypeError, Web3Exception) as exc:
                if "not supported" not in str(exc) and "Batch" not in type(exc).__name__:
                    raise ProviderError(f"batched block headers failed: {exc}") from exc
                self._can_batch = False  # an in-process provider: one call a block
                blocks = []
        if not blocks:
            blocks = [self._get_block(n) for n in wanted]
        out: dict[int, Header | None] = {}
        for number, block in zip(wanted, blocks, strict=True):
            out[number] = None if block is None or isinstance(block, Exception) else _header(block)
        return out

    def _get_block(self, number: int) -> Any:
        try:
            return self.w3.eth.get_block(number)
        except Web3Exception as exc:
            if "not found" in str(exc).lower():
                return None
            raise ProviderError(f"eth_getBlockByNumber {number}: {exc}") from exc

    def logs(self, deployment: Deployment, from_block: int, to_block: int) -> list[RawLog]:
        addresses = [Web3.to_checksum_address(a) for a in deployment.contracts]
        if isinstance(self.w3.provider, JSONBaseProvider):
            parsed: list[RawLog] = self._call(lambda: self._json_logs(addresses, from_block, to_block))
            return parsed
        params: FilterParams = {"fromBlock": from_block, "toBlock": to_block, "address": addresses}
        raw = self._call(lambda: self.w3.eth.get_logs(params))
        return [_raw_log(entry) for entry in raw]

    def _json_logs(self, addresses: Sequence[str], from_block: int, to_block: int) -> list[RawLog]:
        """eth_getLogs straight from a JSON-RPC provider, parsed here: web3's result formatters and
        attribute dicts cost several times what the node and the network take for large windows."""
        params = {"fromBlock": hex(from_block), "toBlock": hex(to_block), "address": addresses}
        response = self.w3.provider.make_request(RPCEndpoint("eth_getLogs"), [params])
        error = rpc_error_text(response)
        if error is not None:
            raise ProviderError(f"eth_getLogs: {error}")
        result = response.get("result")
        if not isinstance(result, list):
            raise ProviderError(f"eth_getLogs returned no list of logs: {str(result)[:200]}")
        try:
            return [_json_log(entry) for entry in result]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderError(f"eth_getLogs returned a malformed log: {exc!r}") from exc

    @staticmethod
    def _call(fn: Any) -> Any:
        try:
            return fn()
        except (Web3Exception, OSError, ValueError) as exc:
            raise ProviderError(str(exc) or type(exc).__name__) from exc


def json_rpc_batch(w3: Web3, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]] | None:
    """The raw JSON-RPC answers to ``calls`` (each ``{"result": ...}`` or ``{"error": ...}``, in the order
    of ``calls``), sent in batches of at most :data:`RPC_BATCH_MAX`; None when the provider cannot batch
    (an in-process provider, or a node that refuses batches): the caller then asks one call at a time.

    Raw answers skip web3's result formatters, which cost more than the node for large answers.
    A transport failure raises :class:`ProviderError`.
    """
    provider = w3.provider
    if not isinstance(provider, JSONBaseProvider):
        return None
    answers: list[dict[str, Any]] = []
    for start in range(0, len(calls), RPC_BATCH_MAX):
        chunk = [
            (RPCEndpoint(method), list(params)) for method, params in calls[start : start + RPC_BATCH_MAX]
        ]
        try:
            response: Any = provider.make_batch_request(chunk)
        except NotImplementedError:
            return None
        except (Web3Exception, OSError, ValueError) as exc:
            raise ProviderError(str(exc) or type(exc).__name__) from exc
        # A node that does not take batches answers with one error object instead of a list.
        if not isinstance(response, list) or len(response) != len(chunk):
            return None
        answers.extend(dict(item) for item in response)
    return answers


def rpc_error_text(answer: Mapping[str, Any]) -> str | None:
    """The error message of a raw JSON-RPC answer, None when it has a result."""
    error = answer.get("error")
    if error is None:
        return None
    if isinstance(error, Mapping):
        return str(error.get("message") or error)
    return str(error)


def _header(block: Any) -> Header:
    return Header(
        number=int(block["number"]),
        hash=hex32(block["hash"]),
        parent_hash=hex32(block["parentHash"]),
        block_time=datetime.fromtimestamp(int(block["timestamp"]), UTC),
    )


def _json_log(entry: Mapping[str, Any]) -> RawLog:
    """A log as JSON-RPC sends it: quantities and data as 0x hex strings."""
    return RawLog(
        block_number=int(entry["blockNumber"], 16),
        block_hash=hex32(entry["blockHash"]),
        tx_hash=hex32(entry["transactionHash"]),
        log_index=int(entry["logIndex"], 16),
        address=str(entry["address"]).lower(),
        topics=tuple(bytes.fromhex(t[2:]) for t in entry["topics"]),
        data=bytes.fromhex(entry["data"][2:]),
    )


def _raw_log(entry: LogReceipt) -> RawLog:
    return RawLog(
        block_number=int(entry["blockNumber"]),
        block_hash=hex32(entry["blockHash"]),
        tx_hash=hex32(entry["transactionHash"]),
        log_index=int(entry["logIndex"]),
        address=str(entry["address"]).lower(),
        topics=tuple(bytes(t) for t in entry["topics"]),
        data=bytes(entry["data"]),
    )
