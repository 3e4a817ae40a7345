"""The ledger as JSON Lines: one asset, account, entry or resolution per line.

Line types (unknown fields, wrong types and floats are refused)::

    {"type": "asset", "code": "TRACE", "scale": 18}
    {"type": "account", "code": "user:alice", "asset": "TRACE", "kind": "liability",
     "flags": ["debits_must_not_exceed_credits"], "metadata": {}}
    {"type": "entry", "key": "k-1", "kind": "transfer",
     "transfers": [{"debit": "treasury", "credit": "user:alice", "amount": "1000", "asset": "TRACE"}],
     "metadata": {}, "effective_at": "2026-01-01T00:00:00+00:00",
     "chain": {"chain_id": 1, "tx_hash": "0x…", "log_index": 0, "block_number": 7, "block_hash": "0x…"}}
    a hold: an entry whose only transfer has "pending": true (and optionally "timeout_s": 3600)
    {"type": "post", "key": "k-9", "pending_key": "k-8", "amount": "400"}   (amount optional)
    {"type": "void", "key": "k-10", "pending_key": "k-8"}
    {"type": "expire", "key": "k-12", "pending_key": "k-8"}   (only once the hold timed out)
    {"type": "reverse", "key": "k-11", "entry_key": "k-1"}
    {"type": "close", "code": "user:alice"}

Amounts are decimal strings of base units. :func:`export_lines` writes assets, accounts, then
entries in id order, then closes, so that importing an export into an empty database
reproduces every balance, every entry's effective time and chain reference (posted times are
those of the import). Two choices make that exact whatever the import's duration: a hold that
was already resolved is written without its timeout (otherwise it could time out again while
the import runs, before its post or void is read), and an expiry is written as a ``void``
under the same key (an expiry cannot be booked before the re-created hold times out; a void
moves the same amounts). An open hold keeps its timeout, counted from the import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal

import sqlalchemy as sa

from ledger import jsonsafe
from ledger.accounts import LIMIT_FLAGS, create_account, create_asset, get_account, set_closed
from ledger.audit import Actor
from ledger.commands import (
    ACCOUNT_FLAGS,
    ACCOUNT_KINDS,
    BATCH_MAX_COMMANDS,
    ChainRef,
    Command,
    Leg,
    NewEntry,
    Resolve,
    Reverse,
    canonical_metadata,
    check_account_code,
    check_asset_code,
    check_entry_kind,
    check_key,
)
from ledger.errors import InvalidInput, LedgerError
from ledger.money import parse_amount
from ledger.posting import Poster

LINE_MAX_BYTES = 1_048_576
IMPORT_BATCH_MAX = 2000
EXPORT_PAGE = 2000


@dataclass(frozen=True, slots=True)
class AssetLine:
    code: str
    scale: int


@dataclass(frozen=True, slots=True)
class AccountLine:
    code: str
    asset: str
    kind: str
    flags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CloseLine:
    code: str


Definition = AssetLine | AccountLine | CloseLine
ParsedLine = Definition | Command

# --- parsing ---------------------------------------------------------------------------------

_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # type: (required fields, optional fields)
    "asset": (frozenset({"code", "scale"}), frozenset()),
    "account": (frozenset({"code", "asset", "kind"}), frozenset({"flags", "metadata"})),
    "close": (frozenset({"code"}), frozenset()),
    "entry": (frozenset({"key", "transfers"}), frozenset({"kind", "metadata", "effective_at", "chain"})),
    "post": (frozenset({"key", "pending_key"}), frozenset({"amount", "metadata"})),
    "void": (frozenset({"key", "pending_key"}), frozenset({"metadata"})),
    "expire": (frozenset({"key", "pending_key"}), frozenset({"metadata"})),
    "reverse": (frozenset({"key", "entry_key"}), frozenset({"metadata", "chain"})),
}
_TRANSFER_FIELDS = (frozenset({"debit", "credit", "amount"}), frozenset({"asset", "pending", "timeout_s"}))
_CHAIN_FIELDS: tuple[frozenset[str], frozenset[str]] = (
    frozenset({"chain_id", "tx_hash", "log_index", "block_number", "block_hash"}),
    frozenset(),
)


def _refuse_float(text: str) -> Any:
    raise InvalidInput(
        f"floating-point number {text[:40]} is not accepted; amounts are strings of base units"
    )


def _refuse_constant(text: str) -> Any:
    raise InvalidInput(f"{text} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise InvalidInput(f"field {name!r} appears twice")
        out[name] = value
    return out


def _decode(text: str) -> dict[str, Any]:
    try:
        value = jsonsafe.loads(
            text,
            parse_float=_refuse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_no_duplicates,
        )
    except InvalidInput:
        raise
    except (RecursionError, jsonsafe.JsonTooDeep) as exc:
        raise InvalidInput("JSON nested too deeply") from exc
    except ValueError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f"a line must be a JSON object, got {type(value).__name__}")
    return value


def _fields(obj: Mapping[str, Any], spec: tuple[frozenset[str], frozenset[str]], what: str) -> None:
    required, optional = spec
    missing = sorted(required - obj.keys())
    if missing:
        raise InvalidInput(f"{what} is missing {', '.join(missing)}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise InvalidInput(f"{what} has unknown field(s) {', '.join(unknown)}")


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer")
    return value


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata", {})
    canonical_metadata(metadata)  # validates: an object, no floats, bounded size
    return dict(metadata)


def _timestamp(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"{what} is not an ISO 8601 timestamp: {value[:60]!r}") from exc
    if parsed.tzinfo is None:
        raise InvalidInput(f"{what} needs a time zone (e.g. 2026-01-01T00:00:00Z)")
    return parsed


def _leg(value: object, index: int) -> Leg:
    what = f"transfer {index}"
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be an object")
    _fields(value, _TRANSFER_FIELDS, what)
    asset = value.get("asset")
    if asset is not None:
        check_asset_code(asset)
    timeout = value.get("timeout_s")
    return Leg(
        debit=check_account_code(value["debit"]),
        credit=check_account_code(value["credit"]),
        amount=parse_amount(value["amount"], what=f"{what} amount"),
        asset=asset,
        pending=value.get("pending", False),
        timeout_s=None if timeout is None else _int(timeout, f"{what} timeout_s"),
    )


def _chain(value: object) -> ChainRef:
    if not isinstance(value, dict):
        raise InvalidInput("chain must be an object")
    _fields(value, _CHAIN_FIELDS, "chain")
    return ChainRef(
        chain_id=_int(value["chain_id"], "chain_id"),
        tx_hash=value["tx_hash"],
        log_index=_int(value["log_index"], "log_index"),
        block_number=_int(value["block_number"], "block_number"),
        block_hash=value["block_hash"],
    )


def _entry(obj: Mapping[str, Any]) -> NewEntry:
    transfers = obj["transfers"]
    if not isinstance(transfers, list) or not transfers:
        raise InvalidInput("transfers must be a non-empty list")
    if len(transfers) > 64:
        raise InvalidInput("an entry holds at most 64 transfers")
    effective = obj.get("effective_at")
    chain = obj.get("chain")
    return NewEntry(
        key=check_key(obj["key"]),
        legs=tuple(_leg(t, i) for i, t in enumerate(transfers)),
        kind=check_entry_kind(obj.get("kind", "transfer")),
        metadata=_metadata(obj),
        effective_at=None if effective is None else _timestamp(effective, "effective_at"),
        chain=None if chain is None else _chain(chain),
    )


def _account(obj: Mapping[str, Any]) -> AccountLine:
    kind = obj["kind"]
    if kind not in ACCOUNT_KINDS:
        raise InvalidInput(f"account kind must be one of {', '.join(ACCOUNT_KINDS)}")
    flags = obj.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise InvalidInput("flags must be a list of strings")
    unknown = sorted(set(flags) - set(ACCOUNT_FLAGS))
    if unknown:
        raise InvalidInput(f"unknown account flag(s): {', '.join(unknown)}")
    if all(f in flags for f in LIMIT_FLAGS):
        raise InvalidInput("an account takes at most one of the two limit flags")
    return AccountLine(
        code=check_account_code(obj["code"]),
        asset=check_asset_code(obj["asset"]),
        kind=kind,
        flags=tuple(sorted(set(flags))),
        metadata=_metadata(obj),
    )


def _asset(obj: Mapping[str, Any]) -> AssetLine:
    scale = _int(obj["scale"], "scale")
    if not 0 <= scale <= 36:
        raise InvalidInput("scale must be an integer from 0 to 36")
    return AssetLine(code=check_asset_code(obj["code"]), scale=scale)


def _resolve(obj: Mapping[str, Any], action: Literal["post", "void", "expire"]) -> Resolve:
    amount = obj.get("amount")
    return Resolve(
        key=check_key(obj["key"]),
        pending_key=check_key(obj["pending_key"], "pending_key"),
        action=action,
        amount=None if amount is None else parse_amount(amount),
        metadata=_metadata(obj),
    )


def parse_line(text: str) -> ParsedLine:
    """Parse one JSON line into a definition or a ledger command.

    Raises :class:`InvalidInput` with a reason a person can act on; nothing is looked up.
    """
    obj = _decode(text)
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise InvalidInput(f"type must be one of {', '.join(_FIELDS)}, got {kind!r:.40}")
    body = {k: v for k, v in obj.items() if k != "type"}
    _fields(body, _FIELDS[kind], f"{kind} line")
    if kind == "asset":
        return _asset(body)
    if kind == "account":
        return _account(body)
    if kind == "close":
        return CloseLine(check_account_code(body["code"]))
    if kind == "entry":
        return _entry(body)
    if kind == "reverse":
        chain = body.get("chain")
        return Reverse(
            key=check_key(body["key"]),
            entry_key=check_key(body["entry_key"], "entry_key"),
            metadata=_metadata(body),
            chain=None if chain is None else _chain(chain),
        )
    action: Literal["post", "void", "expire"] = (
        "post" if kind == "post" else "void" if kind == "void" else "expire"
    )
    return _resolve(body, action)


# --- importing -------------------------------------------------------------------------------


def read_lines(stream: BinaryIO, max_bytes: int = LINE_MAX_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line of ``stream``; None for a line longer than ``max_bytes``.

    Memory stays bounded whatever the input: an over-long line is skipped, not held.
    """
    number = 0
    while True:
        chunk = stream.readline(max_bytes + 1)
        if not chunk:
            return
        number += 1
        if len(chunk) > max_bytes and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):  # skip the rest of the line
                chunk = stream.readline(max_bytes + 1)
            yield number, None
            continue
        yield number, chunk


def _identity(item: ParsedLine) -> dict[str, Any]:
    if isinstance(item, AssetLine | AccountLine | CloseLine):
        return {"code": item.code}
    return {"key": item.key}


def _identity_of_text(text: str | None) -> dict[str, Any]:
    """Best-effort key or code of a line that did not parse, to help find it."""
    if text is None:
        return {}
    try:
        obj = jsonsafe.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(obj, dict):
        return {}
    return {
        name: obj[name]
        for name in ("key", "code")
        if isinstance(obj.get(name), str) and len(obj[name]) <= 256
    }


def _rejected(line: int, error: str, reason: str, ident: Mapping[str, Any]) -> dict[str, Any]:
    return {"line": line, "status": "rejected", **ident, "error": error, "reason": reason}


def apply_definition(conn: sa.Connection, item: Definition) -> Literal["created", "exists"]:
    """Create the asset or account, or close the account, inside the caller's transaction."""
    if isinstance(item, AssetLine):
        return create_asset(conn, item.code, item.scale)[1]
    if isinstance(item, AccountLine):
        return create_account(conn, item.code, item.asset, item.kind, item.flags, item.metadata)[1]
    if "closed" in get_account(conn, item.code).flags:
        return "exists"
    set_closed(conn, item.code, True)
    return "created"


class _Importer:
    """Groups consecutive lines of one sort into batches, keeping the file's order."""

    def __init__(self, engine: sa.Engine, batch_max: int, actor: Actor | None) -> None:
        self.engine = engine
        self.poster = Poster(engine)
        self.batch_max = batch_max
        self.actor = actor
        # (line, parsed item) or (line, a result decided while parsing)
        self.window: list[tuple[int, ParsedLine | dict[str, Any]]] = []
        self.sort: Literal["definitions", "commands"] | None = None

    def add(self, line: int, raw: bytes | None) -> Iterator[dict[str, Any]]:
        text: str | None = None
        try:
            if raw is None:
                raise InvalidInput(f"line is longer than {LINE_MAX_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"line is not UTF-8: {exc.reason} at byte {exc.start}") from exc
            if not text.strip():
                return  # blank lines carry nothing
            item = parse_line(text)
        except InvalidInput as exc:
            self.window.append((line, _rejected(line, exc.code, exc.message, _identity_of_text(text))))
            if self.sort is None or len(self.window) >= self.batch_max:
                yield from self.flush()
            return
        sort: Literal["definitions", "commands"] = (
            "definitions" if isinstance(item, AssetLine | AccountLine | CloseLine) else "commands"
        )
        if self.window and (
            (self.sort is not None and sort != self.sort) or len(self.window) >= self.batch_max
        ):
            yield from self.flush()
        self.sort = sort
        self.window.append((line, item))

    def flush(self) -> Iterator[dict[str, Any]]:
        window, self.window, sort, self.sort = self.window, [], self.sort, None
        if sort == "definitions":
            decided = self._define(window)
        elif sort == "commands":
            decided = self._post(window)
        else:
            decided = {}
        for line, item in window:
            yield item if isinstance(item, dict) else decided[line]

    def _define(self, window: list[tuple[int, ParsedLine | dict[str, Any]]]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        with self.engine.begin() as conn:
            for line, item in window:
                if not isinstance(item, AssetLine | AccountLine | CloseLine):
                    continue
                ident = _identity(item)
                try:
                    with conn.begin_nested():
                        status = apply_definition(conn, item)
                except LedgerError as exc:
                    out[line] = _rejected(line, exc.code, exc.message, ident)
                except (sa.exc.IntegrityError, sa.exc.DataError) as exc:
                    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "refused"
                    out[line] = _rejected(line, "refused_by_database", reason, ident)
                else:
                    out[line] = {"line": line, "status": status, **ident}
        return out

    def _post(self, window: list[tuple[int, ParsedLine | dict[str, Any]]]) -> dict[int, dict[str, Any]]:
        lines: list[int] = []
        commands: list[Command] = []
        for line, item in window:
            if isinstance(item, NewEntry | Resolve | Reverse):
                lines.append(line)
                commands.append(item)
        actors = None if self.actor is None else [self.actor] * len(commands)
        results = self.poster.post(commands, actors)
        out: dict[int, dict[str, Any]] = {}
        for line, result in zip(lines, results, strict=True):
            if result.status == "rejected":
                out[line] = _rejected(
                    line, result.code or "rejected", result.reason or "", {"key": result.key}
                )
            else:
                out[line] = {"line": line, "status": result.status, "key": result.key}
                if result.entry_id is not None:
                    out[line]["entry_id"] = result.entry_id
        return out


def import_lines(
    engine: sa.Engine,
    lines: Iterable[tuple[int, bytes | None]],
    *,
    batch_max: int = IMPORT_BATCH_MAX,
    actor: Actor | None = None,
) -> Iterator[dict[str, Any]]:
    """Book JSON lines; yields one result per non-blank line, in file order.

    A result is ``{"line", "status": "created"|"exists"|"rejected", "key"|"code", ...}`` with
    ``error`` (a stable code) and ``reason`` when rejected. A rejected line writes nothing and
    the others go on. Consecutive entry lines are booked as engine batches of up to
    ``batch_max`` (capped at the engine's limit; one transaction each); asset, account and
    close lines between them end a batch, so every line sees the effect of the lines before it.
    """
    if batch_max < 1:
        raise ValueError("batch_max must be positive")
    importer = _Importer(engine, min(batch_max, BATCH_MAX_COMMANDS), actor)
    for number, raw in lines:
        yield from importer.add(number, raw)
    yield from importer.flush()


# --- exporting -------------------------------------------------------------------------------


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _without_empty(line: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if v not in (None, {}, [])}


def _definitions(conn: sa.Connection) -> Iterator[dict[str, Any]]:
    for code, scale in conn.execute(sa.text("SELECT code, scale FROM ledger_assets ORDER BY id")):
        yield {"type": "asset", "code": code, "scale": scale}
    after = 0
    while True:
        rows = conn.execute(
            sa.text(
                "SELECT a.id, a.code, s.code, a.kind, a.debits_must_not_exceed_credits,"
                " a.credits_must_not_exceed_debits, a.metadata FROM ledger_accounts a"
                " JOIN ledger_assets s ON s.id = a.asset_id WHERE a.id > :after ORDER BY a.id LIMIT :n"
            ),
            {"after": after, "n": EXPORT_PAGE},
        ).all()
        if not rows:
            return
        for _id, code, asset, kind, dmnec, cmned, metadata in rows:
            flags = [name for name, on in zip(LIMIT_FLAGS, (dmnec, cmned), strict=True) if on]
            yield _without_empty(
                {
                    "type": "account",
                    "code": code,
                    "asset": asset,
                    "kind": kind,
                    "flags": flags,
                    "metadata": _json_object(metadata),
                }
            )
        after = rows[-1][0]


def _json_object(value: Any) -> dict[str, Any]:
    out = value if isinstance(value, dict) else json.loads(value)
    if not isinstance(out, dict):
        raise TypeError("metadata column does not hold an object")
    return out


_ENTRY_PAGE_SQL = """
SELECT e.id, e.idempotency_key, e.kind, e.metadata, e.effective_at, r.idempotency_key,
       e.chain_id, e.tx_hash, e.log_index, e.block_number, e.block_hash
  FROM ledger_entries e LEFT JOIN ledger_entries r ON r.id = e.reverses_entry_id
 WHERE e.id > :after ORDER BY e.id LIMIT :n
"""

_TRANSFERS_SQL = """
SELECT t.entry_id, t.kind, d.code, c.code, s.code, t.amount::text, t.timeout_at, t.posted_at,
       p.amount::text, pe.idempotency_key,
       t.kind = 'pending' AND EXISTS (SELECT 1 FROM ledger_transfers x WHERE x.pending_id = t.id)
  FROM ledger_transfers t
  JOIN ledger_accounts d ON d.id = t.debit_account_id
  JOIN ledger_accounts c ON c.id = t.credit_account_id
  JOIN ledger_assets s ON s.id = t.asset_id
  LEFT JOIN ledger_transfers p ON p.id = t.pending_id
  LEFT JOIN ledger_entries pe ON pe.id = p.entry_id
 WHERE t.entry_id = ANY(:ids) ORDER BY t.id
"""


def _entry_line(entry: Any, transfers: list[Any]) -> dict[str, Any]:
    _id, key, kind, metadata, effective_at, reverses_key, chain_id, tx, log_index, block, block_hash = entry
    meta = _json_object(metadata)
    chain = None
    if chain_id is not None:
        chain = {
            "chain_id": chain_id,
            "tx_hash": tx,
            "log_index": log_index,
            "block_number": block,
            "block_hash": block_hash,
        }
    if reverses_key is not None:
        return _without_empty(
            {"type": "reverse", "key": key, "entry_key": reverses_key, "metadata": meta, "chain": chain}
        )
    first = transfers[0]
    if first[1] in ("post_pending", "void_pending", "expire"):
        line: dict[str, Any] = {
            "type": "post" if first[1] == "post_pending" else "void",
            "key": key,
            "pending_key": first[9],
        }
        if first[1] == "post_pending" and int(first[5]) < int(first[8]):
            line["amount"] = first[5]  # a partial post; a full one names no amount
        line["metadata"] = meta
        return _without_empty(line)
    legs = []
    for _eid, t_kind, debit, credit, asset, amount, timeout_at, posted_at, _held, _pk, resolved in transfers:
        leg: dict[str, Any] = {"debit": debit, "credit": credit, "amount": amount, "asset": asset}
        if t_kind == "pending":
            leg["pending"] = True
            if timeout_at is not None and not resolved:
                leg["timeout_s"] = round((timeout_at - posted_at).total_seconds())
        legs.append(leg)
    return _without_empty(
        {
            "type": "entry",
            "key": key,
            "kind": kind,
            "transfers": legs,
            "metadata": meta,
            "effective_at": _utc(effective_at),
            "chain": chain,
        }
    )


def export_lines(conn: sa.Connection) -> Iterator[dict[str, Any]]:
    """The whole ledger as import lines: assets, accounts, entries by id, then closes.

    Run it inside one REPEATABLE READ transaction for a consistent snapshot of a busy ledger.
    Reads in pages, so memory stays bounded whatever the ledger's size.
    """
    yield from _definitions(conn)
    after = 0
    while True:
        entries = conn.execute(sa.text(_ENTRY_PAGE_SQL), {"after": after, "n": EXPORT_PAGE}).all()
        if not entries:
            break
        by_entry: dict[int, list[Any]] = {}
        for row in conn.execute(sa.text(_TRANSFERS_SQL), {"ids": [e[0] for e in entries]}):
            by_entry.setdefault(row[0], []).append(row)
        for entry in entries:
            transfers = by_entry.get(entry[0])
            if not transfers:
                raise RuntimeError(f"entry {entry[1]!r} has no transfers")
            yield _entry_line(entry, transfers)
        after = entries[-1][0]
    for (code,) in conn.execute(sa.text("SELECT code FROM ledger_accounts WHERE closed ORDER BY id")):
        yield {"type": "close", "code": code}
