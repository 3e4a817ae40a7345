"""Fixtures of the tests against a real node: one anvil process per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contracts.anvil import AnvilNode, start_anvil


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilNode]:
    """A fresh anvil node (chain 31337, ten funded dev accounts, a block per transaction)."""
    with start_anvil() as node:
        yield node
