"""Points -> TRACE conversion: floor for the payout, the fewest points that pay it, exact."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ledger.errors import InvalidInput, LedgerError
from ledger.points.claims import convert

TRACE = 10**18


@pytest.mark.parametrize(
    ("points", "rate", "paid", "cost"),
    [
        (100, "100", TRACE, 100),  # 100 points per TRACE
        (150, "100", 15 * 10**17, 150),
        (1, "3", 333_333_333_333_333_333, 1),  # a third of a TRACE, rounded down
        (2, "3", 666_666_666_666_666_666, 2),
        (3, "3", TRACE, 3),
        (1, "0.5", 2 * TRACE, 1),  # half a point per TRACE
        (7, "2.5", 28 * 10**17, 7),
        (10**30, "1", 10**48, 10**30),
    ],
)
def test_a_claim_pays_the_floor_and_consumes_the_points_that_pay_it(
    points: int, rate: str, paid: int, cost: int
) -> None:
    assert convert(points, Decimal(rate)) == (paid, cost)


def test_points_that_pay_less_than_the_last_unit_stay_as_points() -> None:
    # 3 * 10^18 points per TRACE: one point pays a third of a base unit.
    per_trace = Decimal(3 * TRACE)
    assert convert(4, per_trace) == (1, 3)  # pays 1 base unit, costs 3 points, 1 point stays
    with pytest.raises(LedgerError, match="less than one base unit"):
        convert(2, per_trace)


@pytest.mark.parametrize("points", [0, -1, 2**256, True, "5"])
def test_a_claim_of_no_or_impossible_points_is_refused(points: object) -> None:
    with pytest.raises(InvalidInput):
        convert(points, Decimal(100))  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [Decimal(0), Decimal(-1), Decimal("NaN"), Decimal("Infinity")])
def test_an_unusable_rate_is_refused(rate: Decimal) -> None:
    with pytest.raises(InvalidInput):
        convert(10, rate)


def test_a_payout_beyond_uint256_is_refused() -> None:
    with pytest.raises(InvalidInput, match="2\\^256"):
        convert(2**255, Decimal("0.001"))
