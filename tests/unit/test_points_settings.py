"""The points settings: the claim rate is a Decimal read exactly, the sweep interval a number."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ledger.settings import Settings, SettingsError, load_settings


def test_the_points_settings_and_their_defaults() -> None:
    assert (Settings().points_per_trace, Settings().points_expiry_interval_s) == (Decimal(100), 300.0)
    settings = load_settings({"TRACE_POINTS_PER_TRACE": "2.5", "TRACE_POINTS_EXPIRY_INTERVAL_S": "60"})
    assert (settings.points_per_trace, settings.points_expiry_interval_s) == (Decimal("2.5"), 60.0)
    # Every digit is kept: no float, no 28-digit rounding.
    long = "1234567890.12345678901234567890123456789"
    assert load_settings({"TRACE_POINTS_PER_TRACE": long}).points_per_trace == Decimal(long)
    assert load_settings({"TRACE_POINTS_PER_TRACE": ""}) == Settings()


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "NaN", "Infinity", "1e40", "1,5"])
def test_an_unusable_claim_rate_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="TRACE_POINTS_PER_TRACE"):
        load_settings({"TRACE_POINTS_PER_TRACE": raw})
