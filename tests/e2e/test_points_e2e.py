"""Points end to end, as the product runs: rules, participants and claims through the admin API,
event batches as `tracechain.points.ingest` tasks on Redis consumed by real `tracechain worker`
processes, the mint sent by a real `tracechain sender` on anvil (a block a second), `tracechain
beat` ticking. Duplicate batches and a worker killed (SIGKILL) with batches in flight change
nothing: every event counts once, and the books balance."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from contracts.bindings import contract_at
from ledger import custody
from ledger.escrow import party
from ledger.points import claims
from ledger.settings import load_settings
from tests.books import assert_books_balance, totals
from tests.conftest import Databases
from tests.e2e.kit import TRACE, World, running_platform
from workers.app import TASK_POINTS_INGEST, make_celery

REDIS_DB = 10  # this module's own Redis database


class Platform(World):
    WAIT_S = 240.0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.celery = make_celery(load_settings(self.env))
        self.token = contract_at(self.w3, "TraceToken", self.deployment.token)
        self.wallet = self.anvil.accounts[3]
        self.chain = claims.Chain(self.deployment.chain_id, self.deployment.token, self.deployment.treasury)

    def call(
        self, method: str, path: str, body: Any = None, role: str | None = "admin", expect: int = 200
    ) -> Any:
        headers = {} if role is None else {"Authorization": f"Bearer {self.keys[role]}"}
        response = self.client.open(path, method=method, json=body, headers=headers)
        assert response.status_code == expect, response.get_json()
        return response.get_json()

    def send_batch(self, events: list[dict[str, Any]]) -> None:
        self.celery.send_task(TASK_POINTS_INGEST, args=[events])

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()


@pytest.fixture(scope="module")
def platform(
    databases: Databases, template_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    work = tmp_path_factory.mktemp("points-e2e")
    keys = {"admin": "admin", "operator": "operator", "finance": "finance"}
    env = {"TRACE_POINTS_PER_TRACE": "100", "TRACE_POINTS_EXPIRY_INTERVAL_S": "1"}
    with running_platform(
        Platform, databases, template_db, redis_url, work, redis_db=REDIS_DB, keys=keys, env=env
    ) as world:
        yield world


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
