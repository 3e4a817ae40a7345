"""The deployment record: which chain, which contract addresses, from which block to index.

``tracechain deploy`` writes it once; every process (indexer, sender, API) reads it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

_ADDRESS = re.compile(r"^0x[0-9a-f]{40}$")


class DeploymentError(ValueError):
    """The deployment record is missing or unusable."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """Addresses are stored lower-case (the form the ledger and tables use)."""

    chain_id: int
    start_block: int
    token: str
    escrow: str
    vault: str
    treasury: str
    fee_wallet: str

    def __post_init__(self) -> None:
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise DeploymentError("chain_id must be a positive integer")
        if (
            isinstance(self.start_block, bool)
            or not isinstance(self.start_block, int)
            or self.start_block < 0
        ):
            raise DeploymentError("start_block must be a non-negative integer")
        for name in ("token", "escrow", "vault", "treasury", "fee_wallet"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ADDRESS.fullmatch(value.lower()):
                raise DeploymentError(f"{name} must be an address, got {value!r:.60}")
            object.__setattr__(self, name, value.lower())

    @property
    def contracts(self) -> tuple[str, ...]:
        """Our contracts, whose logs the indexer reads."""
        return (self.token, self.escrow, self.vault)

    @property
    def custody(self) -> frozenset[str]:
        """Addresses holding platform TRACE, each mirrored by a ledger account."""
        return frozenset({self.escrow, self.vault, self.treasury, self.fee_wallet})

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a record)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".deployment-")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        Path(tmp).replace(path)

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise DeploymentError(f"no deployment record at {path}; run `tracechain deploy` first") from exc
        except (OSError, ValueError) as exc:
            raise DeploymentError(f"cannot read the deployment record {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise DeploymentError(f"{path} does not hold a deployment record")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise DeploymentError(f"{path} does not hold a deployment record: {exc}") from exc
