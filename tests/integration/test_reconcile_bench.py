"""`tracechain bench reconcile` runs end to end on a tiny size, as a user runs it: every injected
break is found, none is invented, and its scratch database is gone afterwards."""

from __future__ import annotations

from pathlib import Path

from admin_api.bench.ledger import SCRATCH_PREFIX
from tests.bench_runs import bench_json, scratch_databases


def test_the_reconcile_bench_finds_every_injected_break(pg_server_url: str, tmp_path: Path) -> None:
    report = bench_json(["reconcile", "--transfers", "3000"], pg_server_url, tmp_path)
    assert report["transfers"] == 3000
    # Ledger-only transfers are classified as well as the ones the chain has.
    assert report["transfers_classified"] >= 3000
    assert report["injected_breaks"] == report["found_breaks"] > 0
    assert (report["missed_breaks"], report["false_breaks"]) == (0, 0)
    assert report["transfers_per_s"] > 0
    assert report["baseline_transfers_per_s"] > 0
    assert report["scratch_database"].startswith(SCRATCH_PREFIX)
    assert report["scratch_database"] not in scratch_databases(pg_server_url)
