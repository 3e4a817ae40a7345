"""Posting commands: validation when built, and the content hash behind idempotency."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from ledger.commands import (
    KEY_MAX_CHARS,
    METADATA_MAX_BYTES,
    TIMEOUT_MAX_S,
    ChainRef,
    EntryResult,
    Leg,
    NewEntry,
    Resolve,
    Reverse,
)
from ledger.errors import InvalidInput
from ledger.money import UINT256_LIMIT

TX = "0x" + "ab" * 32
BLOCK = "0x" + "cd" * 32


def _entry(**overrides: Any) -> NewEntry:
    fields: dict[str, Any] = {
        "key": "k1",
        "legs": (Leg("alice", "bob", 10),),
        "kind": "transfer",
        "metadata": {"order": "o-1"},
    }
    fields.update(overrides)
    return NewEntry(**fields)


# --- Leg -------------------------------------------------------------------------------


def test_a_valid_leg_keeps_its_fields() -> None:
    leg = Leg("treasury", "fees:revenue", UINT256_LIMIT - 1, asset="TRACE", pending=True, timeout_s=60)
    assert (leg.debit, leg.credit, leg.amount, leg.asset, leg.pending, leg.timeout_s) == (
        "treasury",
        "fees:revenue",
        UINT256_LIMIT - 1,
        "TRACE",
        True,
        60,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"debit": "alice", "credit": "alice"}, "two different accounts"),
        ({"amount": 0}, "greater than zero"),
        ({"amount": -5}, "greater than zero"),
        ({"amount": UINT256_LIMIT}, "below 2\\^256"),
        ({"amount": True}, "integer number of base units"),
        ({"amount": 10.0}, "integer number of base units"),
        ({"amount": "10"}, "integer number of base units"),
        ({"debit": ""}, "account code"),
        ({"debit": " alice"}, "account code"),
        ({"credit": "bob smith"}, "account code"),
        ({"credit": "x" * 201}, "account code"),
        ({"credit": 7}, "account code"),
        ({"asset": "trace"}, "asset code"),
        ({"asset": "T"}, "asset code"),
        ({"pending": "yes"}, "pending must be true or false"),
        ({"timeout_s": 60}, "only to a pending transfer"),
        ({"pending": True, "timeout_s": 0}, "between 1 and"),
        ({"pending": True, "timeout_s": TIMEOUT_MAX_S + 1}, "between 1 and"),
        ({"pending": True, "timeout_s": 1.5}, "integer number of seconds"),
        ({"pending": True, "timeout_s": True}, "integer number of seconds"),
    ],
)
def test_leg_refuses_malformed_input(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"debit": "alice", "credit": "bob", "amount": 10}
    fields.update(kwargs)
    with pytest.raises(InvalidInput, match=message):
        Leg(**fields)


# --- NewEntry --------------------------------------------------------------------------


def test_a_valid_entry_has_canonical_metadata_and_a_hash() -> None:
    entry = _entry(metadata={"b": 1, "a": {"y": [1, "2"], "x": None}})
    assert entry.metadata_json == '{"a":{"x":null,"y":[1,"2"]},"b":1}'
    assert len(entry.content_hash) == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"key": ""}, "key must be"),
        ({"key": "k" * (KEY_MAX_CHARS + 1)}, "key must be"),
        ({"key": "line\nbreak"}, "key must be"),
        ({"key": 42}, "key must be"),
        ({"kind": "Transfer"}, "entry kind"),
        ({"kind": ""}, "entry kind"),
        ({"kind": "a" * 65}, "entry kind"),
        ({"legs": ()}, "at least one transfer"),
        ({"legs": [Leg("a", "b", 1)]}, "at least one transfer"),
        ({"legs": tuple(Leg("a", "b", 1) for _ in range(65))}, "at most 64"),
        (
            {"legs": (Leg("a", "b", 1, pending=True), Leg("a", "c", 1))},
            "must be the only transfer",
        ),
        (
            {"legs": (Leg("a", "b", 1), Leg("a", "c", 1, pending=True, timeout_s=5))},
            "must be the only transfer",
        ),
        ({"metadata": {"rate": 0.05}}, "floating-point"),
        ({"metadata": {"nested": [{"deep": [1.0]}]}}, "floating-point"),
        ({"metadata": {"nan": float("nan")}}, "floating-point"),
        ({"metadata": {1: "x"}}, "keys must be strings"),
        ({"metadata": ["not", "an", "object"]}, "JSON object"),
        ({"metadata": {"blob": "x" * METADATA_MAX_BYTES}}, "larger than"),
        ({"metadata": {"when": datetime.now(UTC)}}, "not plain JSON"),
        ({"metadata": {"nul": "a\x00b"}}, "NUL"),
        ({"effective_at": datetime(2026, 1, 1)}, "time zone"),  # naive on purpose
        ({"effective_at": "2026-01-01T00:00:00Z"}, "time zone"),
    ],
)
def test_new_entry_refuses_malformed_input(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _entry(**overrides)


def test_new_entry_takes_64_legs_and_deeply_nested_metadata_within_bounds() -> None:
    entry = _entry(legs=tuple(Leg("a", f"b{i}", 1) for i in range(64)))
    assert len(entry.legs) == 64
    nested: dict[str, Any] = {}
    node = nested
    for _ in range(30):
        node["n"] = {}
        node = node["n"]
    assert _entry(metadata=nested).metadata_json.count("{") == 31


def test_new_entry_refuses_metadata_nested_too_deeply() -> None:
    nested: dict[str, Any] = {}
    node = nested
    for _ in range(40):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(InvalidInput, match="nested too deeply"):
        _entry(metadata=nested)


def test_new_entry_refuses_legs_that_are_not_legs() -> None:
    with pytest.raises(InvalidInput):
        _entry(legs=({"debit": "a", "credit": "b", "amount": 1},))


def test_new_entry_refuses_metadata_that_is_not_utf8() -> None:
    with pytest.raises(InvalidInput):
        _entry(metadata={"name": "\ud800"})


# --- ChainRef --------------------------------------------------------------------------


def test_a_valid_chain_ref() -> None:
    ref = ChainRef(31337, TX, 0, 12, BLOCK)
    assert ref.as_list() == [31337, TX, 0, 12, BLOCK]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, TX, 0, 1, BLOCK), "chain_id must be positive"),
        ((-1, TX, 0, 1, BLOCK), "chain_id must be an integer"),
        ((1, TX, -1, 1, BLOCK), "log_index must be an integer"),
        ((1, TX, 2**31, 1, BLOCK), "log_index must be an integer"),  # the column is an integer
        ((1, TX, 0, True, BLOCK), "block_number must be an integer"),
        ((1, TX, 0, 2**63, BLOCK), "block_number must be an integer"),
        ((1, TX.upper().replace("0X", "0x"), 0, 1, BLOCK), "64 lower-case hex"),
        ((1, TX[:-2], 0, 1, BLOCK), "64 lower-case hex"),
        ((1, TX, 0, 1, "cd" * 32), "64 lower-case hex"),
    ],
)
def test_chain_ref_refuses_malformed_input(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ChainRef(*args)


def test_chain_ref_takes_the_largest_values_the_database_stores() -> None:
    ref = ChainRef(2**63 - 1, TX, 2**31 - 1, 2**63 - 1, BLOCK)
    assert ref.as_list()[:4] == [2**63 - 1, TX, 2**31 - 1, 2**63 - 1]


# --- Resolve and Reverse ---------------------------------------------------------------


def test_resolve_kinds() -> None:
    assert Resolve("r1", "h1", "post").kind == "post_pending"
    assert Resolve("r1", "h1", "post", amount=5).amount == 5
    assert Resolve("r1", "h1", "void").kind == "void_pending"
    assert Resolve("r1", "h1", "expire").kind == "expire"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"action": "cancel"}, "post, void or expire"),
        ({"action": "void", "amount": 5}, "only a post may name an amount"),
        ({"action": "expire", "amount": 5}, "only a post may name an amount"),
        ({"amount": 0}, "greater than zero"),
        ({"amount": UINT256_LIMIT}, "below 2\\^256"),
        ({"pending_key": ""}, "pending_key must be"),
        ({"key": "\t"}, "key must be"),
        ({"metadata": {"x": 1.5}}, "floating-point"),
    ],
)
def test_resolve_refuses_malformed_input(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"key": "r1", "pending_key": "h1", "action": "post"}
    fields.update(kwargs)
    with pytest.raises(InvalidInput, match=message):
        Resolve(**fields)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"entry_key": ""}, "entry_key must be"),
        ({"key": "x" * (KEY_MAX_CHARS + 1)}, "key must be"),
        ({"metadata": {"why": [0.1]}}, "floating-point"),
    ],
)
def test_reverse_refuses_malformed_input(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"key": "rev1", "entry_key": "e1"}
    fields.update(kwargs)
    with pytest.raises(InvalidInput, match=message):
        Reverse(**fields)


def test_reverse_kind() -> None:
    assert Reverse("rev1", "e1").kind == "reversal"


# --- content hash ----------------------------------------------------------------------


def test_equal_content_hashes_equal_whatever_the_key_or_metadata_order() -> None:
    when = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    chain = ChainRef(1, TX, 3, 100, BLOCK)
    a = _entry(key="k1", metadata={"a": 1, "b": "2"}, effective_at=when, chain=chain)
    b = _entry(key="k2", metadata={"b": "2", "a": 1}, effective_at=when, chain=chain)
    assert a.content_hash == b.content_hash
    assert Resolve("r1", "h", "post", 5).content_hash == Resolve("r2", "h", "post", 5).content_hash
    assert Reverse("x1", "e").content_hash == Reverse("x2", "e").content_hash


@pytest.mark.parametrize(
    "overrides",
    [
        {"legs": (Leg("alice", "bob", 11),)},
        {"legs": (Leg("bob", "alice", 10),)},
        {"legs": (Leg("alice", "carol", 10),)},
        {"legs": (Leg("alice", "bob", 10, asset="TRACE"),)},
        {"legs": (Leg("alice", "bob", 10, pending=True),)},
        {"legs": (Leg("alice", "bob", 10, pending=True, timeout_s=30),)},
        {"legs": (Leg("alice", "bob", 10), Leg("alice", "bob", 10))},
        {"kind": "payment"},
        {"metadata": {"order": "o-2"}},
        {"metadata": {}},
        {"effective_at": datetime(2026, 3, 1, tzinfo=UTC)},
        {"chain": ChainRef(1, TX, 3, 100, BLOCK)},
    ],
)
def test_different_content_hashes_differently(overrides: dict[str, Any]) -> None:
    assert _entry(**overrides).content_hash != _entry().content_hash


def test_leg_order_is_part_of_the_content() -> None:
    first, second = Leg("a", "b", 1), Leg("c", "d", 2)
    assert _entry(legs=(first, second)).content_hash != _entry(legs=(second, first)).content_hash


def test_chain_refs_that_differ_in_any_field_hash_differently() -> None:
    base = ChainRef(1, TX, 3, 100, BLOCK)
    variants = [
        ChainRef(2, TX, 3, 100, BLOCK),
        ChainRef(1, "0x" + "ef" * 32, 3, 100, BLOCK),
        ChainRef(1, TX, 4, 100, BLOCK),
        ChainRef(1, TX, 3, 101, BLOCK),
        ChainRef(1, TX, 3, 100, "0x" + "01" * 32),
    ]
    hashes = {_entry(chain=c).content_hash for c in [base, *variants]}
    assert len(hashes) == 6


def test_resolve_and_reverse_content_differs_by_action_amount_and_target() -> None:
    hashes = {
        Resolve("r", "h1", "post").content_hash,
        Resolve("r", "h1", "post", amount=5).content_hash,
        Resolve("r", "h1", "post", amount=6).content_hash,
        Resolve("r", "h1", "void").content_hash,
        Resolve("r", "h1", "expire").content_hash,
        Resolve("r", "h2", "void").content_hash,
        Resolve("r", "h1", "void", metadata={"why": "x"}).content_hash,
        Reverse("r", "h1").content_hash,
        Reverse("r", "h2").content_hash,
    }
    assert len(hashes) == 9


def test_the_same_instant_in_another_time_zone_is_the_same_content() -> None:
    # A retry that writes the same instant with another offset is the same entry, not a conflict.
    utc = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    plus_one = utc.astimezone(timezone(timedelta(hours=1)))
    assert utc == plus_one
    assert _entry(effective_at=utc).content_hash == _entry(effective_at=plus_one).content_hash
    later = utc + timedelta(seconds=1)
    assert _entry(effective_at=utc).content_hash != _entry(effective_at=later).content_hash


def test_entry_result_as_dict() -> None:
    assert EntryResult("k", "created", 7).as_dict() == {"key": "k", "status": "created", "entry_id": 7}
    assert EntryResult("k", "rejected", None, "exceeds_credits", "too much").as_dict() == {
        "key": "k",
        "status": "rejected",
        "code": "exceeds_credits",
        "reason": "too much",
    }
