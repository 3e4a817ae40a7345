"""Points end to end, as the product runs: rules, participants and claims through the admin API,
event batches as `tracechain.points.ingest` tasks on Redis consumed by real `tracechain worker`
processes, the mint sent by a real `tracechain sender` on anvil (a block a second), `tracechain
beat` ticking. Duplicate batches and a worker killed (SIGKILL) with batches in flight change
nothing: every event counts once, and the books balance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from flask.testing import FlaskClient
from web3 import Web3

from admin_api.app import close_app, create_app
from admin_api.auth import create_api_key
from contracts.anvil import start_anvil
from contracts.bindings import contract_at
from contracts.deploy import deploy_platform
from ledger import custody, db
from ledger.escrow import party
from ledger.points import claims
from ledger.settings import load_settings
from tests.books import assert_books_balance, totals
from tests.conftest import APP_ROLE, Databases
from tests.e2e.kit import own_redis_db
from workers.app import TASK_POINTS_INGEST, make_celery

REDIS_DB = 10  # this module's own Redis database
BIN = Path(sys.executable).parent
TRACE = 10**18
WAIT_S = 240.0


class Platform:
    def __init__(self, client: FlaskClient, engine: sa.Engine, keys: dict[str, str], celery: Celery) -> None:
        self.client = client
        self.engine = engine
        self.keys = keys
        self.celery = celery
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env: dict[str, str] = {}
        self.token: Any = None
        self.wallet: Any = None
        self.chain: claims.Chain | None = None

    def start(self, name: str, *args: str) -> None:
        self.processes[name] = subprocess.Popen(
            [str(BIN / "tracechain"), *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def call(
        self, method: str, path: str, body: Any = None, role: str | None = "admin", expect: int = 200
    ) -> Any:
        headers = {} if role is None else {"Authorization": f"Bearer {self.keys[role]}"}
        response = self.client.open(path, method=method, json=body, headers=headers)
        assert response.status_code == expect, response.get_json()
        return response.get_json()

    def send_batch(self, events: list[dict[str, Any]]) -> None:
        self.celery.send_task(TASK_POINTS_INGEST, args=[events])

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if check():
                return
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} exited with {process.returncode}"
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()


@pytest.fixture(scope="module")
def platform(
    databases: Databases, template_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    work = tmp_path_factory.mktemp("points-e2e")
    broker = own_redis_db(redis_url, REDIS_DB)
    redis.Redis.from_url(broker).flushdb()
    database_url = databases.url(databases.create(template=template_db))
    engine = db.make_engine(database_url, role=APP_ROLE, pool_size=4)
    with start_anvil(block_time_s=1.0) as anvil:
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        deployer, signer, fees = anvil.accounts[:3]
        deployment = deploy_platform(w3, deployer, signer=signer.address, fee_wallet=fees.address)
        deployment.save(work / "deployment.json")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TRACE_")},
            "TRACE_DATABASE_URL": database_url,
            "TRACE_REDIS_URL": broker,
            "TRACE_RPC_URL": anvil.url,
            "TRACE_DATA_DIR": str(work),
            "TRACE_DEPLOYMENT_FILE": str(work / "deployment.json"),
            "TRACE_SIGNER_KEY": anvil.private_keys[1],
            "TRACE_CONFIRMATIONS": "1",
            "TRACE_INDEXER_INTERVAL_S": "0.5",
            "TRACE_SENDER_INTERVAL_S": "0.5",
            "TRACE_POINTS_PER_TRACE": "100",
            "TRACE_POINTS_EXPIRY_INTERVAL_S": "1",
            "TRACE_LOG_LEVEL": "WARNING",
        }
        settings = load_settings(env)
        app = create_app(settings, engine=engine)
        with engine.begin() as conn:
            keys = {
                role: create_api_key(conn, role, f"e2e {role}") for role in ("admin", "operator", "finance")
            }
        world = Platform(app.test_client(), engine, keys, make_celery(settings))
        world.env = env
        world.token = contract_at(w3, "TraceToken", deployment.token)
        world.wallet = anvil.accounts[3]
        world.chain = claims.Chain(deployment.chain_id, deployment.token, deployment.treasury)
        world.start("worker", "worker", "--concurrency", "2")
        world.start("sender", "sender")
        world.start("beat", "beat", "--schedule-file", str(work / "beat-schedule"))
        try:
            yield world
        finally:
            for name in list(world.processes):
                world.kill(name, signal.SIGTERM)
            close_app(app)
            engine.dispose()
            redis.Redis.from_url(broker).flushdb()


def _setup(platform: Platform, tag: str, wallet: str | None) -> str:
    rule = platform.call(
        "POST", "/points/rules", {"event_type": f"{tag}.scan", "points": "5"}, role="finance", expect=201
    )
    body: dict[str, Any] = {"tier": "gold"} if wallet is None else {"tier": "gold", "wallet": wallet}
    platform.call("PUT", f"/points/participants/{tag}", body, role="operator", expect=201)
    return str(rule["effective_at"])


def _events(tag: str, since: str, ids: range) -> list[dict[str, Any]]:
    return [
        {
            "source": "dock",
            "event_id": f"{tag}-{i}",
            "participant": tag,
            "type": f"{tag}.scan",
            "occurred_at": since,
        }
        for i in ids
    ]


def _accrued(platform: Platform, tag: str) -> int:
    return int(platform.scalar("SELECT count(*) FROM points_events WHERE participant_id = :p", p=tag))


def test_events_to_points_to_claim_to_mint(platform: Platform) -> None:
    assert platform.chain is not None
    wallet = platform.wallet
    since = _setup(platform, "acme", wallet.address)
    batch = _events("acme", since, range(300))
    for _ in range(3):  # the producer sent it three times
        platform.send_batch(batch)
    platform.send_batch(_events("acme", since, range(200, 400)))  # half of it again, half new
    platform.wait_for("400 events", lambda: _accrued(platform, "acme") == 400)
    balance = platform.call("GET", "/points/participants/acme/balance")
    assert (balance["posted"], balance["available"]) == ("2000", "2000")

    # A staff claim of 1,500 points and the participant's own signed claim of 500: 15 + 5 TRACE.
    staff = platform.call(
        "POST",
        "/points/claims",
        {"participant": "acme", "points": "1500", "key": "k1"},
        role="finance",
        expect=201,
    )
    request = claims.ClaimPointsRequest("acme", 500, 1, int(time.time()) + 600)
    signature = party.sign(request, wallet.key, platform.chain.chain_id, platform.chain.token)  # type: ignore[arg-type]
    signed_body = {"request": {"participant": "acme", "points": "500", "nonce": 1, "expiry": request.expiry},
                   "signature": signature}  # fmt: skip
    signed = platform.call("POST", "/party/points/claims", signed_body, role=None, expect=201)
    platform.call("POST", "/party/points/claims", signed_body, role=None, expect=200)  # sent twice: one claim
    for claim in (staff, signed):
        platform.wait_for(
            f"claim {claim['id']} paid",
            lambda c=claim: platform.call("GET", f"/points/claims/{c['id']}")["status"] == "paid",
        )
    assert int(platform.token.functions.balanceOf(wallet.address).call()) == 20 * TRACE
    assert totals(platform.engine, "points:acme") == (2000, 2000, 0, 0)
    assert totals(platform.engine, custody.minted_code(platform.chain.chain_id))[1] == 20 * TRACE
    platform.call("POST", "/points/claims", {"participant": "acme", "points": "1", "key": "k2"}, expect=422)
    assert_books_balance(platform.engine)


def test_a_worker_killed_with_batches_in_flight_and_duplicate_batches_change_nothing(
    platform: Platform,
) -> None:
    since = _setup(platform, "bulk", None)
    batches = [_events("bulk", since, range(start, start + 2_000)) for start in range(0, 40_000, 2_000)]
    for batch in batches:
        platform.send_batch(batch)
    platform.wait_for("the worker to be busy", lambda: _accrued(platform, "bulk") >= 2_000)
    platform.kill("worker", signal.SIGKILL)
    killed_at = _accrued(platform, "bulk")
    assert killed_at < 40_000, "the worker finished before it could be killed; make the batches larger"
    platform.start("worker", "worker", "--concurrency", "2")
    # The producer does not know what was lost with the worker: it sends everything again.
    for batch in batches:
        platform.send_batch(batch)
    platform.wait_for("40,000 events", lambda: _accrued(platform, "bulk") == 40_000)
    platform.wait_for(
        "the queue to drain",
        lambda: redis.Redis.from_url(platform.env["TRACE_REDIS_URL"]).llen("ledger") == 0,
    )
    time.sleep(1.0)  # the last redelivered batches finish (they add nothing)
    assert _accrued(platform, "bulk") == 40_000
    assert totals(platform.engine, "points:bulk") == (0, 200_000, 0, 0)
    assert (
        platform.scalar("SELECT COALESCE(sum(points), 0) FROM points_events WHERE participant_id = 'bulk'")
        == 200_000
    )
    assert (
        platform.scalar("SELECT COALESCE(sum(amount), 0) FROM points_lots WHERE participant_id = 'bulk'")
        == 200_000
    )
    assert_books_balance(platform.engine)
