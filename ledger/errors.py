"""Domain errors with stable codes; the API and CLI map them to responses once."""

from __future__ import annotations


class LedgerError(Exception):
    """A request the ledger refuses. ``code`` is stable and machine-readable."""

    status = 422

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(LedgerError):
    """Malformed input: nothing was looked up or written."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__("invalid_input", message)


class NotFound(LedgerError):
    """A named asset, account or entry does not exist."""

    status = 404


class Conflict(LedgerError):
    """The request contradicts what the ledger already holds (idempotency, duplicates)."""

    status = 409
