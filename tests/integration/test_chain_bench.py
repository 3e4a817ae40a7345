"""`tracechain bench indexer` and `tracechain bench sender` run end to end, on tiny sizes, as a user
runs them (a process of their own, anvil started by the command, a scratch database on the test
server).

A benchmark is not a timed test: this checks that each prints one JSON object whose figures
exist, agree with each other and with the sizes asked for, that the command's own checks of the
books and the chain passed, and that no scratch database is left behind; never how large the
figures are.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from admin_api.bench.chain import ESCROW_EVERY
from admin_api.bench.ledger import SCRATCH_PREFIX
from tests.bench_runs import bench_json, positive_number, scratch_databases


def test_indexer_bench_indexes_every_generated_log_and_books_the_escrow_ones(
    pg_server_url: str, tmp_path: Path
) -> None:
    logs = 600  # two fan-out transactions of at most 500 transfers
    report = bench_json(["indexer", "--logs", str(logs)], pg_server_url, tmp_path)

    for key in ("logs_per_s", "seconds", "generation_s", "duration_s"):
        positive_number(report, key)
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
    assert report["scratch_database"] not in scratch_databases(pg_server_url)


def test_sender_bench_confirms_every_transfer_and_compares_with_one_by_one_sending(
    pg_server_url: str, tmp_path: Path
) -> None:
    report = bench_json(
        ["sender", "--txs", "12", "--sample", "2", "--block-time", "0.2"], pg_server_url, tmp_path
    )

    tx_per_s = positive_number(report, "tx_per_s")
    baseline = positive_number(report, "baseline_tx_per_s")
    for key in ("seconds", "baseline_seconds", "ratio", "duration_s"):
        positive_number(report, key)
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
    assert report["scratch_database"] not in scratch_databases(pg_server_url)
