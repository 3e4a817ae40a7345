"""`tracechain bench ledger --quick --json` runs end to end and leaves no scratch database.

A benchmark is not a timed test: this checks that the figures exist and are honest (books
balanced, counts matching the rows), never how large they are.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from admin_api.bench import bench
from admin_api.bench.ledger import SCRATCH_PREFIX
from tests.bench_runs import scratch_databases

FIGURES = (
    "engine_tps",
    "baseline_tps",
    "ratio",
    "hot_engine_tps",
    "hot_baseline_tps",
    "hot_ratio",
    "api_p50_ms",
    "api_p99_ms",
)


@pytest.mark.slow
def test_quick_json_run_reports_every_figure_and_drops_its_database(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACE_DATABASE_URL", pg_server_url)

    result = CliRunner().invoke(bench, ["ledger", "--quick", "--json"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    for key in FIGURES:
        value = report[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)
    assert report["check_ok"] is True
    assert report["counts_ok"] is True
    assert report["baseline_ok"] is True
    assert report["mode"] == "quick"
    assert report["api_mode"] in ("gunicorn", "test_client")
    assert report["api_p50_ms"] <= report["api_p99_ms"]
    # Every transfer counted was found in the books, and the books hold nothing else.
    phases = report["phases"]
    by_kind = report["entries_by_kind"]
    assert by_kind["bench.random"] == (
        phases["random_engine"]["created"] + phases["random_engine_single_entry"]["created"]
    )
    assert by_kind["bench.hot"] == phases["hot_engine"]["created"]
    assert report["baseline_transfers"] == (
        phases["random_baseline"]["created"] + phases["hot_baseline"]["created"]
    )
    assert by_kind["bench.api"] == report["api"]["requests"]

    assert report["scratch_database"].startswith(SCRATCH_PREFIX)
    assert report["scratch_database"] not in scratch_databases(pg_server_url)


def test_scratch_database_is_dropped_when_the_run_fails(pg_server_url: str) -> None:
    from admin_api.bench.ledger import scratch_database

    created: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), scratch_database(pg_server_url) as url:
        created.append(url.rsplit("/", 1)[-1])
        assert created[0] in scratch_databases(pg_server_url)
        raise RuntimeError("boom")
    assert created and created[0].startswith(SCRATCH_PREFIX)
    assert created[0] not in scratch_databases(pg_server_url)
