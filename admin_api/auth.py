"""Staff API keys and the role check of every protected route.

A key reads ``tc_<prefix>_<secret>``: the 8-hex prefix finds the row, the secret (32 random
bytes) is stored only as its SHA-256. A secret that random needs no slow hash, and the
digests are compared in constant time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import flask
import sqlalchemy as sa
import structlog
from flask_smorest import Blueprint as SmorestBlueprint

from admin_api.errors import Problem, current_request_id
from admin_api.resources import ledger_state
from ledger import audit
from ledger.audit import Actor, AuditRecord
from ledger.errors import InvalidInput

ROLES = ("admin", "finance", "auditor", "operator")
READ_ROLES = ROLES
MANAGE_ROLES = ("admin", "finance")
POSTING_ROLES = ("admin", "finance", "operator")
AUDIT_ROLES = ("admin", "auditor")

SECURITY_SCHEME = "bearerAuth"
LABEL_MAX_CHARS = 200
_KEY = re.compile(r"^tc_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_PREFIX = re.compile(r"^[0-9a-f]{8}$")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tracechain"'}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class ApiKey:
    prefix: str
    role: str
    label: str
    created_at: datetime
    revoked_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "role": self.role,
            "label": self.label,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def create_api_key(conn: sa.Connection, role: str, label: str = "", *, actor: Actor | None = None) -> str:
    """Store a new key for ``role`` and return it in plain text (the only time it is seen).

    With ``actor`` the creation is audited in the same transaction.
    """
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    if not isinstance(label, str) or len(label) > LABEL_MAX_CHARS or not label.isprintable():
        raise InvalidInput(f"label must be at most {LABEL_MAX_CHARS} printable characters")
    secret = secrets.token_urlsafe(32)
    for _ in range(16):  # 2^32 prefixes: a collision is rare, sixteen in a row is impossible
        prefix = secrets.token_hex(4)
        row = conn.execute(
            sa.text(
                "INSERT INTO api_keys (prefix, secret_hash, role, label) VALUES (:p, :h, :r, :l)"
                " ON CONFLICT (prefix) DO NOTHING RETURNING id"
            ),
            {"p": prefix, "h": _digest(secret), "r": role, "l": label},
        ).first()
        if row is not None:
            if actor is not None:
                audit.record(
                    conn,
                    [
                        AuditRecord(
                            actor, "api_key.create", f"api_key:{prefix}", None, {"role": role, "label": label}
                        )
                    ],
                )
            return f"tc_{prefix}_{secret}"
    raise RuntimeError("could not draw an unused API key prefix")


def key_prefix(key_or_prefix: str) -> str:
    """The prefix of a full key, or the prefix itself."""
    match = _KEY.fullmatch(key_or_prefix)
    if match:
        return match.group(1)
    if _PREFIX.fullmatch(key_or_prefix):
        return key_or_prefix
    raise InvalidInput("not an API key or key prefix")


def revoke_api_key(conn: sa.Connection, key_or_prefix: str, *, actor: Actor | None = None) -> bool:
    """Revoke a key (by prefix or full key); False when there is no such unrevoked key."""
    prefix = key_prefix(key_or_prefix)
    row = conn.execute(
        sa.text(
            "UPDATE api_keys SET revoked_at = now() WHERE prefix = :p AND revoked_at IS NULL RETURNING role"
        ),
        {"p": prefix},
    ).first()
    if row is None:
        return False
    if actor is not None:
        audit.record(
            conn, [AuditRecord(actor, "api_key.revoke", f"api_key:{prefix}", {"role": row[0]}, None)]
        )
    return True


def list_api_keys(conn: sa.Connection) -> list[ApiKey]:
    rows = conn.execute(
        sa.text("SELECT prefix, role, label, created_at, revoked_at FROM api_keys ORDER BY created_at, id")
    )
    return [ApiKey(*r) for r in rows]


def authenticate(conn: sa.Connection, authorization: str | None) -> tuple[str, str]:
    """(prefix, role) of the key in an ``Authorization: Bearer`` header; Problem 401 otherwise."""
    if not authorization:
        raise Problem(
            401,
            "unauthenticated",
            "an API key is required (Authorization: Bearer tc_...)",
            headers=_CHALLENGE,
        )
    scheme, _, token = authorization.strip().partition(" ")
    match = _KEY.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
    if match is None:
        raise Problem(
            401,
            "unauthenticated",
            "the Authorization header does not hold a bearer API key",
            headers=_CHALLENGE,
        )
    prefix, secret = match.groups()
    row = conn.execute(
        sa.text("SELECT secret_hash, role, revoked_at FROM api_keys WHERE prefix = :p"), {"p": prefix}
    ).first()
    if row is None or not hmac.compare_digest(bytes(row[0]), _digest(secret)):
        raise Problem(401, "unauthenticated", "unknown API key", headers=_CHALLENGE)
    if row[2] is not None:
        raise Problem(401, "unauthenticated", "this API key was revoked", headers=_CHALLENGE)
    return prefix, str(row[1])


def current_actor() -> Actor:
    """The staff member behind the current request (set by :func:`require_roles`)."""
    actor = flask.g.get("actor")
    if not isinstance(actor, Actor):
        raise RuntimeError("current_actor() outside a route protected by require_roles")
    return actor


def require_roles(*roles: str) -> Callable[[F], F]:
    """Let only keys of ``roles`` through: 401 without a valid key, 403 for another role.

    Runs before the body and parameters are parsed, so a caller without the right gets 401/403
    whatever they sent. The route's OpenAPI operation is marked with its security and roles.
    """
    unknown = set(roles) - set(ROLES)
    if not roles or unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with ledger_state().engine.connect() as conn:
                prefix, role = authenticate(conn, flask.request.headers.get("Authorization"))
            actor = Actor(f"apikey:{prefix}", role, current_request_id(), flask.request.remote_addr or "")
            flask.g.actor = actor
            structlog.contextvars.bind_contextvars(actor=actor.actor, role=role)
            if role not in roles:
                raise Problem(403, "forbidden", f"role {role!r} may not do this; needs {' or '.join(roles)}")
            return func(*args, **kwargs)

        documented: F = SmorestBlueprint.doc(
            security=[{SECURITY_SCHEME: []}],
            responses={"401": "UNAUTHORIZED", "403": "FORBIDDEN"},
            **{"x-roles": list(roles)},
        )(wrapper)
        return documented

    return decorator
