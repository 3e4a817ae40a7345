"""Decoding our contracts' logs into event names and JSON-ready arguments, for the indexer.

Arguments are stored as JSON: integers as decimal strings (uint256 does not fit a JSON number),
addresses and bytes as lower-case 0x hex.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from eth_abi.abi import decode as abi_decode
from eth_utils.abi import event_abi_to_log_topic

from contracts.artifacts import PRODUCTION_CONTRACTS, load_artifact
from contracts.client import RawLog


@dataclass(frozen=True, slots=True)
class _EventSpec:
    name: str
    indexed: tuple[tuple[str, str], ...]  # (name, type)
    data: tuple[tuple[str, str], ...]


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
                spec = _EventSpec(
                    str(item["name"]),
                    tuple((i["name"], i["type"]) for i in inputs if i.get("indexed")),
                    tuple((i["name"], i["type"]) for i in inputs if not i.get("indexed")),
                )
                self._specs[bytes(event_abi_to_log_topic(item))] = spec  # type: ignore[arg-type]

    def __call__(self, log: RawLog) -> tuple[str, dict[str, Any]] | None:
        """The event name and arguments, or None for a log no ABI of ours describes."""
        if not log.topics:
            return None
        spec = self._specs.get(log.topics[0])
        if spec is None or len(log.topics) != len(spec.indexed) + 1:
            return None
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
