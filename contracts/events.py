"""Decoding our contracts' logs into event names and JSON-ready arguments, for the indexer.

Arguments are stored as JSON: integers as decimal strings (uint256 does not fit a JSON number),
addresses and bytes as lower-case 0x hex.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from eth_abi.abi import decode as abi_decode
from eth_utils.abi import event_abi_to_log_topic

from contracts.artifacts import PRODUCTION_CONTRACTS, load_artifact
from contracts.client import RawLog

# Decodes one 32-byte ABI word of a static elementary type into its JSON value, or returns
# _REFUSED where eth_abi would refuse the word (bad padding, out of range): the general path
# then decodes the log and raises eth_abi's own error.
WordDecoder = Callable[[bytes], Any]
_REFUSED = object()
_SIZED = re.compile(r"(uint|int|bytes)([0-9]+)")


def _address(word: bytes) -> Any:
    return _REFUSED if any(word[:12]) else "0x" + word[12:].hex()


def _boolean(word: bytes) -> Any:
    value = int.from_bytes(word)
    return _REFUSED if value > 1 else value == 1


def _word_decoder(type_: str) -> WordDecoder | None:
    """A fast decoder for ``type_`` if it is a static elementary type, else None (eth_abi decodes it)."""
    if type_ == "address":
        return _address
    if type_ == "bool":
        return _boolean
    sized = _SIZED.fullmatch(type_)
    if sized is None:
        return None
    kind, size = sized.group(1), int(sized.group(2))
    if kind == "uint" and size % 8 == 0 and 8 <= size <= 256:
        limit = 2**size

        def unsigned(word: bytes) -> Any:
            value = int.from_bytes(word)
            return str(value) if value < limit else _REFUSED

        return unsigned
    if kind == "int" and size % 8 == 0 and 8 <= size <= 256:
        low, high = -(2 ** (size - 1)), 2 ** (size - 1)

        def signed(word: bytes) -> Any:
            value = int.from_bytes(word, signed=True)
            return str(value) if low <= value < high else _REFUSED

        return signed
    if kind == "bytes" and 1 <= size <= 32:

        def fixed(word: bytes) -> Any:
            return _REFUSED if any(word[size:]) else "0x" + word[:size].hex()

        return fixed
    return None


@dataclass(frozen=True, slots=True)
class _EventSpec:
    name: str
    indexed: tuple[tuple[str, str], ...]  # (name, type)
    data: tuple[tuple[str, str], ...]
    # One word decoder per indexed field, then per data field; None when a field is not a static
    # elementary type (strings, arrays, tuples): then every log of the event goes through eth_abi.
    fast: tuple[tuple[str, WordDecoder], ...] | None = None

    def decode_fast(self, log: RawLog) -> dict[str, Any] | None:
        """The arguments of ``log`` decoded word by word; None when eth_abi must decide."""
        if self.fast is None or len(log.data) < 32 * len(self.data):
            return None
        words = [*log.topics[1:], *(log.data[i : i + 32] for i in range(0, 32 * len(self.data), 32))]
        args: dict[str, Any] = {}
        for (name, decode), word in zip(self.fast, words, strict=True):
            if len(word) != 32:
                return None
            value = decode(word)
            if value is _REFUSED:
                return None
            args[name] = value
        return args


class LogDecoder:
    """Maps a log's first topic to the event of our ABIs that emits it."""

    def __init__(self, contract_names: Iterable[str] = PRODUCTION_CONTRACTS) -> None:
        self._specs: dict[bytes, _EventSpec] = {}
        for name in contract_names:
            for raw_item in load_artifact(name).abi:
                item = cast(dict[str, Any], raw_item)
                if item.get("type") != "event" or item.get("anonymous"):
                    continue
                inputs: list[dict[str, Any]] = item.get("inputs", [])
                indexed = tuple((i["name"], i["type"]) for i in inputs if i.get("indexed"))
                data = tuple((i["name"], i["type"]) for i in inputs if not i.get("indexed"))
                decoders = [(name, _word_decoder(type_)) for name, type_ in (*indexed, *data)]
                fast = (
                    tuple((name, decoder) for name, decoder in decoders if decoder is not None)
                    if all(decoder is not None for _, decoder in decoders)
                    else None
                )
                spec = _EventSpec(str(item["name"]), indexed, data, fast)
                self._specs[bytes(event_abi_to_log_topic(item))] = spec  # type: ignore[arg-type]

    def __call__(self, log: RawLog) -> tuple[str, dict[str, Any]] | None:
        """The event name and arguments, or None for a log no ABI of ours describes."""
        if not log.topics:
            return None
        spec = self._specs.get(log.topics[0])
        if spec is None or len(log.topics) != len(spec.indexed) + 1:
            return None
        fast = spec.decode_fast(log)
        if fast is not None:
            return spec.name, fast
        args: dict[str, Any] = {}
        for (name, type_), topic in zip(spec.indexed, log.topics[1:], strict=True):
            (value,) = abi_decode([type_], topic)
            args[name] = _json_value(value)
        values = abi_decode([t for _, t in spec.data], log.data) if spec.data else ()
        for (name, _), value in zip(spec.data, values, strict=True):
            args[name] = _json_value(value)
        return spec.name, args


def _json_value(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str):
        return value.lower() if value.startswith("0x") else value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json_value(v) for k, v in value.items()}
    return str(value)
