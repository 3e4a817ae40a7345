"""Signed party requests: EIP-712 digests checked against an encoding built by hand, signatures
that recover their signer and nobody else, and the refusals of malformed input."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_account import Account
from eth_keys.datatypes import Signature
from eth_utils.crypto import keccak

from ledger.errors import InvalidInput
from ledger.escrow import party
from ledger.escrow.party import CreateEscrowRequest, OpenDisputeRequest

CHAIN_ID = 31337
CONTRACT = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
BUYER_KEY = "0x" + "11" * 32
OTHER_KEY = "0x" + "22" * 32
BUYER = Account.from_key(BUYER_KEY).address.lower()
OTHER = Account.from_key(OTHER_KEY).address.lower()
NOW = datetime(2030, 1, 1, tzinfo=UTC)
NOW_S = int(NOW.timestamp())
ESCROW_ID = "0x" + "ab" * 32

DOMAIN_TYPE = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"


def create_request(**changes: Any) -> CreateEscrowRequest:
    fields: dict[str, Any] = {
        "key": "order-7781",
        "seller": "0x" + "5e" * 20,
        "amount": 250 * 10**18,
        "fee_bps": 150,
        "deadline": NOW_S + 10 * 86_400,
        "delivery_ref": "AWB 176-12345675",
        "attestors": (3, 9),
        "threshold": 2,
        "auto_release": True,
        "nonce": 1,
        "expiry": NOW_S + 3600,
    }
    fields.update(changes)
    return CreateEscrowRequest(**fields)


def dispute_request(**changes: Any) -> OpenDisputeRequest:
    fields: dict[str, Any] = {
        "escrow_id": ESCROW_ID,
        "reason": "goods arrived damaged",
        "nonce": 2**255 + 5,
        "expiry": NOW_S + 3600,
    }
    fields.update(changes)
    return OpenDisputeRequest(**fields)


def domain_separator(chain_id: int, contract: str, name: bytes = b"TraceChain Settlement") -> bytes:
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [keccak(DOMAIN_TYPE), keccak(name), keccak(b"1"), chain_id, contract],
        )
    )


def hand_digest(struct_hash: bytes, chain_id: int = CHAIN_ID, contract: str = CONTRACT) -> str:
    return "0x" + keccak(b"\x19\x01" + domain_separator(chain_id, contract) + struct_hash).hex()


def create_struct_hash(r: CreateEscrowRequest) -> bytes:
    type_hash = keccak(
        b"CreateEscrow(string key,address seller,uint256 amount,uint16 feeBps,uint64 deadline,"
        b"string deliveryRef,uint64[] attestors,uint16 threshold,bool autoRelease,uint256 nonce,"
        b"uint64 expiry)"
    )
    attestors = keccak(b"".join(encode(["uint64"], [a]) for a in r.attestors))
    return keccak(
        encode(
            [
                "bytes32",
                "bytes32",
                "address",
                "uint256",
                "uint16",
                "uint64",
                "bytes32",
                "bytes32",
                "uint16",
                "bool",
                "uint256",
                "uint64",
            ],
            [
                type_hash,
                keccak(r.key.encode()),
                r.seller,
                r.amount,
                r.fee_bps,
                r.deadline,
                keccak(r.delivery_ref.encode()),
                attestors,
                r.threshold,
                r.auto_release,
                r.nonce,
                r.expiry,
            ],
        )
    )


def dispute_struct_hash(r: OpenDisputeRequest) -> bytes:
    type_hash = keccak(b"OpenDispute(bytes32 escrowId,string reason,uint256 nonce,uint64 expiry)")
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "uint64"],
            [type_hash, bytes.fromhex(r.escrow_id[2:]), keccak(r.reason.encode()), r.nonce, r.expiry],
        )
    )


# --- the digest, cross-checked ---------------------------------------------------------------------


def test_hand_built_domain_separator_matches_the_eip712_specification_example() -> None:
    # The "Ether Mail" example of EIP-712 has the same four domain fields as ours.
    expected = "f2cee375fa42b42143804025fc449deafd50cc031ca257e0b194a650a912090f"
    assert domain_separator(1, "0x" + "cc" * 20, name=b"Ether Mail").hex() == expected


def test_create_escrow_digest_matches_the_hand_built_encoding() -> None:
    request = create_request(attestors=(3, 9, 2**64 - 1), threshold=3, auto_release=False)
    assert request.digest(CHAIN_ID, CONTRACT) == hand_digest(create_struct_hash(request))


def test_open_dispute_digest_matches_the_hand_built_encoding() -> None:
    request = dispute_request(reason="never delivered\nsee the carrier's note")
    assert request.digest(CHAIN_ID, CONTRACT) == hand_digest(dispute_struct_hash(request))


def test_typed_data_names_the_domain_and_the_struct() -> None:
    typed = create_request().typed_data(CHAIN_ID, CONTRACT)
    assert typed["primaryType"] == "CreateEscrow"
    assert typed["domain"] == {
        "name": "TraceChain Settlement",
        "version": "1",
        "chainId": CHAIN_ID,
        "verifyingContract": CONTRACT,
    }
    assert [f["name"] for f in typed["types"]["EIP712Domain"]] == [
        "name",
        "version",
        "chainId",
        "verifyingContract",
    ]
    assert typed["message"]["attestors"] == [3, 9]
    assert typed["message"]["feeBps"] == 150
    dispute = dispute_request().typed_data(CHAIN_ID, CONTRACT)
    assert [f["type"] for f in dispute["types"]["OpenDispute"]] == ["bytes32", "string", "uint256", "uint64"]


def test_digest_is_lower_case_hex_whatever_the_case_of_the_input() -> None:
    upper = create_request(seller="0x" + "5E" * 20)
    assert upper.seller == "0x" + "5e" * 20
    assert upper.digest(CHAIN_ID, CONTRACT.upper().replace("0X", "0x")) == create_request().digest(
        CHAIN_ID, CONTRACT
    )
    assert dispute_request(escrow_id=ESCROW_ID.upper().replace("0X", "0x")).escrow_id == ESCROW_ID


# --- signing and recovery ----------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [create_request(), dispute_request()], ids=["create", "dispute"])
def test_sign_and_recover_round_trip(request_: party.PartyRequest) -> None:
    signature = party.sign(request_, BUYER_KEY, CHAIN_ID, CONTRACT)
    assert signature.startswith("0x") and len(signature) == 132
    assert party.recover_signer(request_, signature, CHAIN_ID, CONTRACT, NOW) == BUYER
    raw = bytes.fromhex(signature[2:])
    assert party.recover_signer(request_, raw, CHAIN_ID, CONTRACT, NOW) == BUYER
    mixed_case = Account.from_key(BUYER_KEY).address
    assert party.require_signer(request_, signature, CHAIN_ID, CONTRACT, mixed_case, NOW) == BUYER
    other = party.sign(request_, OTHER_KEY, CHAIN_ID, CONTRACT)
    assert party.recover_signer(request_, other, CHAIN_ID, CONTRACT, NOW) == OTHER


@pytest.mark.parametrize("request_", [create_request(), dispute_request()], ids=["create", "dispute"])
def test_the_signature_is_over_the_digest(request_: party.PartyRequest) -> None:
    raw = bytes.fromhex(party.sign(request_, BUYER_KEY, CHAIN_ID, CONTRACT)[2:])
    digest = bytes.fromhex(request_.digest(CHAIN_ID, CONTRACT)[2:])
    # eth-keys directly on the 32-byte digest, with v as the recovery id 0 or 1.
    public_key = Signature(raw[:64] + bytes([raw[64] - 27])).recover_public_key_from_msg_hash(digest)
    assert public_key.to_checksum_address().lower() == BUYER


@pytest.mark.parametrize(
    ("chain_id", "contract", "changes"),
    [
        (CHAIN_ID + 1, CONTRACT, {}),
        (CHAIN_ID, "0x" + "77" * 20, {}),
        (CHAIN_ID, CONTRACT, {"amount": 250 * 10**18 + 1}),
        (CHAIN_ID, CONTRACT, {"attestors": (3, 10)}),
        (CHAIN_ID, CONTRACT, {"attestors": (9, 3)}),
        (CHAIN_ID, CONTRACT, {"nonce": 2}),
        (CHAIN_ID, CONTRACT, {"key": "order-7782"}),
        (CHAIN_ID, CONTRACT, {"seller": "0x" + "5f" * 20}),
        (CHAIN_ID, CONTRACT, {"fee_bps": 151}),
        (CHAIN_ID, CONTRACT, {"deadline": NOW_S + 10 * 86_400 + 1}),
        (CHAIN_ID, CONTRACT, {"delivery_ref": "AWB 176-12345676"}),
        (CHAIN_ID, CONTRACT, {"threshold": 1}),
        (CHAIN_ID, CONTRACT, {"auto_release": False}),
        (CHAIN_ID, CONTRACT, {"expiry": NOW_S + 3601}),
    ],
    ids=[
        "chain",
        "contract",
        "amount",
        "attestors",
        "attestor-order",
        "nonce",
        "key",
        "seller",
        "fee",
        "deadline",
        "delivery-ref",
        "threshold",
        "auto-release",
        "expiry",
    ],
)
def test_a_create_signature_is_bound_to_every_field(
    chain_id: int, contract: str, changes: dict[str, Any]
) -> None:
    signature = party.sign(create_request(), BUYER_KEY, CHAIN_ID, CONTRACT)
    other = create_request(**changes)
    assert party.recover_signer(other, signature, chain_id, contract, NOW) != BUYER
    with pytest.raises(InvalidInput, match=f"not signed by {BUYER}"):
        party.require_signer(other, signature, chain_id, contract, BUYER, NOW)


@pytest.mark.parametrize(
    ("chain_id", "contract", "changes"),
    [
        (CHAIN_ID + 1, CONTRACT, {}),
        (CHAIN_ID, "0x" + "77" * 20, {}),
        (CHAIN_ID, CONTRACT, {"escrow_id": "0x" + "ab" * 31 + "ac"}),
        (CHAIN_ID, CONTRACT, {"reason": "goods arrived damaged!"}),
        (CHAIN_ID, CONTRACT, {"nonce": 2**255 + 6}),
        (CHAIN_ID, CONTRACT, {"expiry": NOW_S + 3599}),
    ],
    ids=["chain", "contract", "escrow-id", "reason", "nonce", "expiry"],
)
def test_a_dispute_signature_is_bound_to_every_field(
    chain_id: int, contract: str, changes: dict[str, Any]
) -> None:
    signature = party.sign(dispute_request(), BUYER_KEY, CHAIN_ID, CONTRACT)
    other = dispute_request(**changes)
    assert party.recover_signer(other, signature, chain_id, contract, NOW) != BUYER


def test_the_same_fields_under_the_other_struct_do_not_share_a_digest() -> None:
    assert create_request().digest(CHAIN_ID, CONTRACT) != dispute_request(nonce=1).digest(CHAIN_ID, CONTRACT)


def test_require_signer_refuses_another_key() -> None:
    request = create_request()
    signature = party.sign(request, OTHER_KEY, CHAIN_ID, CONTRACT)
    with pytest.raises(InvalidInput, match=f"the request is not signed by {BUYER}"):
        party.require_signer(request, signature, CHAIN_ID, CONTRACT, BUYER, NOW)
    assert party.require_signer(request, signature, CHAIN_ID, CONTRACT, OTHER, NOW) == OTHER


def _high_s(signature: str) -> bytes:
    """The other, malleated form of a valid signature: (r, n - s) with the parity flipped."""
    raw = bytes.fromhex(signature[2:])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(raw[32:64], "big")
    return raw[:32] + (n - s).to_bytes(32, "big") + bytes([55 - raw[64]])


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        ("0x" + "ab" * 64, "must be 65 bytes"),
        (b"\x01" * 66, "must be 65 bytes"),
        (b"", "must be 65 bytes"),
        ("0x" + "zz" * 65, "hex digits"),
        ("0x" + "a" * 129, "hex digits"),
        (b"\x00" * 65, "not a canonical signature"),
        (b"\x01" * 64 + b"\x05", "v must be 27 or 28"),
        (b"\xff" * 32 + b"\x01" * 32 + b"\x1b", "not a canonical signature"),
        (12345, "bytes or a hex string"),
    ],
    ids=["short", "long", "empty", "not-hex", "odd-digits", "zeros", "bad-v", "r-too-big", "not-bytes"],
)
def test_malformed_signatures_are_refused(signature: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        party.recover_signer(create_request(), signature, CHAIN_ID, CONTRACT, NOW)


def test_a_malleated_high_s_signature_is_refused() -> None:
    request = create_request()
    signature = party.sign(request, BUYER_KEY, CHAIN_ID, CONTRACT)
    with pytest.raises(InvalidInput, match="lower half"):
        party.recover_signer(request, _high_s(signature), CHAIN_ID, CONTRACT, NOW)


def test_a_signature_that_recovers_no_key_is_refused() -> None:
    # r = 5 with s, v in range: 5 is not the x coordinate of a curve point (no y with y^2 = 125 + 7).
    signature = (5).to_bytes(32, "big") + (1).to_bytes(32, "big") + b"\x1b"
    with pytest.raises(InvalidInput, match="does not recover a signer"):
        party.recover_signer(create_request(), signature, CHAIN_ID, CONTRACT, NOW)


def test_v_zero_or_one_is_accepted_like_27_or_28() -> None:
    request = dispute_request()
    raw = bytes.fromhex(party.sign(request, BUYER_KEY, CHAIN_ID, CONTRACT)[2:])
    assert party.recover_signer(request, raw[:64] + bytes([raw[64] - 27]), CHAIN_ID, CONTRACT, NOW) == BUYER


# --- validity window ------------------------------------------------------------------------------------


@pytest.mark.parametrize("expiry", [NOW_S, NOW_S - 1, 1], ids=["now", "a-second-ago", "epoch"])
def test_an_expired_request_is_refused(expiry: int) -> None:
    request = create_request(expiry=expiry)
    signature = party.sign(request, BUYER_KEY, CHAIN_ID, CONTRACT)
    with pytest.raises(InvalidInput, match="expired"):
        party.recover_signer(request, signature, CHAIN_ID, CONTRACT, NOW)


@pytest.mark.parametrize(
    "expiry", [NOW_S + party.MAX_VALIDITY_S + 1, 2**64 - 1], ids=["a-second-too-far", "uint64-max"]
)
def test_an_expiry_too_far_ahead_is_refused(expiry: int) -> None:
    request = dispute_request(expiry=expiry)
    signature = party.sign(request, BUYER_KEY, CHAIN_ID, CONTRACT)
    with pytest.raises(InvalidInput, match="more than 7 days"):
        party.recover_signer(request, signature, CHAIN_ID, CONTRACT, NOW)


def test_the_validity_window_includes_its_far_edge() -> None:
    request = dispute_request(expiry=NOW_S + party.MAX_VALIDITY_S)
    signature = party.sign(request, BUYER_KEY, CHAIN_ID, CONTRACT)
    assert party.recover_signer(request, signature, CHAIN_ID, CONTRACT, NOW) == BUYER


def test_now_without_a_time_zone_is_refused() -> None:
    request = dispute_request()
    signature = party.sign(request, BUYER_KEY, CHAIN_ID, CONTRACT)
    with pytest.raises(InvalidInput, match="time zone"):
        party.recover_signer(request, signature, CHAIN_ID, CONTRACT, NOW.replace(tzinfo=None))


# --- field validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"amount": -1}, "greater than zero"),
        ({"amount": 0}, "greater than zero"),
        ({"amount": 2**256}, "below 2"),
        ({"amount": True}, "integer"),
        ({"amount": "1000"}, "integer"),
        ({"fee_bps": 10_001}, "feeBps"),
        ({"fee_bps": 2**16}, "feeBps"),
        ({"fee_bps": -1}, "feeBps"),
        ({"fee_bps": False}, "feeBps must be an integer"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": 2**64}, "deadline"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 3}, "number of attestors"),
        ({"threshold": True}, "threshold must be an integer"),
        ({"attestors": ()}, "1 to 32"),
        ({"attestors": [3, 9]}, "tuple"),
        ({"attestors": (3, 3)}, "distinct"),
        ({"attestors": (3, 2**64)}, "attestor id"),
        ({"attestors": (0, 3)}, "attestor id"),
        ({"attestors": (True, 3)}, "attestor id must be an integer"),
        ({"attestors": tuple(range(1, 34))}, "1 to 32"),
        ({"auto_release": 1}, "autoRelease"),
        ({"nonce": -1}, "nonce"),
        ({"nonce": 2**256}, "nonce"),
        ({"nonce": True}, "nonce must be an integer"),
        ({"expiry": 0}, "expiry"),
        ({"expiry": 2**64}, "expiry"),
        ({"seller": "0x" + "5e" * 19}, "not an address"),
        ({"seller": "seller.eth"}, "not an address"),
        ({"seller": 0x5E5E}, "must be a string"),
        ({"seller": "0x" + "0" * 40}, "zero address"),
        ({"key": ""}, "key must be 1 to 200"),
        ({"key": "k" * 201}, "key must be 1 to 200"),
        ({"key": "line\nbreak"}, "printable"),
        ({"delivery_ref": ""}, "deliveryRef"),
        ({"delivery_ref": "r" * 257}, "deliveryRef"),
    ],
)
def test_bad_create_fields_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        create_request(**changes)


def test_the_edges_of_the_create_ranges_are_accepted() -> None:
    request = create_request(
        amount=2**256 - 1,
        fee_bps=10_000,
        deadline=2**64 - 1,
        attestors=tuple(range(1, 33)),
        threshold=32,
        nonce=2**256 - 1,
        key="k" * 200,
        auto_release=False,
    )
    assert request.digest(CHAIN_ID, CONTRACT) == hand_digest(create_struct_hash(request))
    assert create_request(nonce=0, fee_bps=0).nonce == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"escrow_id": "0x" + "ab" * 31}, "escrowId"),
        ({"escrow_id": "ab" * 32}, "escrowId"),
        ({"escrow_id": b"\xab" * 32}, "escrowId"),
        ({"reason": ""}, "reason"),
        ({"reason": "   "}, "reason"),
        ({"reason": "r" * 1001}, "reason"),
        ({"reason": "bell\x07"}, "printable"),
        ({"nonce": -1}, "nonce"),
        ({"nonce": 1.0}, "nonce must be an integer"),
        ({"expiry": False}, "expiry must be an integer"),
    ],
)
def test_bad_dispute_fields_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        dispute_request(**changes)


@pytest.mark.parametrize(
    ("chain_id", "contract"),
    [(0, CONTRACT), (True, CONTRACT), (CHAIN_ID, "0x1234"), (CHAIN_ID, None)],
    ids=["chain-zero", "chain-bool", "short-contract", "no-contract"],
)
def test_a_bad_domain_is_refused(chain_id: Any, contract: Any) -> None:
    with pytest.raises(InvalidInput):
        create_request().digest(chain_id, contract)


def test_requests_are_frozen() -> None:
    request = create_request()
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.amount = 1  # type: ignore[misc]
