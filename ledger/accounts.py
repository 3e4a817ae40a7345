"""Assets and accounts: creation (idempotent by definition), closing, reading balances."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from psycopg import errors as pg_errors
from sqlalchemy.exc import IntegrityError

from ledger.commands import (
    ACCOUNT_KINDS,
    DEBIT_NORMAL_KINDS,
    canonical_metadata,
    check_account_code,
    check_asset_code,
)
from ledger.errors import Conflict, InvalidInput, NotFound

Created = Literal["created", "exists"]
LIMIT_FLAGS = ("debits_must_not_exceed_credits", "credits_must_not_exceed_debits")


@dataclass(frozen=True, slots=True)
class Asset:
    id: int
    code: str
    scale: int

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "scale": self.scale}


@dataclass(frozen=True, slots=True)
class Account:
    """An account and its four balance totals (base units)."""

    id: int
    code: str
    asset: str
    kind: str
    flags: tuple[str, ...]
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    metadata: Mapping[str, Any]

    @property
    def balance(self) -> int:
        """Posted balance on the account's normal side (debit for asset/expense accounts)."""
        return normal_balance(self.kind, self.debits_posted, self.credits_posted)

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "asset": self.asset,
            "kind": self.kind,
            "flags": list(self.flags),
            "balance": str(self.balance),
            "debits_posted": str(self.debits_posted),
            "credits_posted": str(self.credits_posted),
            "debits_pending": str(self.debits_pending),
            "credits_pending": str(self.credits_pending),
            "metadata": dict(self.metadata),
        }


def normal_balance(kind: str, debits: int, credits: int) -> int:
    """The balance on the normal side of an account of ``kind`` (may be negative)."""
    return debits - credits if kind in DEBIT_NORMAL_KINDS else credits - debits


def create_asset(conn: sa.Connection, code: str, scale: int) -> tuple[Asset, Created]:
    """Create an asset; the same definition again reports ``exists``, a different scale conflicts."""
    check_asset_code(code)
    if isinstance(scale, bool) or not isinstance(scale, int) or not 0 <= scale <= 36:
        raise InvalidInput("scale must be an integer from 0 to 36")
    row = conn.execute(
        sa.text(
            "INSERT INTO ledger_assets (code, scale) VALUES (:code, :scale)"
            " ON CONFLICT (code) DO NOTHING RETURNING id"
        ),
        {"code": code, "scale": scale},
    ).first()
    if row is not None:
        return Asset(row[0], code, scale), "created"
    existing = get_asset(conn, code)
    if existing.scale != scale:
        raise Conflict("asset_conflict", f"asset {code} exists with scale {existing.scale}")
    return existing, "exists"


def get_asset(conn: sa.Connection, code: str) -> Asset:
    row = conn.execute(
        sa.text("SELECT id, code, scale FROM ledger_assets WHERE code = :code"), {"code": code}
    ).first()
    if row is None:
        raise NotFound("unknown_asset", f"asset {code!r} does not exist")
    return Asset(row[0], row[1], row[2])


def list_assets(conn: sa.Connection) -> list[Asset]:
    rows = conn.execute(sa.text("SELECT id, code, scale FROM ledger_assets ORDER BY code"))
    return [Asset(r[0], r[1], r[2]) for r in rows]


def _check_flags(flags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(flags, str):
        raise InvalidInput("flags must be a list")
    out = tuple(sorted(set(flags)))
    unknown = [f for f in out if f not in (*LIMIT_FLAGS, "closed")]
    if unknown:
        raise InvalidInput(f"unknown account flag(s): {', '.join(map(str, unknown))}")
    if all(f in out for f in LIMIT_FLAGS):
        raise InvalidInput("an account takes at most one of the two limit flags")
    return out


def create_account(
    conn: sa.Connection,
    code: str,
    asset: str,
    kind: str,
    flags: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Account, Created]:
    """Create an account; the same definition again reports ``exists``, a different one conflicts."""
    check_account_code(code)
    check_asset_code(asset)
    if kind not in ACCOUNT_KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(ACCOUNT_KINDS)}")
    wanted = _check_flags(flags)
    meta = canonical_metadata(metadata or {})
    asset_row = get_asset(conn, asset)
    row = conn.execute(
        sa.text(
            "INSERT INTO ledger_accounts (code, asset_id, kind, debits_must_not_exceed_credits,"
            " credits_must_not_exceed_debits, closed, metadata)"
            " VALUES (:code, :asset_id, :kind, :dmnec, :cmned, :closed, CAST(:meta AS jsonb))"
            " ON CONFLICT (code) DO NOTHING RETURNING id"
        ),
        {
            "code": code,
            "asset_id": asset_row.id,
            "kind": kind,
            "dmnec": "debits_must_not_exceed_credits" in wanted,
            "cmned": "credits_must_not_exceed_debits" in wanted,
            "closed": "closed" in wanted,
            "meta": meta,
        },
    ).first()
    if row is not None:
        return get_account(conn, code), "created"
    existing = get_account(conn, code)
    same = (
        existing.asset == asset
        and existing.kind == kind
        and set(existing.flags) - {"closed"} == set(wanted) - {"closed"}
    )
    if not same:
        raise Conflict("account_conflict", f"account {code!r} exists with a different definition")
    return existing, "exists"


_ACCOUNT_SELECT = (
    "SELECT a.id, a.code, s.code, a.kind, a.debits_must_not_exceed_credits,"
    " a.credits_must_not_exceed_debits, a.closed, a.debits_posted, a.credits_posted,"
    " a.debits_pending, a.credits_pending, a.metadata"
    " FROM ledger_accounts a JOIN ledger_assets s ON s.id = a.asset_id"
)


def _account_from_row(r: Any) -> Account:
    flags = tuple(
        name
        for name, on in zip(
            ("closed", "credits_must_not_exceed_debits", "debits_must_not_exceed_credits"),
            (r[6], r[5], r[4]),
            strict=True,
        )
        if on
    )
    return Account(
        r[0],
        r[1],
        r[2],
        r[3],
        tuple(sorted(flags)),
        int(r[7]),
        int(r[8]),
        int(r[9]),
        int(r[10]),
        r[11] if isinstance(r[11], dict) else json.loads(r[11]),
    )


def get_account(conn: sa.Connection, code: str) -> Account:
    row = conn.execute(sa.text(_ACCOUNT_SELECT + " WHERE a.code = :code"), {"code": code}).first()
    if row is None:
        raise NotFound("unknown_account", f"account {code!r} does not exist")
    return _account_from_row(row)


def list_accounts(
    conn: sa.Connection,
    *,
    after_code: str | None = None,
    asset: str | None = None,
    prefix: str | None = None,
    limit: int = 100,
) -> list[Account]:
    """Accounts ordered by code, keyset-paginated after ``after_code``."""
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000")
    where = ["true"]
    params: dict[str, Any] = {"limit": limit}
    if after_code is not None:
        where.append("a.code > :after")
        params["after"] = after_code
    if asset is not None:
        where.append("s.code = :asset")
        params["asset"] = asset
    if prefix is not None:
        where.append("starts_with(a.code, :prefix)")
        params["prefix"] = prefix
    rows = conn.execute(
        sa.text(_ACCOUNT_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY a.code LIMIT :limit"),
        params,
    )
    return [_account_from_row(r) for r in rows]


def set_closed(conn: sa.Connection, code: str, closed: bool) -> Account:
    """Close (or reopen) an account. An account with open holds cannot be closed."""
    before = get_account(conn, code)
    if closed and (before.debits_pending or before.credits_pending):
        raise Conflict("open_holds", f"account {code!r} has open holds; post or void them first")
    try:
        with conn.begin_nested():
            conn.execute(
                sa.text("UPDATE ledger_accounts SET closed = :closed WHERE code = :code"),
                {"closed": closed, "code": code},
            )
    except IntegrityError as exc:
        if isinstance(exc.orig, pg_errors.CheckViolation):
            raise Conflict("open_holds", f"account {code!r} has open holds") from exc
        raise
    return get_account(conn, code)
