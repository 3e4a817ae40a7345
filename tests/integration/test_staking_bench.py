"""`tracechain bench staking` runs, on a tiny size, as a user runs it (a process of its own with a
scratch database on the test server, dropped afterwards).

A benchmark is not a timed test: this checks that it prints one JSON object whose figures exist
and agree with each other and with the sizes asked for, and that its checks of the books passed;
never how large the figures are.
"""

from __future__ import annotations

from pathlib import Path

from tests.bench_runs import bench_json, positive_number, scratch_databases


def test_the_staking_bench_prints_its_figures_and_checks(pg_server_url: str, tmp_path: Path) -> None:
    before = scratch_databases(pg_server_url)
    report = bench_json(
        ["staking", "--small", "20", "--large", "300", "--ticks", "5", "--queries", "30"],
        pg_server_url,
        tmp_path,
    )
    assert report["stakers"] == {"small": 20, "large": 300}
    assert (report["ticks"], report["queries"]) == (5, 30)
    for name in ("tick_ms_1k", "tick_ms_100k", "query_p50_ms", "query_p99_ms"):
        positive_number(report, name)
    assert abs(report["tick_ratio"] - report["tick_ms_100k"] / report["tick_ms_1k"]) < 0.01
    assert report["query_p50_ms"] <= report["query_p99_ms"]
    assert report["checks"] == {"conserved": True, "books_balanced": True}
    assert report["targets"] == {"tick_ratio": 1.5, "query_p99_ms": 5.0}
    assert scratch_databases(pg_server_url) == before
