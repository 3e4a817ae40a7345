"""`tracechain dev` end to end: embedded servers, migrations, the admin key, the API, Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import httpx
import psycopg
import pytest
from eth_account import Account
from web3 import Web3

from admin_api.auth import revoke_api_key
from admin_api.cli.serve import ensure_admin_key
from contracts.anvil import dev_private_key
from contracts.bindings import contract_at, transact
from ledger import db
from ledger.accounts import create_account, create_asset
from ledger.settings import load_settings

TRACECHAIN = Path(sys.executable).with_name("tracechain")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 40.0
_FIELD = re.compile(r"^\s+(API|PostgreSQL|Redis|Chain|Token|Escrow|Treasury|Admin API key):\s+(\S+)")
TRACE = 10**18


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


class DevProcess:
    """One `tracechain dev` run, its printed fields, stopped at teardown whatever happens."""

    def __init__(
        self, data_dir: Path, api_port: int, chain_port: int, overrides: Mapping[str, str] | None = None
    ) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("TRACE_DATABASE_URL", "TRACE_REDIS_URL")}
        env.update(
            TRACE_DATA_DIR=str(data_dir),
            TRACE_API_PORT=str(api_port),
            TRACE_API_WORKERS="1",
            TRACE_CHAIN_PORT=str(chain_port),
            TRACE_CONFIRMATIONS="1",
            TRACE_INDEXER_INTERVAL_S="0.5",
            TRACE_LOG_LEVEL="WARNING",
        )
        env.update(overrides or {})
        self.env = env
        self.stderr_path = data_dir.parent / f"dev-{time.monotonic_ns()}.err"
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [str(TRACECHAIN), "dev"], env=env, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.fields: dict[str, str] = {}
        self.stdout: list[str] = []

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.put(raw.decode(errors="replace"))

    def log(self) -> str:
        return "".join(self.stdout) + "\n--- stderr ---\n" + self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> dict[str, str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Admin API key" not in self.fields:
            if time.monotonic() > deadline:
                pytest.fail(f"tracechain dev did not print its URLs in time:\n{self.log()}")
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    pytest.fail(f"tracechain dev exited with {self.process.returncode}:\n{self.log()}")
                continue
            self.stdout.append(line)
            match = _FIELD.match(line)
            if match:
                self.fields[match.group(1)] = match.group(2)
        return self.fields

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(STOP_TIMEOUT_S)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.interrupt()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._stderr.close()


@pytest.fixture
def dev_runs() -> Iterator[list[DevProcess]]:
    runs: list[DevProcess] = []
    try:
        yield runs
    finally:
        for run in runs:
            run.close()


def test_dev_serves_the_api_stops_cleanly_and_keeps_its_data(
    tmp_path: Path, dev_runs: list[DevProcess]
) -> None:
    data_dir = tmp_path / "data"
    port, chain_port = _free_port(), _free_port()

    first = DevProcess(data_dir, port, chain_port)
    dev_runs.append(first)
    fields = first.wait_ready()
    api, key = fields["API"], fields["Admin API key"]
    assert api == f"http://127.0.0.1:{port}"
    assert key.startswith("tc_")
    key_file = data_dir / "admin-api-key"
    assert key_file.read_text().strip() == key
    assert key_file.stat().st_mode & 0o777 == 0o600

    assert httpx.get(f"{api}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{api}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["revision"] == db.head_revision()
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{api}/accounts", timeout=5).status_code == 401
    accounts = httpx.get(f"{api}/accounts", headers=auth, timeout=5)
    assert accounts.status_code == 200

    # The dev chain runs with the contracts deployed, and the workers follow it: a transfer
    # into the escrow contract reaches its custody mirror through beat, the worker and the indexer.
    assert fields["Chain"] == f"http://127.0.0.1:{chain_port}"
    w3 = Web3(Web3.HTTPProvider(fields["Chain"]))
    token = contract_at(w3, "TraceToken", fields["Token"])
    platform, user = Account.from_key(dev_private_key(1)), Account.from_key(dev_private_key(3))
    assert platform.address == fields["Treasury"]
    transact(w3, token.functions.mint(user.address, 5 * TRACE), platform)
    transact(w3, token.functions.transfer(fields["Escrow"], 2 * TRACE), user)
    mirror = f"chain:{w3.eth.chain_id}:{fields['Escrow'].lower()}"
    deadline = time.monotonic() + 60
    balance = None
    while time.monotonic() < deadline and balance != str(2 * TRACE):
        answer = httpx.get(f"{api}/accounts/{mirror}", headers=auth, timeout=5)
        balance = answer.json().get("balance") if answer.status_code == 200 else None
        time.sleep(0.5)
    assert balance == str(2 * TRACE), first.log()

    # A one-shot command without TRACE_DATABASE_URL uses the running embedded server and
    # leaves it running: it did not start it.
    shot = subprocess.run(
        [str(TRACECHAIN), "ledger", "check"],
        env={**first.env, "TRACE_API_PORT": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shot.returncode == 0, shot.stderr
    assert json.loads(shot.stdout)["ok"] is True
    assert httpx.get(f"{api}/readyz", timeout=5).status_code == 200

    # Some books, to find again after the restart.
    pg_url = fields["PostgreSQL"]
    engine = db.make_engine(pg_url, role="tracechain_app", pool_size=1)
    try:
        with engine.begin() as conn:
            create_asset(conn, "TRACE", 18)
            create_account(conn, "user:kept", "TRACE", "liability")
    finally:
        engine.dispose()

    pg_port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    redis_port = int(fields["Redis"].rsplit(":", 1)[1].split("/")[0])
    assert first.interrupt() == 0, first.log()
    assert _refuses(port) and _refuses(pg_port) and _refuses(redis_port), first.log()
    assert not (data_dir / "postgres" / "postmaster.pid").exists()

    second = DevProcess(data_dir, port, chain_port)
    dev_runs.append(second)
    again = second.wait_ready()
    assert again["Admin API key"] == key
    assert not any("(new)" in line for line in second.stdout)
    listed = httpx.get(f"{api}/accounts", headers=auth, timeout=5)
    assert listed.status_code == 200
    assert "user:kept" in [a["code"] for a in listed.json()["items"]]
    with psycopg.connect(db.libpq_url(again["PostgreSQL"])) as conn:
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone() == (1,)
    # The dev chain started over (its state is in memory): the indexer takes the new chain for
    # a reorganisation and compensates what it had booked from the old one.
    assert again["Token"] == fields["Token"]  # the same deployer and nonces: the same addresses
    deadline = time.monotonic() + 60
    compensated = 0
    while time.monotonic() < deadline and not compensated:
        with psycopg.connect(db.libpq_url(again["PostgreSQL"])) as conn:
            row = conn.execute(
                "SELECT count(*) FROM finance_exceptions WHERE kind = 'reorg_compensated'"
            ).fetchone()
        compensated = row[0] if row else 0
        time.sleep(0.5)
    assert compensated == 1, second.log()
    assert second.interrupt() == 0, second.log()
    assert _refuses(port)


def test_dev_admin_key_is_kept_while_valid_and_replaced_otherwise(tmp_path: Path, fresh_db_url: str) -> None:
    settings = replace(load_settings({}), data_dir=tmp_path)
    key, created = ensure_admin_key(settings, fresh_db_url)
    assert created
    key_file = tmp_path / "admin-api-key"
    assert key_file.read_text().strip() == key and key_file.stat().st_mode & 0o777 == 0o600
    assert ensure_admin_key(settings, fresh_db_url) == (key, False)

    key_file.write_text("tc_00000000_" + "x" * 43 + "\n")  # not a key of this database
    replaced, created = ensure_admin_key(settings, fresh_db_url)
    assert created and replaced != key

    engine = db.make_engine(fresh_db_url, role="tracechain_app", pool_size=1)
    try:
        with engine.begin() as conn:
            assert revoke_api_key(conn, replaced)
    finally:
        engine.dispose()
    renewed, created = ensure_admin_key(settings, fresh_db_url)
    assert created and renewed not in (key, replaced)
    with psycopg.connect(db.libpq_url(fresh_db_url)) as conn:
        roles = conn.execute("SELECT role, revoked_at IS NULL FROM api_keys ORDER BY id").fetchall()
    assert roles == [("admin", True), ("admin", False), ("admin", True)]


def test_one_shot_commands_start_and_stop_the_embedded_postgres(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRACE_DATABASE_URL", "TRACE_REDIS_URL")}
    env.update(TRACE_DATA_DIR=str(tmp_path), TRACE_LOG_LEVEL="WARNING")

    def tracechain(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TRACECHAIN), *args], env=env, capture_output=True, text=True, timeout=90, check=False
        )

    refused = tracechain("ledger", "check")
    assert refused.returncode == 1 and "tracechain db upgrade" in refused.stderr
    upgraded = tracechain("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout) == {"revision": db.head_revision()}
    checked = tracechain("ledger", "check")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True
    # Each command stopped the server it started.
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()
    assert _refuses(int((tmp_path / "postgres.port").read_text()))
