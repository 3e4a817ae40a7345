"""Delivery attestations: the signed message, attestor registration, release proofs, and the
agreement of the fast verifiers (milagro, blst) with the reference (py-ecc) on valid and invalid vectors.

py-ecc spends about 0.4 s per pairing, so keys and signatures are made once per module and every
py-ecc outcome is computed once and shared between the tests that look at it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_typing import BLSPubkey, BLSSignature
from hypothesis import given, settings
from hypothesis import strategies as st
from py_ecc.bls.g2_primitives import pubkey_to_G1, signature_to_G2, subgroup_check

from ledger.errors import InvalidInput
from ledger.escrow.attestation import (
    DELIVERY_DOMAIN,
    MESSAGE_BYTES,
    BlstVerifier,
    MilagroVerifier,
    PyEccVerifier,
    ReleaseProof,
    Verifier,
    check_public_key,
    delivery_message,
    generate_attestor,
    release_proof,
    sign_delivery,
    verifier,
)

CHAIN_ID = 31337
CONTRACT = "0x" + "ab" * 20
ESCROW_ID = "0x" + "11" * 32
OTHER_ESCROW_ID = "0x" + "22" * 32
DELIVERY_REF = "PO-2025-0042/pallet-7"
AMOUNT = 1_500 * 10**18

INFINITY_G1 = b"\xc0" + bytes(47)
INFINITY_G2 = b"\xc0" + bytes(95)
# Points on the curves but outside the prime-order subgroups (x = 4 on G1; x = 2 + 0i on G2).
OFF_SUBGROUP_G1 = bytes.fromhex("80" + "00" * 46 + "04")
OFF_SUBGROUP_G2 = bytes.fromhex("a0" + "00" * 47 + "00" * 47 + "02")
GARBAGE_G1 = b"\x01" * 48  # compression flag unset: not a compressed point at all
GARBAGE_G2 = b"\x01" * 96

VERIFIERS: dict[str, Verifier] = {
    "py_ecc": PyEccVerifier(),
    "milagro": MilagroVerifier(),
    "blst": BlstVerifier(),
}
FAST = ("milagro", "blst")
REGISTERED = ("a", "b", "c")


def _message(**changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "chain_id": CHAIN_ID,
        "escrow_contract": CONTRACT,
        "escrow_id": ESCROW_ID,
        "delivery_ref": DELIVERY_REF,
        "amount": AMOUNT,
    }
    fields.update(changes)
    return delivery_message(**fields)


@dataclass(frozen=True)
class World:
    """Attestors a, b, c (registered) and x (never registered), and what they signed."""

    message: bytes
    keys: dict[str, tuple[int, bytes, bytes]]
    # (attestor, "delivery" | "other_ref" | "other_escrow") -> signature
    signatures: dict[tuple[str, str], bytes]

    def pk(self, attestor: str) -> bytes:
        return self.keys[attestor][1]

    def sig(self, attestor: str, of: str = "delivery") -> bytes:
        return self.signatures[(attestor, of)]

    def from_registry(
        self, received: dict[str, bytes], revoked: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """What the escrow service hands over: attestations of registered, unrevoked attestors only,
        each paired with the key the registry holds (never a key the sender supplies)."""
        registry = {attestor: self.pk(attestor) for attestor in REGISTERED}
        return {i: (registry[i], s) for i, s in received.items() if i in registry and i not in revoked}


@pytest.fixture(scope="module")
def world() -> World:
    message = _message()
    other_ref = _message(delivery_ref=DELIVERY_REF + "b")
    other_escrow = _message(escrow_id=OTHER_ESCROW_ID)
    keys = {
        name: generate_attestor(hashlib.sha256(b"attestor-seed:" + name.encode()).digest()) for name in "abcx"
    }
    signatures = {(name, "delivery"): sign_delivery(keys[name][0], message) for name in "abcx"}
    signatures[("b", "other_ref")] = sign_delivery(keys["b"][0], other_ref)
    signatures[("b", "other_escrow")] = sign_delivery(keys["b"][0], other_escrow)
    return World(message=message, keys=keys, signatures=signatures)


# ---------------------------------------------------------------- the message


def test_delivery_message_layout() -> None:
    message = _message()
    assert len(message) == MESSAGE_BYTES == len(DELIVERY_DOMAIN) + 5 * 32 - 12
    fields = message[len(DELIVERY_DOMAIN) :]
    assert message.startswith(DELIVERY_DOMAIN)
    assert int.from_bytes(fields[0:32], "big") == CHAIN_ID
    assert fields[32:52] == bytes.fromhex(CONTRACT[2:])
    assert fields[52:84] == bytes.fromhex(ESCROW_ID[2:])
    assert fields[84:116] == hashlib.sha256(DELIVERY_REF.encode()).digest()
    assert int.from_bytes(fields[116:148], "big") == AMOUNT


def test_hex_case_does_not_change_the_message() -> None:
    checksummed = "0xAbAbabABabAbaBaBAbABABaBaBAbabABAbABaBAb"
    assert (
        _message(escrow_contract=checksummed, escrow_id=ESCROW_ID.upper().replace("0X", "0x")) == _message()
    )


CHANGES: dict[str, dict[str, Any]] = {
    "chain_id": {"chain_id": CHAIN_ID + 1},
    "contract": {"escrow_contract": "0x" + "ab" * 19 + "ac"},
    "escrow_id": {"escrow_id": OTHER_ESCROW_ID},
    "delivery_ref": {"delivery_ref": DELIVERY_REF.lower()},
    "delivery_ref_space": {"delivery_ref": DELIVERY_REF + " "},
    "amount": {"amount": AMOUNT - 1},
}


def test_changing_any_field_changes_the_message() -> None:
    messages = {name: _message(**change) for name, change in CHANGES.items()}
    assert _message() not in messages.values()
    assert len(set(messages.values())) == len(messages)


@settings(max_examples=60, deadline=None)
@given(
    chain_id=st.integers(1, 2**256 - 1),
    contract=st.binary(min_size=20, max_size=20),
    escrow_id=st.binary(min_size=32, max_size=32),
    delivery_ref=st.text(
        st.characters(categories=["L", "N", "P", "S"], include_characters=" "), min_size=1, max_size=256
    ),
    amount=st.integers(1, 2**256 - 1),
)
def test_the_message_gives_back_every_field(
    chain_id: int, contract: bytes, escrow_id: bytes, delivery_ref: str, amount: int
) -> None:
    # Fixed-width fields after a fixed prefix decode back to the inputs: the encoding is injective
    # (up to sha256 on the delivery reference).
    message = delivery_message(chain_id, "0x" + contract.hex(), "0x" + escrow_id.hex(), delivery_ref, amount)
    fields = message[len(DELIVERY_DOMAIN) :]
    assert message.startswith(DELIVERY_DOMAIN) and len(message) == MESSAGE_BYTES
    assert int.from_bytes(fields[0:32], "big") == chain_id
    assert fields[32:52] == contract
    assert fields[52:84] == escrow_id
    assert fields[84:116] == hashlib.sha256(delivery_ref.encode()).digest()
    assert int.from_bytes(fields[116:148], "big") == amount


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"chain_id": 0}, "chain_id"),
        ({"chain_id": -1}, "chain_id"),
        ({"chain_id": True}, "chain_id"),
        ({"chain_id": "1"}, "chain_id"),
        ({"chain_id": 2**256}, "chain_id"),
        ({"escrow_contract": "ab" * 20}, "not an address"),
        ({"escrow_contract": "0x" + "ab" * 19}, "not an address"),
        ({"escrow_contract": "0x" + "ab" * 21}, "not an address"),
        ({"escrow_contract": "0x" + "zz" * 20}, "not an address"),
        ({"escrow_contract": bytes(20)}, "must be a string"),
        ({"escrow_id": "11" * 32}, "escrow_id"),
        ({"escrow_id": "0x" + "11" * 31}, "escrow_id"),
        ({"escrow_id": "0x" + "11" * 33}, "escrow_id"),
        ({"escrow_id": "0x" + "g1" * 32}, "escrow_id"),
        ({"escrow_id": " 0x" + "11" * 32}, "escrow_id"),
        ({"escrow_id": bytes(32)}, "escrow_id"),
        ({"delivery_ref": ""}, "delivery_ref"),
        ({"delivery_ref": "x" * 257}, "delivery_ref"),
        ({"delivery_ref": "line\nbreak"}, "printable"),
        ({"delivery_ref": "nul\x00"}, "printable"),
        ({"delivery_ref": b"PO-1"}, "delivery_ref"),
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"amount": 2**256}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": "100"}, "amount"),
    ],
)
def test_delivery_message_refuses_malformed_fields(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        _message(**change)


def test_delivery_message_accepts_the_bounds() -> None:
    assert len(_message(chain_id=2**256 - 1, amount=2**256 - 1, delivery_ref="x" * 256)) == MESSAGE_BYTES
    assert len(_message(chain_id=1, amount=1, delivery_ref="é")) == MESSAGE_BYTES


# ---------------------------------------------------------------- keys and registration


def test_the_hand_made_points_are_on_the_curves_but_off_the_subgroups() -> None:
    # Decompression checks the curve equation, so these parse; only the subgroup check fails.
    assert not subgroup_check(pubkey_to_G1(BLSPubkey(OFF_SUBGROUP_G1)))
    assert not subgroup_check(signature_to_G2(BLSSignature(OFF_SUBGROUP_G2)))


def test_generate_attestor_is_deterministic_and_refuses_short_seeds(world: World) -> None:
    seed = hashlib.sha256(b"attestor-seed:a").digest()
    assert generate_attestor(seed) == world.keys["a"]
    assert len(world.pk("a")) == 48 and len(world.keys["a"][2]) == 96
    with pytest.raises(InvalidInput, match="32 bytes"):
        generate_attestor(seed[:31])


def test_sign_delivery_refuses_bad_keys_and_foreign_messages(world: World) -> None:
    with pytest.raises(InvalidInput, match="secret key"):
        sign_delivery(0, world.message)
    with pytest.raises(InvalidInput, match="not a delivery message"):
        sign_delivery(world.keys["a"][0], b"pay me")


def test_registration_accepts_a_key_with_its_own_proof(world: World) -> None:
    _, pubkey, proof = world.keys["a"]
    check_public_key(pubkey, proof)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("proof of another key", "proof of possession does not verify"),
        ("a delivery signature instead of a proof", "proof of possession does not verify"),
        ("garbage proof", "proof of possession does not verify"),
        ("garbage key", "not a valid public key"),
        ("key off the subgroup", "not a valid public key"),
        ("infinity key", "not a valid public key"),
        ("short key", "48 bytes"),
        ("long key", "48 bytes"),
        ("empty key", "48 bytes"),
        ("key as hex text", "48 bytes"),
        ("short proof", "96 bytes"),
        ("long proof", "96 bytes"),
    ],
)
def test_registration_refuses(world: World, case: str, reason: str) -> None:
    _, pubkey, proof = world.keys["a"]
    key_and_proof: dict[str, tuple[Any, Any]] = {
        "proof of another key": (pubkey, world.keys["b"][2]),
        # Same key, but signed under the message tag, not the proof-of-possession tag.
        "a delivery signature instead of a proof": (pubkey, world.sig("a")),
        "garbage proof": (pubkey, GARBAGE_G2),
        "garbage key": (GARBAGE_G1, proof),
        "key off the subgroup": (OFF_SUBGROUP_G1, proof),
        "infinity key": (INFINITY_G1, INFINITY_G2),
        "short key": (pubkey[:47], proof),
        "long key": (pubkey + b"\x00", proof),
        "empty key": (b"", proof),
        "key as hex text": (pubkey.hex(), proof),
        "short proof": (pubkey, proof[:95]),
        "long proof": (pubkey, proof + b"\x00"),
    }
    with pytest.raises(InvalidInput, match=reason):
        check_public_key(*key_and_proof[case])


# ---------------------------------------------------------------- verifiers


def test_verifier_by_name() -> None:
    assert verifier().name == "blst"
    assert isinstance(verifier("milagro"), MilagroVerifier)
    assert isinstance(verifier("py_ecc"), PyEccVerifier)
    assert isinstance(verifier("blst"), BlstVerifier)
    with pytest.raises(InvalidInput, match="unknown verifier"):
        verifier("blspy")


Outcome = Any  # a bool, the aggregate's bytes, a ReleaseProof, or ("refused", message)


@dataclass(frozen=True)
class Vector:
    """One call to make with each verifier, and what the reference must answer."""

    call: Callable[[Verifier, World], Any]
    expected: Callable[[World], Outcome] | bool | str
    tags: tuple[str, ...] = field(default=())


def _verify(key: str | bytes, sig: tuple[str, str] | bytes) -> Callable[[Verifier, World], bool]:
    def call(v: Verifier, w: World) -> bool:
        signature = sig if isinstance(sig, bytes) else w.sig(*sig)
        return v.verify(key if isinstance(key, bytes) else w.pk(key), w.message, signature)

    return call


def _aggregate(*sigs: str | bytes) -> Callable[[Verifier, World], bytes]:
    return lambda v, w: v.aggregate([s if isinstance(s, bytes) else w.sig(s) for s in sigs])


def _fast(keys: list[str | bytes], sigs: list[str]) -> Callable[[Verifier, World], bool]:
    def call(v: Verifier, w: World) -> bool:
        aggregate = MilagroVerifier().aggregate([w.sig(s) for s in sigs]) if sigs else INFINITY_G2
        return v.fast_aggregate_verify(
            [k if isinstance(k, bytes) else w.pk(k) for k in keys], w.message, aggregate
        )

    return call


def _release(
    build: Callable[[World], tuple[bytes, dict[str, Any], int]],
) -> Callable[[Verifier, World], ReleaseProof]:
    return lambda v, w: release_proof(*build(w), verifier=v)


def _proof(*signers: str) -> Callable[[World], ReleaseProof]:
    def expected(w: World) -> ReleaseProof:
        aggregate = _sum_of(*signers)(w)
        return ReleaseProof(aggregate_signature=aggregate, signers=signers, message=w.message)

    return expected


def _sum_of(*signers: str) -> Callable[[World], bytes]:
    # The reference sum, written with py-ecc itself so the expectation does not come from milagro.
    return lambda w: PyEccVerifier().aggregate([w.sig(s) for s in signers])


VERIFY_VECTORS: dict[str, Vector] = {
    "verify: valid": Vector(_verify("a", ("a", "delivery")), True),
    "verify: wrong key": Vector(_verify("b", ("a", "delivery")), False),
    "verify: wrong message": Vector(_verify("b", ("b", "other_ref")), False),
    "verify: wrong escrow": Vector(_verify("b", ("b", "other_escrow")), False),
    "verify: unregistered signer under a registered key": Vector(_verify("b", ("x", "delivery")), False),
    "verify: garbage signature": Vector(_verify("a", GARBAGE_G2), False),
    "verify: signature off the subgroup": Vector(_verify("a", OFF_SUBGROUP_G2), False),
    "verify: infinity key and signature": Vector(_verify(INFINITY_G1, INFINITY_G2), False),
    "verify: key off the subgroup": Vector(_verify(OFF_SUBGROUP_G1, ("a", "delivery")), False),
    "verify: garbage key": Vector(_verify(GARBAGE_G1, ("a", "delivery")), False),
    "verify: short key": Vector(_verify(bytes(47), ("a", "delivery")), False),
    "verify: short signature": Vector(lambda v, w: v.verify(w.pk("a"), w.message, w.sig("a")[:95]), False),
    "verify: text instead of bytes": Vector(
        lambda v, w: v.verify(w.pk("a"), w.message.hex(), w.sig("a")),  # type: ignore[arg-type]
        False,
    ),
}

AGGREGATE_VECTORS: dict[str, Vector] = {
    "aggregate: one": Vector(_aggregate("a"), _sum_of("a")),
    "aggregate: two": Vector(_aggregate("a", "b"), _sum_of("a", "b")),
    "aggregate: three, any order": Vector(_aggregate("c", "a", "b"), _sum_of("a", "b", "c")),
    "aggregate: with the infinity signature": Vector(_aggregate("a", INFINITY_G2), _sum_of("a")),
    "aggregate: none": Vector(_aggregate(), "aggregate takes 1 to"),
    "aggregate: garbage": Vector(_aggregate("a", GARBAGE_G2), "not a point of G2"),
    "aggregate: short": Vector(_aggregate("a", bytes(95)), "96 bytes"),
}

FAST_VECTORS: dict[str, Vector] = {
    "fast: valid 2": Vector(_fast(["a", "b"], ["a", "b"]), True),
    "fast: valid 3": Vector(_fast(["a", "b", "c"], ["a", "b", "c"]), True),
    "fast: a signer missing": Vector(_fast(["a", "b", "c"], ["a", "b"]), False),
    "fast: an extra signature": Vector(_fast(["a", "b"], ["a", "b", "c"]), False),
    # Mathematically valid, which is why release_proof refuses a key that appears twice.
    "fast: duplicated signer": Vector(_fast(["a", "a"], ["a", "a"]), True),
    "fast: unregistered signer under a registered key": Vector(_fast(["a", "b"], ["a", "x"]), False),
    "fast: no keys": Vector(_fast([], []), False),
    "fast: infinity key": Vector(_fast(["a", INFINITY_G1], ["a"]), False),
    "fast: key off the subgroup": Vector(_fast(["a", OFF_SUBGROUP_G1], ["a"]), False),
}


def _pairs(w: World, spec: dict[str, tuple[str, str] | tuple[str, str, str]]) -> dict[str, Any]:
    """attestor id -> (key of, signature of[, which message])."""
    return {i: (w.pk(s[0]), w.sig(*s[1:])) for i, s in spec.items()}


RELEASE_VECTORS: dict[str, Vector] = {
    "release: 2 of 3": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a"), "b": ("b", "b")}), 2)), _proof("a", "b")
    ),
    "release: 3 of 3 above a threshold of 2": Vector(
        _release(lambda w: (w.message, _pairs(w, {"c": ("c", "c"), "a": ("a", "a"), "b": ("b", "b")}), 2)),
        _proof("a", "b", "c"),
    ),
    "release: wrong key": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a"), "b": ("c", "b")}), 2)),
        "attestor 'b' does not verify",
    ),
    "release: wrong message": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a"), "b": ("b", "b", "other_ref")}), 2)),
        "attestor 'b' does not verify",
    ),
    "release: wrong escrow": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a"), "b": ("b", "b", "other_escrow")}), 2)),
        "attestor 'b' does not verify",
    ),
    "release: duplicated signer": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a"), "a-again": ("a", "a")}), 2)),
        "attestors a, a-again present the same public key",
    ),
    "release: duplicated signer beside enough others": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a"), "a2": ("a", "a"), "b": ("b", "b")}), 2)),
        "attestors a, a2 present the same public key",
    ),
    "release: below threshold": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a")}), 2)),
        "below threshold: 1 distinct attestor",
    ),
    "release: unregistered attestor dropped by the caller": Vector(
        _release(lambda w: (w.message, w.from_registry({"a": w.sig("a"), "x": w.sig("x")}), 2)),
        "below threshold: 1 distinct attestor",
    ),
    "release: revoked attestor dropped by the caller": Vector(
        _release(
            lambda w: (w.message, w.from_registry({"a": w.sig("a"), "b": w.sig("b")}, frozenset({"b"})), 2)
        ),
        "below threshold: 1 distinct attestor",
    ),
    "release: unregistered signer under a registered id": Vector(
        _release(lambda w: (w.message, w.from_registry({"a": w.sig("a"), "b": w.sig("x")}), 2)),
        "attestor 'b' does not verify",
    ),
    "release: garbage signature": Vector(
        _release(lambda w: (w.message, {**_pairs(w, {"a": ("a", "a")}), "b": (w.pk("b"), GARBAGE_G2)}, 2)),
        "attestor 'b' does not verify",
    ),
    "release: infinity key and signature": Vector(
        _release(lambda w: (w.message, {**_pairs(w, {"a": ("a", "a")}), "b": (INFINITY_G1, INFINITY_G2)}, 2)),
        "attestor 'b' does not verify",
    ),
    "release: short signature": Vector(
        _release(
            lambda w: (w.message, {**_pairs(w, {"a": ("a", "a")}), "b": (w.pk("b"), w.sig("b")[:95])}, 2)
        ),
        "attestor 'b': a signature must be 96 bytes",
    ),
    "release: not a pair": Vector(
        _release(lambda w: (w.message, {"a": w.sig("a")}, 1)), "expected a \\(public key, signature\\) pair"
    ),
    "release: not a delivery message": Vector(
        _release(lambda w: (b"pay me", _pairs(w, {"a": ("a", "a")}), 1)), "not a delivery message"
    ),
    "release: threshold zero": Vector(
        _release(lambda w: (w.message, _pairs(w, {"a": ("a", "a")}), 0)), "threshold must be"
    ),
}

VECTORS: dict[str, Vector] = {**VERIFY_VECTORS, **AGGREGATE_VECTORS, **FAST_VECTORS, **RELEASE_VECTORS}


class Outcomes:
    """Each (verifier, vector) outcome computed once: py-ecc's are slow and two tests read them."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._cache: dict[tuple[str, str], Outcome] = {}

    def __call__(self, verifier_name: str, vector: str) -> Outcome:
        key = (verifier_name, vector)
        if key not in self._cache:
            try:
                self._cache[key] = VECTORS[vector].call(VERIFIERS[verifier_name], self.world)
            except InvalidInput as refused:
                self._cache[key] = ("refused", refused.message)
        return self._cache[key]

    def expected(self, vector: str) -> Outcome:
        expected = VECTORS[vector].expected
        return expected(self.world) if callable(expected) else expected


@pytest.fixture(scope="module")
def outcomes(world: World) -> Outcomes:
    return Outcomes(world)


def _assert_expected(outcome: Outcome, expected: Outcome) -> None:
    if isinstance(expected, str):
        assert isinstance(outcome, tuple) and outcome[0] == "refused", outcome
        assert re.search(expected, outcome[1]), outcome[1]
    else:
        assert outcome == expected


@pytest.mark.parametrize("vector", list(RELEASE_VECTORS))
@pytest.mark.parametrize("verifier_name", ["milagro", "blst", "py_ecc"])
def test_release_proof(outcomes: Outcomes, verifier_name: str, vector: str) -> None:
    _assert_expected(outcomes(verifier_name, vector), outcomes.expected(vector))


@pytest.mark.parametrize("fast", FAST)
def test_the_fast_verifiers_agree_with_the_reference_on_every_vector(outcomes: Outcomes, fast: str) -> None:
    disagreements = [
        (name, outcomes(fast, name), outcomes("py_ecc", name))
        for name in VECTORS
        if outcomes("py_ecc", name) != outcomes(fast, name)
    ]
    assert disagreements == []
    for name in VECTORS:
        # Agreement alone would pass if both were wrong: the reference must give the expected answer.
        _assert_expected(outcomes("py_ecc", name), outcomes.expected(name))
    accepted = [
        name
        for name in VECTORS
        if outcomes("py_ecc", name) is True or isinstance(outcomes("py_ecc", name), bytes | ReleaseProof)
    ]
    assert len(accepted) >= 10, "the vectors must include valid inputs, not only refusals"


def test_a_release_proof_verifies_on_its_own(world: World) -> None:
    proof = release_proof(world.message, _pairs(world, {"b": ("b", "b"), "a": ("a", "a")}), 2, verifier())
    assert proof.signers == ("a", "b")
    assert verifier().fast_aggregate_verify(
        [world.pk("a"), world.pk("b")], proof.message, proof.aggregate_signature
    )
    assert not verifier().fast_aggregate_verify(
        [world.pk("a"), world.pk("c")], proof.message, proof.aggregate_signature
    )
    with pytest.raises(AttributeError):
        proof.signers = ("a",)  # type: ignore[misc]


class _DroppingVerifier(MilagroVerifier):
    """A faulty aggregation (drops the last signature): the aggregate check must catch it."""

    def aggregate(self, signatures: Any) -> bytes:
        return super().aggregate(list(signatures)[:-1])


def test_an_aggregate_that_does_not_verify_is_refused(world: World) -> None:
    attestations = _pairs(world, {"a": ("a", "a"), "b": ("b", "b")})
    with pytest.raises(InvalidInput, match="aggregate signature does not verify"):
        release_proof(world.message, attestations, 2, _DroppingVerifier())


def test_release_proof_refuses_a_proof_record_that_is_not_whole(world: World) -> None:
    with pytest.raises(InvalidInput, match="distinct and sorted"):
        ReleaseProof(aggregate_signature=world.sig("a"), signers=("b", "a"), message=world.message)
    with pytest.raises(InvalidInput, match="96 bytes"):
        ReleaseProof(aggregate_signature=b"", signers=("a",), message=world.message)


@pytest.mark.parametrize("name", ["milagro", "blst"])
def test_attestations_verified_before_skip_only_their_own_check(world: World, name: str) -> None:
    # b presents a's signature: not a signature of b's key.
    attestations = _pairs(world, {"a": ("a", "a"), "b": ("b", "a")})
    with pytest.raises(InvalidInput, match="attestor 'b' does not verify"):
        release_proof(world.message, attestations, 2, verifier(name), verified=frozenset({"a"}))
    # Even if a caller wrongly vouched for it, the aggregate check still refuses the proof.
    with pytest.raises(InvalidInput, match="aggregate signature does not verify"):
        release_proof(world.message, attestations, 2, verifier(name), verified=frozenset({"a", "b"}))
    good = _pairs(world, {"a": ("a", "a"), "b": ("b", "b")})
    proof = release_proof(world.message, good, 2, verifier(name), verified=frozenset({"a", "b"}))
    assert proof == release_proof(world.message, good, 2, verifier("py_ecc"))
