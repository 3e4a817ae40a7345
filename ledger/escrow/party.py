"""Signed party requests: what a buyer or seller wallet asks for, as EIP-712 typed data.

Parties have no API key; each request carries the party's secp256k1 signature over EIP-712 typed
data bound to one chain and one escrow contract (the domain), so a signature is good for nothing
else. :func:`recover_signer` says who signed and refuses malformed signatures and requests outside
their validity window; :func:`use_nonce` spends the request's nonce in the caller's transaction,
so the same signed request is recognised as a retry and any other request under that nonce is a
replay.

Addresses are lower-case ``0x`` hex throughout, like every table of the ledger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final

import sqlalchemy as sa
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_utils.crypto import keccak

from ledger.custody import ZERO_ADDRESS, check_address
from ledger.errors import Conflict, InvalidInput
from ledger.escrow.attestation import DELIVERY_REF_MAX_CHARS
from ledger.escrow.service import MAX_ATTESTORS
from ledger.money import UINT256_LIMIT, check_amount

DOMAIN_NAME: Final = "TraceChain Settlement"
DOMAIN_VERSION: Final = "1"
# A signed request is accepted for at most this long ahead: a leaked signature cannot wait for years.
MAX_VALIDITY_S: Final = 7 * 86_400
KEY_MAX_CHARS: Final = 200
REASON_MAX_CHARS: Final = 1000
TARGET_MAX_CHARS: Final = 200
ACTION_MAX_CHARS: Final = 100
SIGNATURE_BYTES: Final = 65
FEE_BPS_MAX: Final = 10_000
UINT16_LIMIT: Final = 2**16
UINT64_LIMIT: Final = 2**64
# Order of the secp256k1 group: r and s lie in [1, n), and s in the lower half (EIP-2).
_SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_HASH = re.compile(r"^0x[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-fA-F]*$")

_DOMAIN_TYPE: Final = (
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
)


def _check_uint(value: object, limit: int, what: str, *, low: int = 0) -> int:
    """``value`` if it is an int in ``[low, limit)``, else InvalidInput naming the field.

    A bool is refused although Python counts it as an int: ``True`` must never pass for 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer")
    if not low <= value < limit:
        raise InvalidInput(f"{what} must be from {low} to {limit - 1}, got {value}")
    return value


def _check_chain_id(chain_id: object) -> int:
    return _check_uint(chain_id, UINT256_LIMIT, "chain_id", low=1)


def _check_hash(value: object, what: str) -> str:
    """A 32-byte value as ``0x`` and 64 lower-case hex digits."""
    if not isinstance(value, str) or not _HASH.fullmatch(value.lower()):
        raise InvalidInput(f"{what} must be 0x and 64 hex digits, got {value!r:.80}")
    return value.lower()


def domain(chain_id: int, contract: str) -> dict[str, Any]:
    """The EIP-712 domain of party requests to the escrow ``contract`` on chain ``chain_id``."""
    return {
        "name": DOMAIN_NAME,
        "version": DOMAIN_VERSION,
        "chainId": _check_chain_id(chain_id),
        "verifyingContract": check_address(contract),
    }


class _SignedRequest:
    """What both request types share: the EIP-712 message, its digest, a nonce and an expiry.

    A subclass names its struct (``PRIMARY_TYPE``), lists its EIP-712 fields in order
    (``FIELDS``) and gives their values (:meth:`_message`).
    """

    __slots__ = ()
    PRIMARY_TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    nonce: int
    expiry: int

    def _message(self) -> dict[str, Any]:
        raise NotImplementedError

    def _check_nonce_and_expiry(self) -> None:
        _check_uint(self.nonce, UINT256_LIMIT, "nonce")
        _check_uint(self.expiry, UINT64_LIMIT, "expiry", low=1)

    def typed_data(self, chain_id: int, contract: str) -> dict[str, Any]:
        """The full EIP-712 message (types including EIP712Domain, domain, primary type, message),
        as a wallet's ``eth_signTypedData_v4`` takes it."""
        return {
            "types": {
                "EIP712Domain": [dict(field) for field in _DOMAIN_TYPE],
                self.PRIMARY_TYPE: [{"name": name, "type": kind} for name, kind in self.FIELDS],
            },
            "primaryType": self.PRIMARY_TYPE,
            "domain": domain(chain_id, contract),
            "message": self._message(),
        }

    def signable(self, chain_id: int, contract: str) -> SignableMessage:
        """The EIP-191 version 1 message (domain separator and struct hash) that is signed."""
        return encode_typed_data(full_message=self.typed_data(chain_id, contract))

    def digest(self, chain_id: int, contract: str) -> str:
        """``keccak256(0x19 0x01 || domainSeparator || hashStruct(message))`` as 0x and 64 hex digits:
        the hash the party signs, and what a used nonce remembers."""
        message = self.signable(chain_id, contract)
        return "0x" + keccak(b"\x19" + bytes(message.version) + message.header + message.body).hex()


@dataclass(frozen=True, slots=True)
class CreateEscrowRequest(_SignedRequest):
    """A buyer's signed request to create an escrow paying ``seller``; the buyer is the signer.

    ``key`` is the buyer's idempotency key, ``deadline`` unix seconds. Validated when built:
    the ranges of the Solidity types, and what no escrow could ever accept (a fee above 100 %,
    no attestors, a threshold of 0 or above the number of attestors).
    """

    PRIMARY_TYPE: ClassVar[str] = "CreateEscrow"
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("key", "string"),
        ("seller", "address"),
        ("amount", "uint256"),
        ("feeBps", "uint16"),
        ("deadline", "uint64"),
        ("deliveryRef", "string"),
        ("attestors", "uint64[]"),
        ("threshold", "uint16"),
        ("autoRelease", "bool"),
        ("nonce", "uint256"),
        ("expiry", "uint64"),
    )

    key: str
    seller: str
    amount: int
    fee_bps: int
    deadline: int
    delivery_ref: str
    attestors: tuple[int, ...]
    threshold: int
    auto_release: bool
    nonce: int
    expiry: int

    def __post_init__(self) -> None:
        key = self.key
        if not isinstance(key, str) or not 1 <= len(key) <= KEY_MAX_CHARS or not key.isprintable():
            raise InvalidInput(f"key must be 1 to {KEY_MAX_CHARS} printable characters")
        seller = check_address(self.seller)
        if seller == ZERO_ADDRESS:
            raise InvalidInput("the seller must not be the zero address")
        object.__setattr__(self, "seller", seller)
        check_amount(self.amount)
        _check_uint(self.fee_bps, FEE_BPS_MAX + 1, "feeBps")
        _check_uint(self.deadline, UINT64_LIMIT, "deadline", low=1)
        ref = self.delivery_ref
        if not isinstance(ref, str) or not 1 <= len(ref) <= DELIVERY_REF_MAX_CHARS or not ref.isprintable():
            raise InvalidInput(f"deliveryRef must be 1 to {DELIVERY_REF_MAX_CHARS} printable characters")
        self._check_attestors()
        if not isinstance(self.auto_release, bool):
            raise InvalidInput("autoRelease must be true or false")
        self._check_nonce_and_expiry()

    def _check_attestors(self) -> None:
        ids = self.attestors
        if not isinstance(ids, tuple) or not 1 <= len(ids) <= MAX_ATTESTORS:
            raise InvalidInput(f"attestors must be a tuple of 1 to {MAX_ATTESTORS} attestor ids")
        for attestor in ids:
            _check_uint(attestor, UINT64_LIMIT, "an attestor id", low=1)
        if len(set(ids)) != len(ids):
            raise InvalidInput("attestor ids must be distinct")
        _check_uint(self.threshold, UINT16_LIMIT, "threshold", low=1)
        if self.threshold > len(ids):
            raise InvalidInput(f"threshold must be between 1 and the number of attestors ({len(ids)})")

    def _message(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "seller": self.seller,
            "amount": self.amount,
            "feeBps": self.fee_bps,
            "deadline": self.deadline,
            "deliveryRef": self.delivery_ref,
            "attestors": list(self.attestors),
            "threshold": self.threshold,
            "autoRelease": self.auto_release,
            "nonce": self.nonce,
            "expiry": self.expiry,
        }


@dataclass(frozen=True, slots=True)
class OpenDisputeRequest(_SignedRequest):
    """A party's signed request to open a dispute on escrow ``escrow_id`` (0x and 64 hex digits)."""

    PRIMARY_TYPE: ClassVar[str] = "OpenDispute"
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("escrowId", "bytes32"),
        ("reason", "string"),
        ("nonce", "uint256"),
        ("expiry", "uint64"),
    )

    escrow_id: str
    reason: str
    nonce: int
    expiry: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "escrow_id", _check_hash(self.escrow_id, "escrowId"))
        reason = self.reason
        if not isinstance(reason, str) or not reason.strip() or len(reason) > REASON_MAX_CHARS:
            raise InvalidInput(f"reason must be 1 to {REASON_MAX_CHARS} characters, not only spaces")
        # Line breaks and tabs are fine in a reason; other control characters are not.
        if not all(char.isprintable() or char in "\n\t" for char in reason):
            raise InvalidInput("reason must be printable text")
        self._check_nonce_and_expiry()

    def _message(self) -> dict[str, Any]:
        return {"escrowId": self.escrow_id, "reason": self.reason, "nonce": self.nonce, "expiry": self.expiry}


@dataclass(frozen=True, slots=True)
class ClaimRewardsRequest(_SignedRequest):
    """A staker's signed claim of the rewards of pool ``pool_id``, signed under the domain of the
    staking vault: ``amount`` base units (0: all that has accrued), paid out or, with
    ``compound``, staked into the staker's own position."""

    PRIMARY_TYPE: ClassVar[str] = "ClaimRewards"
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("poolId", "uint256"),
        ("amount", "uint256"),
        ("compound", "bool"),
        ("nonce", "uint256"),
        ("expiry", "uint64"),
    )

    pool_id: int
    amount: int
    compound: bool
    nonce: int
    expiry: int

    def __post_init__(self) -> None:
        _check_uint(self.pool_id, 2**63, "poolId", low=1)
        _check_uint(self.amount, UINT256_LIMIT, "amount")
        if not isinstance(self.compound, bool):
            raise InvalidInput("compound must be true or false")
        self._check_nonce_and_expiry()

    def _message(self) -> dict[str, Any]:
        return {
            "poolId": self.pool_id,
            "amount": self.amount,
            "compound": self.compound,
            "nonce": self.nonce,
            "expiry": self.expiry,
        }


PartyRequest = CreateEscrowRequest | OpenDisputeRequest | ClaimRewardsRequest


def _signature_bytes(signature: bytes | str) -> bytes:
    """The 65 bytes ``r || s || v`` of a signature given as bytes or hex (with or without 0x)."""
    if isinstance(signature, str):
        digits = signature[2:] if signature[:2] in ("0x", "0X") else signature
        if not _HEX.fullmatch(digits) or len(digits) % 2:
            raise InvalidInput("a signature must be hex digits")
        raw = bytes.fromhex(digits)
    elif isinstance(signature, bytes):
        raw = signature
    else:
        raise InvalidInput("a signature must be bytes or a hex string")
    if len(raw) != SIGNATURE_BYTES:
        raise InvalidInput(f"a signature must be {SIGNATURE_BYTES} bytes (r, s, v), got {len(raw)}")
    r = int.from_bytes(raw[:32], "big")
    s = int.from_bytes(raw[32:64], "big")
    if not (0 < r < _SECP256K1_N and 0 < s <= _SECP256K1_N // 2):
        raise InvalidInput("not a canonical signature: r and s must be in range, s in the lower half")
    if raw[64] not in (0, 1, 27, 28):
        raise InvalidInput(f"a signature's v must be 27 or 28 (or 0 or 1), got {raw[64]}")
    return raw


def _check_validity(request: PartyRequest, now: datetime) -> None:
    """Refuse a request whose expiry has passed or lies more than MAX_VALIDITY_S ahead of ``now``.

    Compared in unix seconds: an expiry near 2^64 is no date Python can represent.
    """
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise InvalidInput("now must be a timestamp with a time zone")
    now_s = now.timestamp()
    if request.expiry <= now_s:
        raise InvalidInput(f"the request expired at {request.expiry} (unix seconds), it is now {int(now_s)}")
    if request.expiry > now_s + MAX_VALIDITY_S:
        raise InvalidInput(
            f"the request's expiry {request.expiry} (unix seconds) is more than"
            f" {MAX_VALIDITY_S // 86_400} days after now ({int(now_s)})"
        )


def recover_signer(
    request: PartyRequest, signature: bytes | str, chain_id: int, contract: str, now: datetime
) -> str:
    """The lower-case address whose key signed ``request`` for this chain and contract.

    Raises InvalidInput on a malformed or non-canonical signature, one that recovers no key, or
    a request outside its validity window (expired, or expiring more than MAX_VALIDITY_S after
    ``now``). A signature by some other key recovers some other address: compare it with the
    party expected, as :func:`require_signer` does.
    """
    raw = _signature_bytes(signature)
    _check_validity(request, now)
    message = request.signable(chain_id, contract)
    try:
        signer = Account.recover_message(message, signature=raw)
    except (BadSignature, ValueError) as exc:
        raise InvalidInput("the signature does not recover a signer") from exc
    return check_address(signer)


def require_signer(
    request: PartyRequest,
    signature: bytes | str,
    chain_id: int,
    contract: str,
    expected: str,
    now: datetime,
) -> str:
    """:func:`recover_signer`, refusing the request unless ``expected`` signed it; returns the signer."""
    party = check_address(expected)
    signer = recover_signer(request, signature, chain_id, contract, now)
    if signer != party:
        raise InvalidInput(f"the request is not signed by {party}")
    return signer


def sign(request: PartyRequest, private_key: bytes | str, chain_id: int, contract: str) -> str:
    """The party's signature of ``request`` as 0x and 130 hex digits (r, s, v with v 27 or 28)."""
    signed = Account.sign_message(request.signable(chain_id, contract), private_key)
    return "0x" + bytes(signed.signature).hex()


def use_nonce(
    conn: sa.Connection, address: str, nonce: int, action: str, digest: str, target: str
) -> str | None:
    """Spend ``address``'s ``nonce`` on the request with ``digest``, in the caller's transaction.

    Returns None when the nonce was fresh (it is now used, remembering ``action``, ``digest`` and
    ``target``, what the request made). When the very same signed request (same digest) used it
    before, returns that use's ``target``: the caller answers the retry with the same result. Any
    other request under a used nonce is a replay: Conflict ``nonce_replayed``, nothing written.
    A concurrent transaction spending the same nonce makes this wait for it to end.
    """
    address = check_address(address)
    _check_uint(nonce, UINT256_LIMIT, "nonce")
    if not isinstance(action, str) or not 1 <= len(action) <= ACTION_MAX_CHARS:
        raise InvalidInput(f"action must be 1 to {ACTION_MAX_CHARS} characters")
    digest = _check_hash(digest, "digest")
    if not isinstance(target, str) or not 1 <= len(target) <= TARGET_MAX_CHARS:
        raise InvalidInput(f"target must be 1 to {TARGET_MAX_CHARS} characters")
    params = {"address": address, "nonce": str(nonce)}
    inserted = conn.execute(
        sa.text(
            "INSERT INTO party_nonces (address, nonce, action, digest, target)"
            " VALUES (:address, :nonce, :action, :digest, :target)"
            " ON CONFLICT (address, nonce) DO NOTHING RETURNING 1"
        ),
        {**params, "action": action, "digest": digest, "target": target},
    ).first()
    if inserted is not None:
        return None
    earlier = conn.execute(
        sa.text(
            "SELECT action, digest, target FROM party_nonces WHERE address = :address AND nonce = :nonce"
        ),
        params,
    ).one_or_none()
    if earlier is None:
        # The insert found a row in its way that this read does not see: nonces are never deleted.
        raise RuntimeError(f"nonce {nonce} of {address} conflicted but cannot be read back")
    if earlier.digest != digest:
        raise Conflict(
            "nonce_replayed",
            f"nonce {nonce} of {address} was already used by another signed request ({earlier.action})",
        )
    return str(earlier.target)
