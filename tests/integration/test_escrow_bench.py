"""`tracechain bench escrow` runs end to end, on a tiny size, as a user runs it (a process of its
own that starts anvil, the scratch database on the test server, a private embedded Redis and the
worker processes, then stops them all).

A benchmark is not a timed test: this checks that it prints one JSON object whose figures exist,
agree with each other and with the sizes asked for, that every check of the books against the
chain passed, and that nothing it started is left behind (scratch database, directory,
processes); never how large the figures are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from admin_api.bench.escrow import ATTESTERS, QUICK, TARGET_ESCROWS_PER_S
from admin_api.bench.ledger import SCRATCH_PREFIX
from tests.bench_runs import bench_json, positive_number, scratch_databases

ESCROWS = 12
SAMPLE = 1
CHECKS = {
    "all_released",
    "outbox_confirmed",
    "sellers_paid",
    "fees_paid",
    "mirrors_match",
    "holds_closed",
    "no_exceptions",
    "books_balanced",
}


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment mention ``text`` (ours are readable)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                if text.encode() in (proc / part).read_bytes():
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def report(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``tracechain bench escrow --quick --json`` on a tiny size, run once for the module: the one
    JSON object it printed."""
    tmp_path = tmp_path_factory.mktemp("escrow-bench")
    parsed = bench_json(
        ["escrow", "--quick", "--escrows", str(ESCROWS), "--sample", str(SAMPLE)],
        pg_server_url,
        tmp_path / "data",
        # The bench's own scratch directory (workers' logs, the embedded Redis) goes here.
        {"TMPDIR": str(tmp_path)},
    )
    # Stopped and removed: no scratch directory, no process started from it, no scratch database.
    assert list(tmp_path.glob("tracechain-bench-escrow-*")) == []
    assert _processes_mentioning(str(tmp_path)) == []
    assert parsed["scratch_database"].startswith(SCRATCH_PREFIX)
    assert parsed["scratch_database"] not in scratch_databases(pg_server_url)
    return parsed


def test_escrow_bench_settles_every_escrow_and_the_books_follow_the_chain(report: dict[str, Any]) -> None:
    assert report["escrows"] == ESCROWS
    assert report["baseline_escrows"] == SAMPLE
    assert report["mode"] == "quick"
    assert report["redis"] == "embedded"
    assert report["attesters"] == ATTESTERS
    assert report["confirmations"] == 1
    assert report["block_time_s"] == 1
    assert report["worker_settings"]["confirmations"] == "1"

    # Every check of the books against the chain passed, and each is reported.
    assert set(report["checks"]) == CHECKS
    assert all(report["checks"][name] is True for name in CHECKS), report["checks"]
    assert report["checks_ok"] is True

    escrows_per_s = positive_number(report, "escrows_per_s")
    baseline = positive_number(report, "baseline_escrows_per_s")
    for key in ("seconds", "baseline_seconds", "ratio", "duration_s", "verify_ratio"):
        positive_number(report, key)
    assert report["escrows_per_s"] == pytest.approx(ESCROWS / report["seconds"], rel=0.01)
    assert report["baseline_escrows_per_s"] == pytest.approx(SAMPLE / report["baseline_seconds"], rel=0.01)
    assert report["ratio"] == pytest.approx(escrows_per_s / baseline, rel=0.02)
    assert report["targets"] == {"escrows_per_s_50": escrows_per_s >= TARGET_ESCROWS_PER_S}
    assert report["fund_gas_limit"] > 21_000


def test_escrow_bench_reports_consistent_verify_timings_and_stages(report: dict[str, Any]) -> None:
    verify = report["verify_ms_p50"]
    assert set(verify) == {"blst", "milagro", "py_ecc"}
    assert all(isinstance(v, float) and v > 0 for v in verify.values()), verify
    assert report["verify_ratio"] == pytest.approx(verify["py_ecc"] / verify["blst"], rel=0.05)
    # Samples are capped by the escrows the run made (the measured ones and the baseline's).
    assert report["verify_samples"] == {
        "blst": min(QUICK.fast_samples, ESCROWS + SAMPLE),
        "milagro": min(QUICK.fast_samples, ESCROWS + SAMPLE),
        "py_ecc": min(QUICK.py_ecc_samples, ESCROWS + SAMPLE),
    }
    attest = report["attest_ms_p50"]
    assert set(attest) == {"first", "second"}
    assert all(v > 0 for v in attest.values()), attest

    # Each measured escrow went funded -> releasing -> released, its release posted, in that order.
    stages = report["stages"]
    assert set(stages) == {"funded", "releasing", "released", "posted"}
    for step in stages.values():
        assert 0 < step["p50_s"] <= step["last_s"], stages
    assert stages["funded"]["last_s"] <= stages["releasing"]["last_s"] <= stages["released"]["last_s"]
    # A fund transaction's block, its confirmation, the release's block and its confirmation.
    assert report["blocks"] >= 4
