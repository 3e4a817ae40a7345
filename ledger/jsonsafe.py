"""JSON from outside, parsed with a bound on nesting that does not depend on the recursion limit.

py-evm and py-ecc raise Python's recursion limit to 100,000 when imported; the C JSON parser
then overflows the C stack on deeply nested input before it reaches that limit, which kills
the process. Nesting is therefore measured first, in C-speed regular expressions.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonTooDeep(ValueError):
    """The document nests arrays and objects deeper than allowed."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings do not count)."""
    brackets = _BRACKET.findall(_STRING.sub("", text))
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def loads(text: str, max_depth: int = MAX_DEPTH, **options: Any) -> Any:
    """``json.loads`` that first refuses documents nested deeper than ``max_depth``."""
    if nesting_depth(text) > max_depth:
        raise JsonTooDeep(f"JSON nested too deeply (more than {max_depth} levels)")
    return json.loads(text, **options)
