"""Deeply nested JSON is refused before the C parser can overflow the stack, whatever the
recursion limit (py-evm and py-ecc raise it to 100,000 on import)."""

from __future__ import annotations

import sys

import pytest

from ledger import jsonsafe


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert jsonsafe.nesting_depth('{"a": [1, {"b": "[[[[{{"}]}') == 3
    assert jsonsafe.nesting_depth('"\\"[[["') == 0
    assert jsonsafe.nesting_depth("17") == 0


def test_a_document_nested_too_deeply_is_refused_even_with_a_huge_recursion_limit() -> None:
    import py_ecc  # noqa: F401 - raises the recursion limit, as in every worker process

    assert sys.getrecursionlimit() >= 100_000
    with pytest.raises(jsonsafe.JsonTooDeep):
        jsonsafe.loads("[" * 200_000 + "]" * 200_000)
    with pytest.raises(jsonsafe.JsonTooDeep):
        jsonsafe.loads('{"a":' * 65 + "1" + "}" * 65)
    assert jsonsafe.loads('{"a":' * 64 + "1" + "}" * 64) is not None
