"""Staking end to end, as the product runs: the admin API (staff pools, public rewards, signed
claims), real `tracechain worker`, `tracechain sender` and `tracechain beat` processes on Redis
and PostgreSQL, and anvil mining a block a second. Stake -> accrue (beat's ticks) -> claim paid
on chain, and a claim compounded into the stake; the same signed claim again, and workers killed
with SIGKILL mid-way, change nothing. Each flow ends with the books matching the chain."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from contracts.bindings import contract_at, transact
from ledger.escrow import party
from tests.conftest import Databases
from tests.e2e.kit import BIN, TRACE, running_platform
from tests.e2e.test_escrow_e2e import Platform

REDIS_DB = 11  # this module's own Redis database
RATE = 10**16  # base units a second


class Staking(Platform):
    """The escrow end-to-end platform with the staking side: a staker and the vault."""

    def patch(self, path: str, body: Any) -> Any:
        response = self.client.patch(
            path, json=body, headers={"Authorization": f"Bearer {self.keys['finance']}"}
        )
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def rewards(self, staker: str) -> dict[int, dict[str, Any]]:
        response = self.client.get(f"/stakers/{staker}/rewards")
        assert response.status_code == 200, response.get_json()
        return {r["pool_id"]: r for r in response.get_json()["pools"]}

    def claim(self, pool_id: int, nonce: int, amount: int, *, compound: bool, expect: int = 202) -> Any:
        expiry = int(time.time()) + 3600
        request = party.ClaimRewardsRequest(pool_id, amount, compound, nonce, expiry)
        signature = party.sign(request, self.buyer.key, self.deployment.chain_id, self.deployment.vault)
        body = {
            "request": {
                "poolId": pool_id,
                "amount": str(amount),
                "compound": compound,
                "nonce": nonce,
                "expiry": expiry,
            },
            "signature": signature,
        }
        return self.post(f"/stakers/{self.buyer.address}/claims", body, role=None, expect=expect)

    def outbox_status(self, key: str) -> str:
        with self.engine.connect() as conn:
            return str(
                conn.execute(
                    sa.text("SELECT status FROM chain_outbox WHERE key = :k"), {"k": key}
                ).scalar_one()
            )

    def liability(self, pool_id: int) -> dict[str, Any]:
        report = self.get("/staking/liabilities")
        return {p["pool_id"]: p for p in report["pools"]}[pool_id]


@pytest.fixture(scope="module")
def staking(
    databases: Databases, template_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Staking]:
    work = tmp_path_factory.mktemp("staking-e2e")
    keys = {"finance": "finance", "auditor": "auditor"}
    env = {"TRACE_STAKING_TICK_INTERVAL_S": "1"}
    with running_platform(
        Staking, databases, template_db, redis_url, work, redis_db=REDIS_DB, keys=keys, env=env
    ) as world:
        staker, signer = world.buyer, world.signer
        transact(world.w3, world.token.functions.mint(staker.address, 1_000 * TRACE), signer)
        transact(
            world.w3, world.token.functions.mint(signer.address, 1_000 * TRACE), signer
        )  # the treasury's
        yield world


def test_stake_accrue_claim_and_compound_through_the_workers(staking: Staking) -> None:
    s = staking
    staker = s.buyer.address.lower()
    vault = contract_at(s.w3, "TraceStakingVault", s.deployment.vault)
    pool = s.post(
        "/staking/pools",
        {"name": "e2e", "kind": "emission", "rate_per_s": str(RATE), "lock_seconds": 0, "min_stake": "1"},
    )
    pid = pool["id"]
    s.post(f"/staking/pools/{pid}/fund", {"key": "e2e-fund", "amount": str(500 * TRACE)})
    s.wait_for("the pool on the vault", lambda: vault.functions.pools(pid).call()[3] is True)

    transact(s.w3, s.token.functions.approve(vault.address, 100 * TRACE), s.buyer)
    transact(s.w3, vault.functions.stake(pid, 50 * TRACE), s.buyer)
    s.wait_for("the stake", lambda: s.rewards(staker).get(pid, {}).get("stake") == str(50 * TRACE))
    # The worker dies with SIGKILL and comes back: the ticks go on, nothing is booked twice.
    s.kill("worker")
    s.start("worker", "worker", "--concurrency", "2")
    s.wait_for("beat's ticks to book rewards", lambda: int(s.liability(pid)["emitted"]) >= 5 * RATE)
    s.wait_for("rewards to grow", lambda: int(s.rewards(staker)[pid]["accrued"]) >= 10 * RATE)

    before = s.balance_of(s.buyer)
    paid = s.claim(pid, 1, 5 * RATE, compound=False)
    assert s.claim(pid, 1, 5 * RATE, compound=False, expect=200) == paid  # the same signed claim again
    s.wait_for("the payout", lambda: s.outbox_status(paid["outbox"]) == "confirmed")
    assert s.balance_of(s.buyer) - before == 5 * RATE

    # The sender is killed after one pass signed and broadcast the compounding claim.
    s.kill("sender")
    compounded = s.claim(pid, 2, 3 * RATE, compound=True)
    one_pass = subprocess.run(
        [str(BIN / "tracechain"), "send", "--once"], check=False, env=s.env, capture_output=True, timeout=60
    )
    assert one_pass.returncode == 0, one_pass.stderr.decode()
    restarted = subprocess.Popen(
        [str(BIN / "tracechain"), "sender"],
        env=s.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(0.5)
    os.killpg(restarted.pid, signal.SIGKILL)
    restarted.wait()
    s.start("sender", "sender")
    s.wait_for("the compounding", lambda: s.outbox_status(compounded["outbox"]) == "confirmed")
    s.wait_for("the compounded stake", lambda: s.rewards(staker)[pid]["stake"] == str(50 * TRACE + 3 * RATE))
    assert vault.functions.positions(pid, s.buyer.address).call()[0] == 50 * TRACE + 3 * RATE
    assert s.balance_of(s.buyer) - before == 5 * RATE  # paid once, whatever died

    # A rate change through the API applies from its moment; the vault keeps the pool open.
    s.patch(f"/staking/pools/{pid}", {"rate_per_s": str(RATE // 2)})
    s.wait_for("no chain action open", lambda: s.open_chain_actions() == 0)
    s.assert_books_follow_the_chain()
    line = s.liability(pid)
    assert int(line["emitted"]) == int(line["paid"]) + int(line["accrued_unpaid"]) + int(line["remainder"])
    assert int(line["paid"]) == 8 * RATE
    assert int(line["emitted"]) <= int(line["funded"]) == 500 * TRACE
    treasury = s.get("/staking/liabilities")["treasury"]
    # The treasury was minted 1,000 TRACE and paid out only the claims: it covers the pool.
    assert int(treasury["holds"]) == 1_000 * TRACE - 8 * RATE
    assert treasury["covered"] is True and int(treasury["committed"]) <= 500 * TRACE
    with s.engine.connect() as conn:
        claims = conn.execute(sa.text("SELECT count(*) FROM staking_claims")).scalar_one()
        kinds = (
            conn.execute(sa.text("SELECT kind FROM finance_exceptions WHERE kind <> 'unexplained_transfer'"))
            .scalars()
            .all()
        )
    assert claims == 2
    assert kinds == []
