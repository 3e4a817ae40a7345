"""Amounts: Python ints of base units, strictly inside (0, 2^256)."""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, Decimal, InvalidOperation, localcontext

from ledger.errors import InvalidInput

UINT256_LIMIT = 2**256
_BASE_UNITS = re.compile(r"^[0-9]{1,78}$")
# What Decimal() would also take (spaces, underscores, exponents, signs) is refused here.
_DISPLAY = re.compile(r"^[0-9]{1,78}(\.[0-9]{1,78})?$")


def check_amount(value: int, *, what: str = "amount") -> int:
    """Return ``value`` if it is a valid transfer amount, else raise InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer number of base units")
    if value <= 0:
        raise InvalidInput(f"{what} must be greater than zero, got {value}")
    if value >= UINT256_LIMIT:
        raise InvalidInput(f"{what} must be below 2^256")
    return value


def parse_amount(raw: object, *, what: str = "amount") -> int:
    """Parse a decimal string of base units ("1000") into an int; reject everything else."""
    if isinstance(raw, bool) or not isinstance(raw, str):
        raise InvalidInput(f"{what} must be a string of base-unit digits, got {type(raw).__name__}")
    if not _BASE_UNITS.fullmatch(raw):
        raise InvalidInput(f"{what} must be a string of base-unit digits, got {raw[:90]!r}")
    return check_amount(int(raw), what=what)


def to_display(amount: int, scale: int) -> str:
    """Format base units as a decimal string with ``scale`` places (exact, no float)."""
    sign = "-" if amount < 0 else ""
    digits = str(abs(amount)).rjust(scale + 1, "0")
    if scale == 0:
        return sign + digits
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def from_display(text: str, scale: int) -> int:
    """Parse "12.5" into base units; refuses more decimals than ``scale`` (no silent rounding)."""
    if not isinstance(text, str):
        raise InvalidInput("a display amount must be a decimal string, never a float")
    if not _DISPLAY.fullmatch(text):
        raise InvalidInput(f"not a plain decimal number (digits, one optional point): {text[:90]!r}")
    with localcontext() as ctx:
        ctx.prec = 120
        try:
            value = Decimal(text)
        except InvalidOperation as exc:
            raise InvalidInput(f"not a decimal number: {text[:90]!r}") from exc
        if not value.is_finite():
            raise InvalidInput("amount must be finite")
        scaled = value.scaleb(scale)
        whole = scaled.to_integral_value(rounding=ROUND_DOWN)
        if whole != scaled:
            raise InvalidInput(f"{text!r} has more than {scale} decimal places")
        return check_amount(int(whole))
