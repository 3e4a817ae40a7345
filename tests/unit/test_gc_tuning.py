"""Every `tracechain` process sets the youngest generation's collection threshold from
TRACE_GC_GEN0_THRESHOLD before it does anything else; the older generations keep their ratios."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from admin_api.cli import main
from ledger.posting import tune_gc


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_tune_gc_sets_the_youngest_generation_only(thresholds: tuple[int, int, int]) -> None:
    tune_gc(12_345)
    assert gc.get_threshold() == (12_345, thresholds[1], thresholds[2])


def test_the_command_line_applies_the_setting_first(thresholds: tuple[int, int, int]) -> None:
    result = CliRunner().invoke(main, ["db", "--help"], env={"TRACE_GC_GEN0_THRESHOLD": "4321"})
    assert result.exit_code == 0, result.output
    assert gc.get_threshold()[0] == 4321
    refused = CliRunner().invoke(main, ["db", "--help"], env={"TRACE_GC_GEN0_THRESHOLD": "7"})
    assert refused.exit_code == 2 and "TRACE_GC_GEN0_THRESHOLD" in refused.output
