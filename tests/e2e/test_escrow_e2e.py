"""Escrows end to end, as the product runs: the admin API (staff and signed party requests), real
`tracechain worker`, `tracechain sender` and `tracechain beat` processes on Redis, PostgreSQL,
and anvil mining a block a second. Each flow ends with the books matching the chain: every
custody mirror equal to balanceOf, the clearing account empty, no hold open, the ledger balanced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account.signers.local import LocalAccount
from web3 import Web3

from contracts.bindings import contract_at, transact
from ledger import custody
from ledger.accounts import get_account
from ledger.escrow import attestation, party
from tests.books import assert_books_balance
from tests.conftest import Databases
from tests.e2e.kit import BIN, TRACE, World, running_platform

REDIS_DB = 12  # this module's own Redis database
APPROVAL_ABOVE = 50 * TRACE
ATTESTORS = {n: attestation.generate_attestor(n.encode().ljust(32, b"#")) for n in ("carrier", "customs")}


class Platform(World):
    """The deployed contracts, the running processes, the API and the parties."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.attestor_ids: list[int] = []
        accounts = self.anvil.accounts
        self.deployer, self.signer, self.fees = accounts[0], accounts[1], accounts[2]
        self.buyer, self.seller, self.other = accounts[3], accounts[4], accounts[5]
        self.token = contract_at(self.w3, "TraceToken", self.deployment.token)
        self.escrow_contract = contract_at(self.w3, "TraceEscrow", self.deployment.escrow)

    # -- the API -----------------------------------------------------------------------------

    def post(self, path: str, body: Any = None, role: str | None = "finance", expect: int = 201) -> Any:
        headers = {} if role is None else {"Authorization": f"Bearer {self.keys[role]}"}
        response = self.client.post(path, json=body, headers=headers)
        assert response.status_code == expect, response.get_json()
        return response.get_json()

    def get(self, path: str) -> Any:
        response = self.client.get(path, headers={"Authorization": f"Bearer {self.keys['auditor']}"})
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def escrow(self, escrow_id: str) -> dict[str, Any]:
        return dict(self.get(f"/escrows/{escrow_id}"))

    # -- chain -------------------------------------------------------------------------------

    def chain_now(self) -> datetime:
        return datetime.fromtimestamp(int(self.w3.eth.get_block("latest")["timestamp"]), UTC)

    def send(self, account: LocalAccount, call: dict[str, Any]) -> None:
        """Send one of the API's funding calls from ``account`` and wait for its receipt."""
        tx = {
            "to": Web3.to_checksum_address(call["to"]),
            "data": call["data"],
            "from": account.address,
            "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
            "gas": 300_000,
            "chainId": self.deployment.chain_id,
            "maxFeePerGas": 10**10,
            "maxPriorityFeePerGas": 10**9,
        }
        tx_hash = self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
        assert receipt["status"] == 1

    def fund(self, created: dict[str, Any]) -> None:
        self.send(self.buyer, created["funding"]["approve"])
        self.send(self.buyer, created["funding"]["fund"])

    def balance_of(self, account: LocalAccount | str) -> int:
        address = account if isinstance(account, str) else account.address
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(address)).call())

    # -- waiting and checking ------------------------------------------------------------------

    def open_chain_actions(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM chain_outbox WHERE status NOT IN ('confirmed', 'failed')")
                ).scalar_one()
            )

    def settle(self, escrow_id: str, status: str) -> dict[str, Any]:
        """Wait until the escrow is ``status`` with no chain action open; return it."""
        self.wait_for(
            f"escrow {escrow_id} {status}",
            lambda: self.escrow(escrow_id)["status"] == status and self.open_chain_actions() == 0,
        )
        return self.escrow(escrow_id)

    def ledger_balance(self, code: str) -> int:
        with self.engine.connect() as conn:
            return get_account(conn, code).balance

    def assert_books_follow_the_chain(self) -> None:
        """Mirrors equal balanceOf once the indexer caught up; clearing empty; no hold open."""

        def mirrors_match() -> bool:
            return all(
                self.ledger_balance(custody.mirror_code(self.deployment.chain_id, address))
                == self.balance_of(address)
                for address in self.deployment.custody
            )

        self.wait_for("the custody mirrors to reach the chain's balances", mirrors_match)
        assert self.ledger_balance(custody.clearing_code(self.deployment.chain_id)) == 0
        with self.engine.connect() as conn:
            open_holds = conn.execute(
                sa.text(
                    "SELECT count(*) FROM ledger_accounts WHERE debits_pending <> 0 OR credits_pending <> 0"
                )
            ).scalar_one()
        assert open_holds == 0
        assert_books_balance(self.engine)

    # -- escrows ------------------------------------------------------------------------------

    def create(
        self,
        key: str,
        amount: int,
        *,
        deadline_s: int = 3600,
        auto_release: bool = True,
        deadline: datetime | None = None,
        expect: int = 201,
    ) -> Any:
        if deadline is None:
            deadline = (self.chain_now() + timedelta(seconds=deadline_s)).replace(microsecond=0)
        return self.post(
            "/escrows",
            {
                "key": key,
                "buyer": self.buyer.address,
                "seller": self.seller.address,
                "amount": str(amount),
                "fee_bps": 250,
                "deadline": deadline.isoformat(),
                "delivery_ref": f"BOL-{key}",
                "attestors": self.attestor_ids,
                "threshold": 2,
                "auto_release": auto_release,
            },
            role="operator",
            expect=expect,
        )

    def attest(self, escrow: dict[str, Any], expect: int = 201) -> list[Any]:
        message = attestation.delivery_message(
            escrow["chain_id"],
            escrow["contract"],
            escrow["id"],
            escrow["delivery_ref"],
            int(escrow["amount"]),
        )
        outcomes = []
        for attestor_id, (secret, _, _) in zip(self.attestor_ids, ATTESTORS.values(), strict=True):
            signature = "0x" + attestation.sign_delivery(secret, message).hex()
            outcomes.append(
                self.post(
                    f"/escrows/{escrow['id']}/attestations",
                    {"attestor_id": attestor_id, "signature": signature},
                    role=None,
                    expect=expect,
                )
            )
        return outcomes


@pytest.fixture(scope="module")
def platform(
    databases: Databases, template_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    env = {
        "TRACE_ESCROW_SWEEP_INTERVAL_S": "1",
        "TRACE_ESCROW_APPROVAL_ABOVE": str(APPROVAL_ABOVE),
        "TRACE_ESCROW_DISPUTE_EXTENSION_S": str(7 * 86_400),
    }
    keys = {"operator": "operator", "finance": "finance", "finance2": "finance", "auditor": "auditor"}
    work = tmp_path_factory.mktemp("escrow-e2e")
    with running_platform(
        Platform, databases, template_db, redis_url, work, redis_db=REDIS_DB, keys=keys, env=env
    ) as world:
        transact(world.w3, world.token.functions.mint(world.buyer.address, 10_000 * TRACE), world.signer)
        for name, (_, pubkey, pop) in ATTESTORS.items():
            registered = world.post(
                "/attestors",
                {"name": name, "pubkey": "0x" + pubkey.hex(), "proof_of_possession": "0x" + pop.hex()},
            )
            world.attestor_ids.append(registered["id"])
        yield world


def test_fund_attest_release_through_the_workers(platform: Platform) -> None:
    seller_before, fees_before = platform.balance_of(platform.seller), platform.balance_of(platform.fees)
    created = platform.create("e2e-release", 200 * TRACE)
    escrow = created["escrow"]
    assert escrow["status"] == "awaiting_funding"
    # The same creation again is the same escrow.
    deadline = datetime.fromisoformat(escrow["deadline"])
    again = platform.create("e2e-release", 200 * TRACE, deadline=deadline, expect=200)
    assert again["escrow"]["id"] == escrow["id"]
    platform.fund(created)
    platform.wait_for("funding", lambda: platform.escrow(escrow["id"])["status"] == "funded")
    first, second = platform.attest(escrow)
    assert (first["escrow_status"], second["escrow_status"]) == ("funded", "releasing")
    # An attestation arriving twice is recognised and changes nothing.
    again = platform.attest(escrow, expect=200)
    assert {a["status"] for a in again} == {"exists"}
    final = platform.settle(escrow["id"], "released")
    assert (final["released_amount"], final["fee_amount"], final["remaining"]) == (
        str(195 * TRACE),
        str(5 * TRACE),
        "0",
    )
    assert platform.balance_of(platform.seller) - seller_before == 195 * TRACE
    assert platform.balance_of(platform.fees) - fees_before == 5 * TRACE
    history = platform.get(f"/escrows/{escrow['id']}/history")
    assert [m["to_status"] for m in history["moves"]] == [
        "awaiting_funding",
        "funded",
        "delivery_confirmed",
        "releasing",
        "released",
    ]
    assert [(tx["action"], tx["status"]) for tx in history["chain_txs"]] == [("escrow.release", "confirmed")]
    assert history["ledger"]["lines"], history["ledger"]
    platform.assert_books_follow_the_chain()


def _signed_create(platform: Platform, key: str, amount: int, nonce: int, **overrides: Any) -> dict[str, Any]:
    deadline = int((platform.chain_now() + timedelta(hours=1)).timestamp())
    fields: dict[str, Any] = {
        "key": key,
        "seller": platform.seller.address.lower(),
        "amount": amount,
        "fee_bps": 250,
        "deadline": deadline,
        "delivery_ref": f"BOL-{key}",
        "attestors": tuple(platform.attestor_ids),
        "threshold": 2,
        "auto_release": False,
        "nonce": nonce,
        "expiry": int(time.time()) + 600,
        **overrides,
    }
    request = party.CreateEscrowRequest(**fields)
    chain_id, contract = platform.deployment.chain_id, platform.deployment.escrow
    signature = party.sign(request, platform.buyer.key, chain_id, contract)
    message = request.typed_data(chain_id, contract)["message"]
    return {
        "buyer": platform.buyer.address,
        "request": {**message, "amount": str(amount)},
        "signature": signature,
    }


def test_a_buyer_s_signed_escrow_released_in_milestones(platform: Platform) -> None:
    seller_before = platform.balance_of(platform.seller)
    body = _signed_create(platform, "po-ms-1", 100 * TRACE, nonce=1)
    created = platform.post("/party/escrows", body, role=None)
    escrow = created["escrow"]
    assert (escrow["buyer"], escrow["auto_release"]) == (platform.buyer.address.lower(), False)
    # The same signed request again is the same escrow; its nonce on another request is a replay.
    assert platform.post("/party/escrows", body, role=None, expect=200)["escrow"]["id"] == escrow["id"]
    replay = _signed_create(platform, "po-ms-2", 100 * TRACE, nonce=1)
    assert platform.post("/party/escrows", replay, role=None, expect=409)["type"].endswith("nonce_replayed")
    # A signature over other terms than those sent is refused, as is another wallet's.
    forged = {**body, "request": {**body["request"], "amount": str(101 * TRACE)}}
    assert "not signed by" in platform.post("/party/escrows", forged, role=None, expect=400)["detail"]
    posing = {**body, "buyer": platform.other.address}
    assert "not signed by" in platform.post("/party/escrows", posing, role=None, expect=400)["detail"]
    platform.fund(created)
    platform.wait_for("funding", lambda: platform.escrow(escrow["id"])["status"] == "funded")
    platform.attest(escrow)
    assert platform.escrow(escrow["id"])["status"] == "delivery_confirmed"
    # First milestone: 40; the fee (2.5 %, rounded up) is charged on it.
    platform.post(f"/escrows/{escrow['id']}/releases", {"amount": str(40 * TRACE)}, expect=202)
    first = platform.settle(escrow["id"], "delivery_confirmed")
    assert (first["released_amount"], first["fee_amount"], first["remaining"]) == (
        str(39 * TRACE),
        str(TRACE),
        str(60 * TRACE),
    )
    # More than remains is refused and writes nothing; the rest goes out next.
    platform.post(f"/escrows/{escrow['id']}/releases", {"amount": str(61 * TRACE)}, expect=400)
    platform.post(f"/escrows/{escrow['id']}/releases", {}, expect=202)
    final = platform.settle(escrow["id"], "released")
    assert (final["released_amount"], final["fee_amount"], final["remaining"]) == (
        str(97 * TRACE + TRACE // 2),
        str(2 * TRACE + TRACE // 2),
        "0",
    )
    assert platform.balance_of(platform.seller) - seller_before == 97 * TRACE + TRACE // 2
    platform.assert_books_follow_the_chain()


def test_the_deadline_refunds_an_unconfirmed_escrow(platform: Platform) -> None:
    buyer_before = platform.balance_of(platform.buyer)
    # The deadline counts in wall-clock time for the sweep and chain time for the contract.
    deadline = max(platform.chain_now(), datetime.now(UTC)) + timedelta(seconds=12)
    created = platform.create("e2e-deadline", 30 * TRACE, deadline=deadline.replace(microsecond=0))
    platform.fund(created)
    escrow_id = created["escrow"]["id"]
    final = platform.settle(escrow_id, "refunded")
    assert (final["refunded_amount"], final["remaining"]) == (str(30 * TRACE), "0")
    assert platform.balance_of(platform.buyer) == buyer_before
    moves = [m["to_status"] for m in platform.get(f"/escrows/{escrow_id}/history")["moves"]]
    assert moves == ["awaiting_funding", "funded", "expired", "refunding", "refunded"]
    platform.assert_books_follow_the_chain()


def _signed_dispute(platform: Platform, escrow_id: str, signer: LocalAccount, nonce: int) -> dict[str, Any]:
    request = party.OpenDisputeRequest(
        escrow_id=escrow_id, reason="the goods arrived damaged", nonce=nonce, expiry=int(time.time()) + 600
    )
    chain_id, contract = platform.deployment.chain_id, platform.deployment.escrow
    signature = party.sign(request, signer.key, chain_id, contract)
    return {"request": request.typed_data(chain_id, contract)["message"], "signature": signature}


def test_a_dispute_freezes_the_escrow_and_a_split_needs_a_second_approval(platform: Platform) -> None:
    seller_before, buyer_before = platform.balance_of(platform.seller), platform.balance_of(platform.buyer)
    fees_before = platform.balance_of(platform.fees)
    created = platform.create("e2e-dispute", 100 * TRACE)
    escrow = created["escrow"]
    platform.fund(created)
    platform.wait_for("funding", lambda: platform.escrow(escrow["id"])["status"] == "funded")
    # Someone who is not a party cannot open a dispute; the seller can, with a signature.
    stranger = _signed_dispute(platform, escrow["id"], platform.other, nonce=7)
    platform.post(f"/party/escrows/{escrow['id']}/dispute", stranger, role=None, expect=400)
    dispute = platform.post(
        f"/party/escrows/{escrow['id']}/dispute",
        _signed_dispute(platform, escrow["id"], platform.seller, 7),
        role=None,
    )
    assert (dispute["party"], platform.escrow(escrow["id"])["status"]) == ("seller", "disputed")
    # The chain freezes it too: the arbiter pushes the deadline out a week.
    on_chain_before = datetime.fromisoformat(escrow["deadline"])

    def frozen() -> bool:
        return datetime.fromisoformat(platform.escrow(escrow["id"])["deadline"]) > on_chain_before

    platform.wait_for("the deadline extension", frozen)
    on_chain = platform.escrow_contract.functions.getEscrow(bytes.fromhex(escrow["id"][2:])).call()
    frozen_until = datetime.fromisoformat(platform.escrow(escrow["id"])["deadline"])
    assert on_chain[-1] == int(frozen_until.timestamp())  # Escrow.deadline, the struct's last field
    assert frozen_until >= on_chain_before + timedelta(days=7)
    # Attestations are refused while it is disputed.
    platform.attest(escrow, expect=409)
    # A split that does not add up to what the escrow holds is refused.
    bad = {"seller_amount": str(60 * TRACE), "buyer_amount": str(30 * TRACE), "fee": "0"}
    platform.post(f"/escrows/{escrow['id']}/resolution", bad, expect=400)
    split = {"seller_amount": str(60 * TRACE), "buyer_amount": str(38 * TRACE), "fee": str(2 * TRACE)}
    resolution = platform.post(f"/escrows/{escrow['id']}/resolution", split)
    assert (resolution["status"], resolution["needs_approval"]) == ("awaiting_approval", True)
    # Four eyes: the finance user who decided cannot approve; another can.
    refused = platform.post(f"/resolutions/{resolution['id']}/approve", role="finance", expect=409)
    assert refused["type"].endswith("four_eyes")
    approved = platform.post(f"/resolutions/{resolution['id']}/approve", role="finance2", expect=200)
    assert approved["status"] == "executing"
    final = platform.settle(escrow["id"], "resolved")
    assert (final["released_amount"], final["refunded_amount"], final["fee_amount"]) == (
        str(60 * TRACE),
        str(38 * TRACE),
        str(2 * TRACE),
    )
    assert platform.balance_of(platform.seller) - seller_before == 60 * TRACE
    assert platform.balance_of(platform.buyer) - buyer_before == 38 * TRACE - 100 * TRACE
    assert platform.balance_of(platform.fees) - fees_before == 2 * TRACE
    history = platform.get(f"/escrows/{escrow['id']}/history")
    assert [d["closed_at"] is not None for d in history["disputes"]] == [True]
    assert [r["status"] for r in history["resolutions"]] == ["executed"]
    assert sorted(tx["action"] for tx in history["chain_txs"]) == [
        "escrow.extend_deadline",
        "escrow.refund",
        "escrow.release",
    ]
    platform.assert_books_follow_the_chain()


def test_two_requests_race_the_same_release_and_one_wins(platform: Platform) -> None:
    created = platform.create("e2e-race", 10 * TRACE, auto_release=False)
    escrow = created["escrow"]
    platform.fund(created)
    platform.wait_for("funding", lambda: platform.escrow(escrow["id"])["status"] == "funded")
    platform.attest(escrow)
    statuses: list[int] = []
    gate = threading.Barrier(4)

    def release() -> None:
        client = platform.client.application.test_client()
        gate.wait()
        response = client.post(
            f"/escrows/{escrow['id']}/releases",
            json={},
            headers={"Authorization": f"Bearer {platform.keys['finance']}"},
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=release) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [202, 409, 409, 409]
    final = platform.settle(escrow["id"], "released")
    assert final["released_amount"] == str(10 * TRACE - TRACE // 4)
    with platform.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT count(*) FROM chain_outbox WHERE metadata->>'escrow_id' = :e"),
            {"e": escrow["id"]},
        ).scalar_one()
    assert rows == 1
    platform.assert_books_follow_the_chain()


def test_the_sender_killed_mid_release_pays_once(platform: Platform) -> None:
    seller_before = platform.balance_of(platform.seller)
    created = platform.create("e2e-crash", 20 * TRACE)
    escrow = created["escrow"]
    platform.fund(created)
    platform.wait_for("funding", lambda: platform.escrow(escrow["id"])["status"] == "funded")
    platform.kill("sender")
    platform.attest(escrow)
    assert platform.escrow(escrow["id"])["status"] == "releasing"
    # One pass signs and broadcasts; the process is gone before the receipt is confirmed.
    pass_once = subprocess.run(
        [str(BIN / "tracechain"), "send", "--once"],
        check=False,
        env=platform.env,
        capture_output=True,
        timeout=60,
    )
    assert pass_once.returncode == 0, pass_once.stderr.decode()
    with platform.engine.connect() as conn:
        status = conn.execute(
            sa.text("SELECT status FROM chain_outbox WHERE metadata->>'escrow_id' = :e"), {"e": escrow["id"]}
        ).scalar_one()
    assert status in ("sent", "confirmed")
    sender = subprocess.Popen(
        [str(BIN / "tracechain"), "sender"],
        env=platform.env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(0.5)
    os.killpg(sender.pid, signal.SIGKILL)  # a second death, wherever it was
    sender.wait()
    platform.start("sender", "sender")
    final = platform.settle(escrow["id"], "released")
    assert final["released_amount"] == str(20 * TRACE - TRACE // 2)
    assert platform.balance_of(platform.seller) - seller_before == 20 * TRACE - TRACE // 2
    platform.assert_books_follow_the_chain()


def test_the_buyer_s_own_refund_after_deadline_and_grace_is_followed(platform: Platform) -> None:
    """Last in the module: it moves the chain's clock days ahead."""
    buyer_before = platform.balance_of(platform.buyer)
    created = platform.create("e2e-own-refund", 15 * TRACE, deadline_s=600)
    escrow = created["escrow"]
    platform.fund(created)
    platform.wait_for("funding", lambda: platform.escrow(escrow["id"])["status"] == "funded")
    grace = int(platform.escrow_contract.functions.graceSeconds().call())
    platform.anvil.rpc("evm_increaseTime", [600 + grace + 1])
    platform.anvil.mine(1)
    transact(
        platform.w3,
        platform.escrow_contract.functions.refund(bytes.fromhex(escrow["id"][2:]), 15 * TRACE),
        platform.buyer,
    )
    final = platform.settle(escrow["id"], "refunded")
    assert (final["refunded_amount"], final["remaining"]) == (str(15 * TRACE), "0")
    assert platform.balance_of(platform.buyer) == buyer_before
    with platform.engine.connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind FROM finance_exceptions")).scalars().all()
    assert "unexplained_transfer" not in kinds
    platform.assert_books_follow_the_chain()
