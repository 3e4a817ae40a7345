"""A small chain client over web3: heads, block headers and logs, batched where the provider can."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from web3 import Web3
from web3.exceptions import Web3Exception
from web3.types import FilterParams, LogReceipt

from contracts.deployment import Deployment


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
        params: FilterParams = {
            "fromBlock": from_block,
            "toBlock": to_block,
            "address": [Web3.to_checksum_address(a) for a in deployment.contracts],
        }
        raw = self._call(lambda: self.w3.eth.get_logs(params))
        return [_raw_log(entry) for entry in raw]

    @staticmethod
    def _call(fn: Any) -> Any:
        try:
            return fn()
        except (Web3Exception, OSError, ValueError) as exc:
            raise ProviderError(str(exc) or type(exc).__name__) from exc


def _header(block: Any) -> Header:
    return Header(
        number=int(block["number"]),
        hash=hex32(block["hash"]),
        parent_hash=hex32(block["parentHash"]),
        block_time=datetime.fromtimestamp(int(block["timestamp"]), UTC),
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
