"""The books of the TRACE economy: the double-entry ledger engine and its domain services."""
