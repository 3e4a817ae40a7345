"""Running `tracechain bench ...` as a user does, and reading what it printed: the helpers the
bench tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from admin_api.bench.ledger import SCRATCH_PREFIX

BIN = Path(sys.executable).parent


def scratch_databases(server_url: str) -> set[str]:
    """The bench scratch databases that exist on ``server_url`` now."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (SCRATCH_PREFIX,)
        ).fetchall()
    return {str(r[0]) for r in rows}


def bench_json(
    args: list[str],
    server_url: str,
    data_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout_s: float = 300,
) -> dict[str, Any]:
    """Run ``tracechain bench ARGS --json`` in a process of its own with no TRACE_ setting but the
    database server and the data folder; the one JSON object it printed on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")} | {
        "TRACE_DATABASE_URL": server_url,
        "TRACE_DATA_DIR": str(data_dir),
        "TRACE_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    result = subprocess.run(
        [str(BIN / "tracechain"), "bench", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return report


def positive_number(report: Mapping[str, Any], key: str) -> float:
    """``report[key]``, which must be a number above zero (not a bool)."""
    value = report[key]
    assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
    assert value > 0, (key, value)
    return float(value)
