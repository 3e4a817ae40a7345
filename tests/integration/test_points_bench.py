"""`tracechain bench points` runs end to end on a tiny size, as a user runs it (a process of its
own that starts the scratch database on the test server, a private embedded Redis and the worker
processes, then stops them all). Not a timed test: the figures must exist and agree with each
other and with the sizes asked for, every check must pass, nothing may be left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from admin_api.bench.ledger import SCRATCH_PREFIX
from admin_api.bench.points import TARGET_EVENTS_PER_S
from tests.bench_runs import bench_json, positive_number, scratch_databases

EVENTS = 2_500
PARTICIPANTS = 40
CHECKS = {"every_event_once", "accounts_match_events", "caps_held", "lots_match_accounts", "books_balanced"}


@pytest.fixture(scope="module")
def report(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path: Path = tmp_path_factory.mktemp("points-bench")
    parsed = bench_json(
        ["points", "--quick", "--events", str(EVENTS), "--participants", str(PARTICIPANTS), "--workers", "1"],
        pg_server_url,
        tmp_path / "data",
        {"TMPDIR": str(tmp_path)},
    )
    assert list(tmp_path.glob("tracechain-bench-points-*")) == []
    assert parsed["scratch_database"].startswith(SCRATCH_PREFIX)
    assert parsed["scratch_database"] not in scratch_databases(pg_server_url)
    return parsed


def test_points_bench_accrues_every_event_once_and_the_books_agree(report: dict[str, Any]) -> None:
    assert (report["events"], report["accrued"], report["participants"]) == (EVENTS, EVENTS, PARTICIPANTS)
    assert report["batches"] == 1 and report["batch_size"] == 10_000
    assert (report["workers"], report["threads_per_worker"], report["redis"]) == (1, 1, "embedded")
    assert set(report["checks"]) == CHECKS and all(report["checks"].values()), report["checks"]
    rate = positive_number(report, "events_per_s")
    assert rate == pytest.approx(EVENTS / report["seconds"], rel=0.01)
    assert report["target_events_per_s"] == TARGET_EVENTS_PER_S
    assert int(report["points"]) > 0
