"""Amounts: parsing base-unit strings, and exact conversion to and from display decimals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.errors import InvalidInput
from ledger.money import UINT256_LIMIT, check_amount, from_display, parse_amount, to_display

MAX_AMOUNT = UINT256_LIMIT - 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", 1),
        ("1000", 1000),
        # Leading zeros are accepted (the digits still name one integer) and normalised away.
        ("01", 1),
        ("0000000000000000000000000000000000000000000000000000000000000000000000000007", 7),
        (str(MAX_AMOUNT), MAX_AMOUNT),
    ],
)
def test_parse_amount_accepts_base_unit_digits(raw: str, expected: int) -> None:
    assert parse_amount(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "0",
        "00",
        "-1",
        "+1",
        "1.5",
        "1e3",
        " 1",
        "1 ",
        "1\n",
        "",
        "1_000",
        "0x10",
        "١٢",  # non-ASCII digits: int() would take them, the ledger does not
        str(UINT256_LIMIT),
        str(UINT256_LIMIT + 1),
        "9" * 79,
        "0" + str(MAX_AMOUNT),  # 79 characters, even though the value is in range
    ],
)
def test_parse_amount_refuses_everything_else(raw: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_amount(raw)
    assert info.value.code == "invalid_input"
    assert info.value.status == 400


@pytest.mark.parametrize("raw", [1, 1.0, True, False, None, b"1", ["1"]])
def test_parse_amount_refuses_non_strings(raw: object) -> None:
    with pytest.raises(InvalidInput, match="string of base-unit digits"):
        parse_amount(raw)


def test_parse_amount_names_the_field_in_its_error() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_amount("-3", what="fee")
    assert info.value.message.startswith("fee must")


@pytest.mark.parametrize("value", [0, -1, UINT256_LIMIT, True, 1.0, "1", None])
def test_check_amount_refuses_out_of_range_and_non_ints(value: object) -> None:
    with pytest.raises(InvalidInput):
        check_amount(value)  # type: ignore[arg-type]


def test_check_amount_accepts_the_uint256_range() -> None:
    assert check_amount(1) == 1
    assert check_amount(MAX_AMOUNT) == MAX_AMOUNT


@pytest.mark.parametrize(
    ("amount", "scale", "text"),
    [
        (1, 18, "0.000000000000000001"),
        (10**18, 18, "1.000000000000000000"),
        (12_500_000_000_000_000_000, 18, "12.500000000000000000"),
        (
            MAX_AMOUNT,
            18,
            "115792089237316195423570985008687907853269984665640564039457.584007913129639935",
        ),
        (5, 0, "5"),
        (0, 2, "0.00"),
        (-1, 2, "-0.01"),
        (-12345, 2, "-123.45"),
    ],
)
def test_to_display_is_exact(amount: int, scale: int, text: str) -> None:
    assert to_display(amount, scale) == text


@pytest.mark.parametrize(
    ("text", "scale", "amount"),
    [
        ("1", 18, 10**18),
        ("12.5", 18, 12_500_000_000_000_000_000),
        ("0.000000000000000001", 18, 1),
        ("1.50", 1, 15),  # trailing zeros beyond the scale lose nothing
        (
            "115792089237316195423570985008687907853269984665640564039457.584007913129639935",
            18,
            MAX_AMOUNT,
        ),
        (str(MAX_AMOUNT), 0, MAX_AMOUNT),
    ],
)
def test_from_display_is_exact(text: str, scale: int, amount: int) -> None:
    assert from_display(text, scale) == amount


@pytest.mark.parametrize(
    ("text", "scale"),
    [
        ("0.0000000000000000001", 18),  # a 19th decimal is never rounded away
        ("1.05", 1),
        ("0.5", 0),
        # One base unit past uint256: 28-digit default Decimal precision would round this silently.
        ("115792089237316195423570985008687907853269984665640564039457.584007913129639936", 18),
        ("0", 18),
        ("-1", 18),
        ("NaN", 18),
        ("Infinity", 18),
        ("twelve", 18),
        ("", 18),
    ],
)
def test_from_display_refuses_extra_decimals_and_out_of_range(text: str, scale: int) -> None:
    with pytest.raises(InvalidInput):
        from_display(text, scale)


def test_from_display_refuses_floats() -> None:
    with pytest.raises(InvalidInput):
        from_display(1.5, 18)  # type: ignore[arg-type]


@given(amount=st.integers(min_value=1, max_value=MAX_AMOUNT), scale=st.integers(min_value=0, max_value=36))
def test_display_round_trip_is_exact(amount: int, scale: int) -> None:
    text = to_display(amount, scale)
    assert from_display(text, scale) == amount
    # The number of decimals shown is exactly the asset's scale.
    assert (len(text.partition(".")[2])) == scale


@pytest.mark.parametrize("text", [" 1", "1 ", "1_0.5", "1e3", "+1", "-1", ".5", "1.", "", "\u0661"])
def test_from_display_takes_only_plain_decimals(text: str) -> None:
    with pytest.raises(InvalidInput):
        from_display(text, 18)
