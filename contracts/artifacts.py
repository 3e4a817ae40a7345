"""Compiled contracts as committed under contracts/artifacts (written by contracts/build.mjs).

Running the product needs no compiler: the ABI and bytecode are read from these JSON files.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from eth_typing import ABI
from hexbytes import HexBytes

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
PRODUCTION_CONTRACTS = ("TraceToken", "TraceEscrow", "TraceStakingVault")

# "TraceEscrow" or, for the test-only contracts, "test/HostileToken"; nothing that could leave the folder.
_NAME = re.compile(r"(test/)?[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True)
class Artifact:
    """One compiled contract. `abi` is shared between callers and must be treated as read-only."""

    name: str
    abi: ABI
    bytecode: bytes
    deployed_bytecode: bytes
    # sha256 over the sha256 of every source file the contract was compiled from (OpenZeppelin included).
    source_hash: str


def load_artifact(name: str) -> Artifact:
    """The artifact of contract `name` ("TraceEscrow"; test-only contracts as "test/HostileToken")."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"not a contract name: {name!r}")
    return _load(name)


@functools.cache
def _load(name: str) -> Artifact:
    path = ARTIFACTS_DIR / f"{name}.json"
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LookupError(f"no artifact for contract {name!r} in {ARTIFACTS_DIR}") from None
    contract_name = name.removeprefix("test/")
    if raw.get("contractName") != contract_name:
        raise ValueError(f"{path} holds {raw.get('contractName')!r}, not {contract_name!r}")
    bytecode = HexBytes(raw["bytecode"])
    if not bytecode:
        raise ValueError(f"{path} has no bytecode")
    return Artifact(
        name=contract_name,
        abi=cast(ABI, raw["abi"]),
        bytecode=bytes(bytecode),
        deployed_bytecode=bytes(HexBytes(raw["deployedBytecode"])),
        source_hash=str(raw["sourceHash"]),
    )
