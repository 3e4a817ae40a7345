"""Delivery attestations: BLS12-381 signatures (proof-of-possession scheme) over one fixed message.

An attestor registers a compressed G1 public key with its proof of possession; the proof is what
stops a rogue-key attack on the aggregate, so it is always checked with py-ecc, the reference.
Attestors then sign :func:`delivery_message` for an escrow; once the escrow's threshold of distinct
keys has signed, :func:`release_proof` aggregates the signatures and checks the aggregate with
FastAggregateVerify. Which attestors are registered, revoked or part of an escrow's policy is the
caller's business (the database); this module only sees the keys it is handed.

Three :class:`Verifier` implementations compute the same functions: :class:`PyEccVerifier` (the
reference, about 0.4 s per pairing), :class:`MilagroVerifier` (Rust, about 100x faster) and
:class:`BlstVerifier` (Chia's blspy on the blst library, about three times faster again) for the
hot path. All refuse malformed input the same way: ``False`` from the checks,
:class:`~ledger.errors.InvalidInput` from :meth:`Verifier.aggregate`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import milagro_bls_binding as milagro
from blspy import G1Element, G2Element, PopSchemeMPL
from eth_typing import BLSPubkey, BLSSignature
from eth_utils.exceptions import ValidationError
from py_ecc.bls.ciphersuites import G2ProofOfPossession as PyEccPop
from py_ecc.optimized_bls12_381.optimized_curve import curve_order

from ledger.custody import check_address
from ledger.errors import InvalidInput
from ledger.money import UINT256_LIMIT, check_amount

DELIVERY_DOMAIN: Final = b"TRACECHAIN/ESCROW-DELIVERY/v1"
PUBKEY_BYTES: Final = 48
SIGNATURE_BYTES: Final = 96
# prefix || chain id || contract || escrow id || sha256(delivery ref) || amount
MESSAGE_BYTES: Final = len(DELIVERY_DOMAIN) + 32 + 20 + 32 + 32 + 32
DELIVERY_REF_MAX_CHARS: Final = 256
# A bound on the pairing work one call may ask for; policies are far smaller.
MAX_ATTESTATIONS: Final = 256
# KeyGen needs at least 32 bytes of keying material (IETF BLS draft, section 2.3).
SEED_MIN_BYTES: Final = 32

_ESCROW_ID = re.compile(r"^0x[0-9a-f]{64}$")


def delivery_message(
    chain_id: int, escrow_contract: str, escrow_id: str, delivery_ref: str, amount: int
) -> bytes:
    """The bytes every attestor of an escrow signs to confirm its delivery.

    ``DELIVERY_DOMAIN || chain_id (32 bytes) || escrow_contract (20 bytes) || escrow_id (32 bytes)
    || sha256(delivery_ref in UTF-8) || amount (32 bytes)``, integers big-endian. Every field has
    a fixed width, so two different inputs never give the same message, and the prefix keeps a
    signature over it from being valid for any other purpose. Raises InvalidInput on a
    non-positive chain id, a malformed address or escrow id (0x and 64 hex digits), a delivery
    reference that is not 1 to 256 printable characters, or an amount outside (0, 2^256).
    """
    if isinstance(chain_id, bool) or not isinstance(chain_id, int) or not 0 < chain_id < UINT256_LIMIT:
        raise InvalidInput("chain_id must be a positive integer below 2^256")
    contract = check_address(escrow_contract)
    if not isinstance(escrow_id, str) or not _ESCROW_ID.fullmatch(escrow_id.lower()):
        raise InvalidInput(f"escrow_id must be 0x and 64 hex digits, got {escrow_id!r:.80}")
    if not isinstance(delivery_ref, str) or not 1 <= len(delivery_ref) <= DELIVERY_REF_MAX_CHARS:
        raise InvalidInput(f"delivery_ref must be 1 to {DELIVERY_REF_MAX_CHARS} characters")
    if not delivery_ref.isprintable():
        raise InvalidInput("delivery_ref must be printable text")
    check_amount(amount)
    message = b"".join(
        (
            DELIVERY_DOMAIN,
            chain_id.to_bytes(32, "big"),
            bytes.fromhex(contract[2:]),
            bytes.fromhex(escrow_id[2:]),
            hashlib.sha256(delivery_ref.encode("utf-8")).digest(),
            amount.to_bytes(32, "big"),
        )
    )
    if len(message) != MESSAGE_BYTES:
        raise RuntimeError(f"a delivery message must be {MESSAGE_BYTES} bytes, built {len(message)}")
    return message


def check_public_key(pubkey: bytes, proof_of_possession: bytes) -> None:
    """Accept an attestor's key for registration, or raise InvalidInput.

    The key must be a 48-byte compressed G1 point of the prime-order subgroup, not the point at
    infinity (KeyValidate), and ``proof_of_possession`` must be its owner's signature over the key
    itself (PopVerify). Always checked with py-ecc: registration is rare and this is the check
    that makes aggregation safe.
    """
    if not isinstance(pubkey, bytes) or len(pubkey) != PUBKEY_BYTES:
        raise InvalidInput(f"a public key must be {PUBKEY_BYTES} bytes (compressed G1)")
    if not isinstance(proof_of_possession, bytes) or len(proof_of_possession) != SIGNATURE_BYTES:
        raise InvalidInput(f"a proof of possession must be {SIGNATURE_BYTES} bytes (compressed G2)")
    if not PyEccPop.KeyValidate(BLSPubkey(pubkey)):
        raise InvalidInput("not a valid public key: not a subgroup point of G1, or the point at infinity")
    if not PyEccPop.PopVerify(BLSPubkey(pubkey), BLSSignature(proof_of_possession)):
        raise InvalidInput("the proof of possession does not verify for this public key")


class Verifier(Protocol):
    """BLS12-381 signature checks of the proof-of-possession ciphersuite."""

    name: str

    def verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is ``pubkey``'s signature of ``message``; False on malformed bytes."""
        ...

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        """The sum of ``signatures``; InvalidInput if there are none or one is not a G2 point."""
        ...

    def fast_aggregate_verify(self, pubkeys: Sequence[bytes], message: bytes, aggregate: bytes) -> bool:
        """Whether ``aggregate`` sums signatures of ``message`` by exactly ``pubkeys``."""
        ...


def _is_pubkey(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == PUBKEY_BYTES


def _is_signature(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == SIGNATURE_BYTES


class _CheckedVerifier:
    """Shape checks and error mapping shared by both libraries, so that they refuse the same inputs
    in the same way; subclasses supply the three raw calls and the errors their library raises."""

    name: str = ""
    library_errors: tuple[type[Exception], ...] = ()

    def verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is ``pubkey``'s signature of ``message``; False on malformed bytes."""
        if not (_is_pubkey(pubkey) and isinstance(message, bytes) and _is_signature(signature)):
            return False
        try:
            return self._verify(pubkey, message, signature) is True
        except self.library_errors:
            return False

    def aggregate(self, signatures: Sequence[bytes]) -> bytes:
        """The sum of ``signatures``; InvalidInput if there are none or one is not a G2 point.

        Subgroup membership is left to the verification of the individual signatures or of the
        aggregate, as both libraries do.
        """
        if isinstance(signatures, bytes | str) or not 1 <= len(signatures) <= MAX_ATTESTATIONS:
            raise InvalidInput(f"aggregate takes 1 to {MAX_ATTESTATIONS} signatures")
        if not all(_is_signature(s) for s in signatures):
            raise InvalidInput(f"a signature must be {SIGNATURE_BYTES} bytes (compressed G2)")
        try:
            aggregate = self._aggregate(list(signatures))
        except self.library_errors:
            # The library's own wording differs between libraries; the refusal must not.
            raise InvalidInput("a signature is not a point of G2") from None
        if not _is_signature(aggregate):
            raise RuntimeError(f"{self.name} returned an aggregate that is not {SIGNATURE_BYTES} bytes")
        return aggregate

    def fast_aggregate_verify(self, pubkeys: Sequence[bytes], message: bytes, aggregate: bytes) -> bool:
        """Whether ``aggregate`` sums signatures of ``message`` by exactly ``pubkeys``; False on
        malformed bytes, no keys or more than MAX_ATTESTATIONS keys."""
        if isinstance(pubkeys, bytes | str) or not 1 <= len(pubkeys) <= MAX_ATTESTATIONS:
            return False
        if not (
            all(_is_pubkey(k) for k in pubkeys) and isinstance(message, bytes) and _is_signature(aggregate)
        ):
            return False
        try:
            return self._fast_aggregate_verify(list(pubkeys), message, aggregate) is True
        except self.library_errors:
            return False

    def _verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        raise NotImplementedError

    def _aggregate(self, signatures: list[bytes]) -> bytes:
        raise NotImplementedError

    def _fast_aggregate_verify(self, pubkeys: list[bytes], message: bytes, aggregate: bytes) -> bool:
        raise NotImplementedError


class PyEccVerifier(_CheckedVerifier):
    """The reference: py-ecc's G2ProofOfPossession, pure Python."""

    name = "py_ecc"
    library_errors = (ValidationError, ValueError, AssertionError, TypeError)

    def _verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        return PyEccPop.Verify(BLSPubkey(pubkey), message, BLSSignature(signature))

    def _aggregate(self, signatures: list[bytes]) -> bytes:
        return PyEccPop.Aggregate([BLSSignature(s) for s in signatures])

    def _fast_aggregate_verify(self, pubkeys: list[bytes], message: bytes, aggregate: bytes) -> bool:
        return PyEccPop.FastAggregateVerify([BLSPubkey(k) for k in pubkeys], message, BLSSignature(aggregate))


class MilagroVerifier(_CheckedVerifier):
    """milagro-bls-binding (Rust), same ciphersuite and domain tag as py-ecc's; for the hot path."""

    name = "milagro"
    library_errors = (ValueError, TypeError)

    def _verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        return bool(milagro.Verify(pubkey, message, signature))

    def _aggregate(self, signatures: list[bytes]) -> bytes:
        return bytes(milagro.Aggregate(signatures))

    def _fast_aggregate_verify(self, pubkeys: list[bytes], message: bytes, aggregate: bytes) -> bool:
        return bool(milagro.FastAggregateVerify(pubkeys, message, aggregate))


class BlstVerifier(_CheckedVerifier):
    """blspy's PopSchemeMPL (Chia's bindings of the blst library): the same ciphersuite and
    domain tag as py-ecc's, the fastest of the three."""

    name = "blst"
    library_errors = (ValueError, TypeError, RuntimeError)

    @staticmethod
    def _key(pubkey: bytes) -> G1Element:
        # KeyValidate as the standard (and py-ecc) has it: blspy takes the identity as a key.
        if pubkey == _INFINITY_G1:
            raise ValueError("the identity is not a public key")
        return G1Element.from_bytes(pubkey)

    def _verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        return bool(PopSchemeMPL.verify(self._key(pubkey), message, G2Element.from_bytes(signature)))

    def _aggregate(self, signatures: list[bytes]) -> bytes:
        # Unchecked, like the others: subgroup membership is the verification's business.
        return bytes(PopSchemeMPL.aggregate([G2Element.from_bytes_unchecked(s) for s in signatures]))

    def _fast_aggregate_verify(self, pubkeys: list[bytes], message: bytes, aggregate: bytes) -> bool:
        keys = [self._key(k) for k in pubkeys]
        return bool(PopSchemeMPL.fast_aggregate_verify(keys, message, G2Element.from_bytes(aggregate)))


_INFINITY_G1: Final = b"\xc0" + bytes(PUBKEY_BYTES - 1)

_VERIFIERS: Final[dict[str, Callable[[], Verifier]]] = {
    PyEccVerifier.name: PyEccVerifier,
    MilagroVerifier.name: MilagroVerifier,
    BlstVerifier.name: BlstVerifier,
}


def verifier(name: str = "blst") -> Verifier:
    """The verifier called ``name``: "blst" (the fastest, the default), "milagro" or "py_ecc"
    (the reference)."""
    if name not in _VERIFIERS:
        raise InvalidInput(f"unknown verifier {name!r:.40}; choose one of {', '.join(sorted(_VERIFIERS))}")
    return _VERIFIERS[name]()


@dataclass(frozen=True, slots=True)
class ReleaseProof:
    """The aggregate signature confirming a delivery, the attestors whose signatures it sums
    (sorted) and the message they signed."""

    aggregate_signature: bytes
    signers: tuple[str, ...]
    message: bytes

    def __post_init__(self) -> None:
        if not _is_signature(self.aggregate_signature):
            raise InvalidInput(f"an aggregate signature must be {SIGNATURE_BYTES} bytes")
        if not self.signers or list(self.signers) != sorted(set(self.signers)):
            raise InvalidInput("the signers of a release proof must be distinct and sorted")
        _check_delivery_message(self.message)


def _check_delivery_message(message: object) -> None:
    if (
        not isinstance(message, bytes)
        or len(message) != MESSAGE_BYTES
        or not message.startswith(DELIVERY_DOMAIN)
    ):
        raise InvalidInput("the message is not a delivery message (see delivery_message)")


def _check_attestations(attestations: Mapping[str, tuple[bytes, bytes]]) -> None:
    if not isinstance(attestations, Mapping) or len(attestations) > MAX_ATTESTATIONS:
        raise InvalidInput(
            f"attestations must map at most {MAX_ATTESTATIONS} attestor ids to (key, signature)"
        )
    for attestor, pair in attestations.items():
        if not isinstance(attestor, str) or not attestor or not attestor.isprintable():
            raise InvalidInput(f"an attestor id must be non-empty printable text, got {attestor!r:.60}")
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidInput(f"attestor {attestor!r:.60}: expected a (public key, signature) pair")
        if not _is_pubkey(pair[0]):
            raise InvalidInput(f"attestor {attestor!r:.60}: a public key must be {PUBKEY_BYTES} bytes")
        if not _is_signature(pair[1]):
            raise InvalidInput(f"attestor {attestor!r:.60}: a signature must be {SIGNATURE_BYTES} bytes")


def release_proof(
    message: bytes,
    attestations: Mapping[str, tuple[bytes, bytes]],
    threshold: int,
    verifier: Verifier,
    *,
    verified: frozenset[str] = frozenset(),
) -> ReleaseProof:
    """Aggregate the attestations of ``message`` into a release proof, or raise InvalidInput.

    ``attestations`` maps attestor id to (its registered public key, its signature); the caller
    passes only attestors that are registered, not revoked and in the escrow's policy. Refused, in
    this order and before any pairing where possible: malformed input; one public key under two
    ids (a key counts once, and the proof would not say whose it is); fewer than ``threshold``
    attestors; a signature that does not verify on its own (the attestor is named); an aggregate
    that fails FastAggregateVerify. Every attestation passed is part of the proof.

    ``verified`` names attestors whose signature of ``message`` under that same key the caller
    has already verified (a stored attestation, checked when it was recorded and never changed);
    only theirs skip the individual check. The aggregate is always checked.
    """
    _check_delivery_message(message)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 1 <= threshold <= MAX_ATTESTATIONS
    ):
        raise InvalidInput(f"threshold must be an integer from 1 to {MAX_ATTESTATIONS}")
    _check_attestations(attestations)

    ids_by_key: dict[bytes, list[str]] = {}
    for attestor, (pubkey, _) in attestations.items():
        ids_by_key.setdefault(pubkey, []).append(attestor)
    shared = sorted(sorted(ids) for ids in ids_by_key.values() if len(ids) > 1)
    if shared:
        raise InvalidInput(f"attestors {', '.join(shared[0])} present the same public key; a key counts once")
    if len(attestations) < threshold:
        raise InvalidInput(
            f"below threshold: {len(attestations)} distinct attestor(s) signed, {threshold} required"
        )

    signers = tuple(sorted(attestations))
    for attestor in signers:
        pubkey, signature = attestations[attestor]
        if attestor not in verified and not verifier.verify(pubkey, message, signature):
            raise InvalidInput(
                f"the signature of attestor {attestor!r:.60} does not verify for this delivery"
            )

    pubkeys = [attestations[a][0] for a in signers]
    aggregate = verifier.aggregate([attestations[a][1] for a in signers])
    # Follows from the individual checks; checked anyway because the aggregate is what is stored.
    if not verifier.fast_aggregate_verify(pubkeys, message, aggregate):
        raise InvalidInput("the aggregate signature does not verify (FastAggregateVerify)")
    return ReleaseProof(aggregate_signature=aggregate, signers=signers, message=message)


def generate_attestor(seed: bytes) -> tuple[int, bytes, bytes]:
    """An attestor's (secret key, public key, proof of possession), derived from ``seed``
    (at least 32 bytes of secret randomness) with py-ecc's KeyGen. For tests and the CLI."""
    if not isinstance(seed, bytes) or len(seed) < SEED_MIN_BYTES:
        raise InvalidInput(f"a key seed must be at least {SEED_MIN_BYTES} bytes")
    secret_key = PyEccPop.KeyGen(seed)
    return secret_key, bytes(PyEccPop.SkToPk(secret_key)), bytes(PyEccPop.PopProve(secret_key))


def sign_delivery(secret_key: int, message: bytes) -> bytes:
    """The attestor's signature of a delivery message (see :func:`delivery_message`), with py-ecc."""
    if isinstance(secret_key, bool) or not isinstance(secret_key, int) or not 0 < secret_key < curve_order:
        raise InvalidInput("a secret key must be an integer in (0, the curve order)")
    _check_delivery_message(message)
    return bytes(PyEccPop.Sign(secret_key, message))
