"""What callers ask the ledger to book. Each command is validated when it is built."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ledger.errors import InvalidInput
from ledger.money import check_amount

KEY_MAX_CHARS = 256
METADATA_MAX_BYTES = 16_384
MAX_LEGS = 64
# Most commands one engine batch takes (bounds memory and lock hold time).
BATCH_MAX_COMMANDS = 20_000
TIMEOUT_MAX_S = 10 * 365 * 86_400
_KIND = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
_ACCOUNT_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,199}$")
_ASSET_CODE = re.compile(r"^[A-Z][A-Z0-9]{1,15}$")
_HASH32 = re.compile(r"^0x[0-9a-f]{64}$")

AccountKind = Literal["asset", "liability", "equity", "revenue", "expense"]
ACCOUNT_KINDS: tuple[AccountKind, ...] = ("asset", "liability", "equity", "revenue", "expense")
# The side on which each kind's balance grows ("normal balance").
DEBIT_NORMAL_KINDS = frozenset({"asset", "expense"})
ACCOUNT_FLAGS = ("debits_must_not_exceed_credits", "credits_must_not_exceed_debits", "closed")


# Keys of entries the ledger books by itself (the expiry sweep); callers may not take them.
SYSTEM_KEY_PREFIX = "sys:"


def check_caller_key(key: object) -> str:
    """:func:`check_key` for a key chosen by an outside caller (API, workers)."""
    checked = check_key(key)
    if checked.startswith(SYSTEM_KEY_PREFIX):
        raise InvalidInput(f"keys starting with {SYSTEM_KEY_PREFIX!r} are reserved for the ledger itself")
    return checked


def check_key(key: object, what: str = "key") -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= KEY_MAX_CHARS or not key.isprintable():
        raise InvalidInput(f"{what} must be 1 to {KEY_MAX_CHARS} printable characters")
    return key


def check_account_code(code: object) -> str:
    if not isinstance(code, str) or not _ACCOUNT_CODE.fullmatch(code):
        raise InvalidInput(
            f"account code must be 1-200 characters of letters, digits and _.:@/+- , got {code!r:.90}"
        )
    return code


def check_asset_code(code: object) -> str:
    if not isinstance(code, str) or not _ASSET_CODE.fullmatch(code):
        raise InvalidInput(f"asset code must be 2-16 upper-case letters and digits, got {code!r:.90}")
    return code


def check_entry_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise InvalidInput(f"entry kind must match {_KIND.pattern}, got {kind!r:.90}")
    return kind


def canonical_metadata(metadata: object) -> str:
    """Metadata as canonical JSON text (sorted keys); refuses non-objects, floats and big blobs."""
    if not isinstance(metadata, Mapping):
        raise InvalidInput("metadata must be a JSON object")
    if not metadata:
        return "{}"
    _refuse_floats(metadata)
    try:
        text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"metadata is not plain JSON: {exc}") from exc
    try:
        size = len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidInput("metadata must be valid Unicode text") from exc
    if size > METADATA_MAX_BYTES:
        raise InvalidInput(f"metadata is larger than {METADATA_MAX_BYTES} bytes")
    if "\\u0000" in text:
        raise InvalidInput("metadata may not contain NUL characters")
    return text


def _refuse_floats(value: object, depth: int = 0) -> None:
    if depth > 32:
        raise InvalidInput("metadata is nested too deeply")
    if isinstance(value, float):
        raise InvalidInput("metadata may not hold floating-point numbers; use strings")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput("metadata keys must be strings")
            _refuse_floats(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item, depth + 1)


@dataclass(frozen=True, slots=True)
class ChainRef:
    """Where on chain the booked movement happened."""

    chain_id: int
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str

    def __post_init__(self) -> None:
        # Upper bounds are those of the columns (bigint, integer, bigint).
        for name, limit in (("chain_id", 2**63), ("log_index", 2**31), ("block_number", 2**63)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
                raise InvalidInput(f"chain {name} must be an integer from 0 to {limit - 1}")
        if self.chain_id == 0:
            raise InvalidInput("chain_id must be positive")
        for name in ("tx_hash", "block_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HASH32.fullmatch(value):
                raise InvalidInput(f"chain {name} must be 0x and 64 lower-case hex digits")

    def as_list(self) -> list[Any]:
        return [self.chain_id, self.tx_hash, self.log_index, self.block_number, self.block_hash]


@dataclass(frozen=True, slots=True)
class Leg:
    """One transfer of an entry: ``amount`` base units from ``debit`` to ``credit``."""

    debit: str
    credit: str
    amount: int
    asset: str | None = None
    pending: bool = False
    timeout_s: int | None = None

    def __post_init__(self) -> None:
        check_account_code(self.debit)
        check_account_code(self.credit)
        check_amount(self.amount)
        if self.asset is not None:
            check_asset_code(self.asset)
        if self.debit == self.credit:
            raise InvalidInput(f"a transfer needs two different accounts, got {self.debit!r} twice")
        if not isinstance(self.pending, bool):
            raise InvalidInput("pending must be true or false")
        if self.timeout_s is not None:
            if not self.pending:
                raise InvalidInput("timeout_s applies only to a pending transfer")
            if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int):
                raise InvalidInput("timeout_s must be an integer number of seconds")
            if not 1 <= self.timeout_s <= TIMEOUT_MAX_S:
                raise InvalidInput(f"timeout_s must be between 1 and {TIMEOUT_MAX_S}")

    def as_list(self) -> list[Any]:
        return [self.debit, self.credit, str(self.amount), self.asset, self.pending, self.timeout_s]


def _content_hash(parts: list[Any]) -> bytes:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).digest()


def _check_effective(effective_at: datetime | None) -> None:
    if effective_at is not None and (not isinstance(effective_at, datetime) or effective_at.tzinfo is None):
        raise InvalidInput("effective_at must be a timestamp with a time zone")


@dataclass(frozen=True, slots=True)
class NewEntry:
    """An atomic group of transfers. A hold is an entry with one pending transfer."""

    key: str
    legs: tuple[Leg, ...]
    kind: str = "transfer"
    metadata: Mapping[str, Any] = field(default_factory=dict)
    effective_at: datetime | None = None
    chain: ChainRef | None = None
    metadata_json: str = field(init=False, repr=False, compare=False)
    content_hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_entry_kind(self.kind)
        _check_effective(self.effective_at)
        if not isinstance(self.legs, tuple) or not self.legs:
            raise InvalidInput("an entry needs at least one transfer")
        if not all(isinstance(leg, Leg) for leg in self.legs):
            raise InvalidInput("an entry's transfers must be Leg objects")
        if len(self.legs) > MAX_LEGS:
            raise InvalidInput(f"an entry holds at most {MAX_LEGS} transfers")
        if any(leg.pending for leg in self.legs) and len(self.legs) != 1:
            raise InvalidInput("a hold (pending transfer) must be the only transfer of its entry")
        meta = canonical_metadata(self.metadata)
        object.__setattr__(self, "metadata_json", meta)
        # Codes, amounts and kinds cannot hold control characters and JSON escapes them, so
        # joining with the ASCII separators is unambiguous (and much cheaper than json.dumps).
        legs = "\x1e".join(
            f"{leg.debit}\x1f{leg.credit}\x1f{leg.amount}\x1f{leg.asset or ''}\x1f"
            f"{int(leg.pending)}\x1f{'' if leg.timeout_s is None else leg.timeout_s}"
            for leg in self.legs
        )
        chain = "" if self.chain is None else "\x1f".join(map(str, self.chain.as_list()))
        # The same instant written with another offset is the same entry.
        effective = self.effective_at.astimezone(UTC).isoformat() if self.effective_at else ""
        text = f"entry\x1d{self.kind}\x1d{legs}\x1d{meta}\x1d{effective}\x1d{chain}"
        digest = hashlib.sha256(text.encode()).digest()
        object.__setattr__(self, "content_hash", digest)


@dataclass(frozen=True, slots=True)
class Resolve:
    """Resolve the hold booked under ``pending_key``.

    ``chain`` places the resolution on chain (the confirmed transaction that settled the hold).

    ``action`` is ``post`` (``amount`` None posts all of it; a smaller amount posts that and
    releases the rest), ``void`` (release it) or ``expire`` (release it once its timeout passed).
    """

    key: str
    pending_key: str
    action: Literal["post", "void", "expire"]
    amount: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    chain: ChainRef | None = None
    metadata_json: str = field(init=False, repr=False, compare=False)
    content_hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_key(self.key)
        check_key(self.pending_key, "pending_key")
        if self.action not in ("post", "void", "expire"):
            raise InvalidInput("action must be post, void or expire")
        if self.amount is not None:
            if self.action != "post":
                raise InvalidInput("only a post may name an amount")
            check_amount(self.amount)
        if self.chain is not None and not isinstance(self.chain, ChainRef):
            raise InvalidInput("chain must be a chain reference")
        meta = canonical_metadata(self.metadata)
        object.__setattr__(self, "metadata_json", meta)
        amount = None if self.amount is None else str(self.amount)
        parts: list[Any] = ["resolve", self.action, self.pending_key, amount, meta]
        if self.chain is not None:  # appended only when present: older keys keep their hash
            parts.append(self.chain.as_list())
        digest = _content_hash(parts)
        object.__setattr__(self, "content_hash", digest)

    @property
    def kind(self) -> str:
        return {"post": "post_pending", "void": "void_pending", "expire": "expire"}[self.action]


@dataclass(frozen=True, slots=True)
class Reverse:
    """Book the mirror image of the posted entry ``entry_key`` (a correction).

    ``chain`` places the reversal on chain, e.g. a compensation for an orphaned event given the
    orphaned event's reference, so that balances at a block no longer count the event.
    """

    key: str
    entry_key: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    chain: ChainRef | None = None
    metadata_json: str = field(init=False, repr=False, compare=False)
    content_hash: bytes = field(init=False, repr=False, compare=False)
    kind: str = field(init=False, default="reversal")

    def __post_init__(self) -> None:
        check_key(self.key)
        check_key(self.entry_key, "entry_key")
        if self.chain is not None and not isinstance(self.chain, ChainRef):
            raise InvalidInput("chain must be a chain reference")
        meta = canonical_metadata(self.metadata)
        object.__setattr__(self, "metadata_json", meta)
        chain = self.chain.as_list() if self.chain else None
        object.__setattr__(self, "content_hash", _content_hash(["reverse", self.entry_key, meta, chain]))


Command = NewEntry | Resolve | Reverse

Status = Literal["created", "exists", "rejected"]


@dataclass(frozen=True, slots=True)
class EntryResult:
    """The outcome of one command: created, exists (an identical earlier booking) or rejected."""

    key: str
    status: Status
    entry_id: int | None = None
    code: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "status": self.status}
        if self.entry_id is not None:
            out["entry_id"] = self.entry_id
        if self.code is not None:
            out["code"] = self.code
            out["reason"] = self.reason
        return out
