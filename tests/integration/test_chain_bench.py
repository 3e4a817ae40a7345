"""`tracechain bench indexer` and `tracechain bench sender` run end to end, on tiny sizes, as a user
runs them (a process of their own, anvil started by the command, a scratch database on the test
server).

A benchmark is not a timed test: this checks that each prints one JSON object whose figures
exist, agree with each other and with the sizes asked for, that the command's own checks of the
books and the chain passed, and that no scratch database is left behind; never how large the
figures are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from admin_api.bench.chain import ESCROW_EVERY
from admin_api.bench.ledger import SCRATCH_PREFIX

BIN = Path(sys.executable).parent


def _scratch_databases(server_url: str) -> set[str]:
    with psycopg.connect(server_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (SCRATCH_PREFIX,)
        ).fetchall()
    return {str(r[0]) for r in rows}


def _bench(args: list[str], server_url: str, data_dir: Path) -> dict[str, Any]:
    """Run ``tracechain bench ARGS --json``; the one JSON object it printed on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | {
        "TRACE_DATABASE_URL": server_url,
        "TRACE_DATA_DIR": str(data_dir),
        "TRACE_LOG_LEVEL": "WARNING",
    }
    result = subprocess.run(
        [str(BIN / "tracechain"), "bench", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return report


def _positive_number(report: dict[str, Any], key: str) -> float:
    value = report[key]
    assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
    assert value > 0, (key, value)
    return float(value)


def test_indexer_bench_indexes_every_generated_log_and_books_the_escrow_ones(
    pg_server_url: str, tmp_path: Path
) -> None:
    logs = 600  # two fan-out transactions of at most 500 transfers
    report = _bench(["indexer", "--logs", str(logs)], pg_server_url, tmp_path)

    for key in ("logs_per_s", "seconds", "generation_s", "duration_s"):
        _positive_number(report, key)
    assert report["transfers"] == logs
    assert report["escrow_transfers"] == logs // ESCROW_EVERY
    # Every fan-out transfer, the mint into the fan-out contract and the deployment's role grants.
    assert report["events_stored"] > logs
    # Each transfer into the escrow moved its custody mirror, against suspense, for finance to explain.
    assert report["entries_booked"] == report["escrow_transfers"]
    assert report["exceptions_raised"] == report["escrow_transfers"]
    assert report["mirror_ok"] is True
    assert report["events_ok"] is True
    assert report["blocks"] >= 2
    assert report["runs"] >= 1 and report["windows"] >= 1
    assert report["confirmations"] == 0
    assert report["logs_per_s"] == pytest.approx(report["events_stored"] / report["seconds"], rel=0.01)
    assert report["mode"] == "full"
    assert isinstance(report["targets_met"]["logs_per_s"], bool)

    assert report["scratch_database"].startswith(SCRATCH_PREFIX)
    assert report["scratch_database"] not in _scratch_databases(pg_server_url)


def test_sender_bench_confirms_every_transfer_and_compares_with_one_by_one_sending(
    pg_server_url: str, tmp_path: Path
) -> None:
    report = _bench(
        ["sender", "--txs", "12", "--sample", "2", "--block-time", "0.2"], pg_server_url, tmp_path
    )

    tx_per_s = _positive_number(report, "tx_per_s")
    baseline = _positive_number(report, "baseline_tx_per_s")
    for key in ("seconds", "baseline_seconds", "ratio", "duration_s"):
        _positive_number(report, key)
    assert report["txs"] == 12
    assert report["baseline_txs"] == 2
    assert report["block_time_s"] == 0.2
    assert report["confirmations"] == 1
    # Every row confirmed on its own consecutive nonce, each transfer paid once, holds posted, books balanced.
    assert report["counts_ok"] is True
    assert report["check_ok"] is True
    assert report["passes"] >= 1
    assert report["blocks"] >= 1
    assert report["gas_limit"] >= 21_000
    assert report["tx_per_s"] == pytest.approx(report["txs"] / report["seconds"], rel=0.01)
    assert report["ratio"] == pytest.approx(tx_per_s / baseline, rel=0.01)
    assert set(report["targets_met"]) == {"tx_per_s", "ratio"}

    assert report["scratch_database"].startswith(SCRATCH_PREFIX)
    assert report["scratch_database"] not in _scratch_databases(pg_server_url)
