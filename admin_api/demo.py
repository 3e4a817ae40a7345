"""A realistic day on a running TraceChain cluster (``tracechain demo``).

Everything goes through the cluster's own doors: the admin API (staff keys, parties' EIP-712
signatures, attestors' BLS signatures) and the chain (the parties' wallets fund escrows, stake and
send tokens). The cluster's workers, sender, indexer and beat do the rest. The day:

1. Four participants earn points for deliveries; two claim with their wallet's signature, two are
   paid by finance; each claim mints TRACE to the participant's wallet.
2. The admin tops up the treasury; finance opens and funds an emission staking pool.
3. Two participants stake their TRACE; one claims its rewards, the other compounds them.
4. Buyers fund three escrows: attestors confirm the first (released to the seller), the second
   runs past its deadline (refunded), the third is disputed and split (four eyes when the
   platform's approval threshold asks for them).
5. A participant sends TRACE straight to the escrow contract, which nothing explains.
6. Finance reconciles: the report shows every transfer matched and one open exception, that
   transfer; the proof of reserves shows each custody address covered.

Amounts follow from what the claims paid (``TRACE_POINTS_PER_TRACE``), so the day works whatever
the cluster's rate. Names carry the day's tag, so the demo can run again on the same cluster.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from contracts.anvil import dev_private_key
from contracts.bindings import contract_at, transact
from contracts.deployment import Deployment
from ledger.escrow import attestation, party
from ledger.points.claims import ClaimPointsRequest

TRACE = 10**18
TRACE_DECIMALS = 18
SIGNED_REQUEST_TTL_S = 900
# Development accounts (well-known keys) playing the day's parties; 0-2 are the platform's.
PARTY_ACCOUNTS = {"alice": 3, "bob": 4, "carol": 5, "dave": 6, "seller": 7}
STAFF_ROLES = ("operator", "finance", "finance2", "auditor")
REWARD_RATE_PER_S = TRACE // 10  # the pool emits 0.1 TRACE a second, shared pro rata
POOL_BUDGET = 500 * TRACE
TREASURY_TOP_UP = 2_000 * TRACE
PAGE = 500  # exceptions read a page at a time


class DemoFailed(Exception):
    """The cluster refused or did not do something the day needs."""


def trace(amount: int | str) -> str:
    """Base units as TRACE for people: ``1234500000000000000000`` -> ``1,234.5 TRACE``."""
    units = int(amount)
    value = Decimal(abs(units)).scaleb(-TRACE_DECIMALS)
    whole, _, fraction = f"{value:f}".partition(".")
    fraction = fraction.rstrip("0")
    text = f"{int(whole):,}" + (f".{fraction}" if fraction else "")
    return f"{'-' if units < 0 else ''}{text} TRACE"


@dataclass
class Cluster:
    """The running cluster as its users reach it: the API, the chain node and the contracts."""

    api_url: str
    keys: dict[str, str]  # role -> staff API key ("admin" and STAFF_ROLES)
    w3: Web3
    deployment: Deployment
    fee_bps: int
    wait_s: float = 300.0
    say: Callable[[str], None] = print
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.api_url, timeout=60.0)
        self.token = contract_at(self.w3, "TraceToken", self.deployment.token)
        self.escrow_contract = contract_at(self.w3, "TraceEscrow", self.deployment.escrow)
        self.vault = contract_at(self.w3, "TraceStakingVault", self.deployment.vault)
        self.started = time.monotonic()

    def close(self) -> None:
        self.http.close()

    # -- the API -------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        role: str | None = "finance",
        expect: tuple[int, ...] = (),
    ) -> Any:
        headers = {} if role is None else {"Authorization": f"Bearer {self.keys[role]}"}
        try:
            response = self.http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DemoFailed(f"{method} {path}: the admin API did not answer ({exc})") from exc
        ok = expect or (200, 201, 202)
        if response.status_code not in ok:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise DemoFailed(f"{method} {path} answered {response.status_code}: {detail}")
        return response.json()

    def get(self, path: str, role: str | None = "auditor") -> Any:
        return self.call("GET", path, role=role)

    # -- the chain -----------------------------------------------------------------------------

    def chain_now(self) -> datetime:
        return datetime.fromtimestamp(int(self.w3.eth.get_block("latest")["timestamp"]), UTC)

    def balance_of(self, address: str) -> int:
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(address)).call())

    def send_call(self, account: LocalAccount, call: dict[str, Any]) -> str:
        """Send one call the API prepared (``to``, ``data``) from ``account``; its tx hash once mined."""
        tx: dict[str, Any] = {
            "from": account.address,
            "to": Web3.to_checksum_address(call["to"]),
            "data": call["data"],
            "chainId": self.deployment.chain_id,
            "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
        }
        tx["gas"] = int(self.w3.eth.estimate_gas(tx)) * 5 // 4  # type: ignore[arg-type]
        base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
        tx["maxPriorityFeePerGas"] = 10**9
        tx["maxFeePerGas"] = 2 * base_fee + 10**9
        tx_hash = self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        if receipt["status"] != 1:
            raise DemoFailed(f"the transaction {tx_hash.hex()} from {account.address} reverted")
        return "0x" + bytes(tx_hash).hex().removeprefix("0x")

    # -- time ----------------------------------------------------------------------------------

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.started:6.1f}s] {text}")

    def wait_until(
        self, what: str, fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """What ``fetch`` returns once ``done`` says so."""

        def check() -> dict[str, Any] | None:
            got = fetch()
            return got if done(got) else None

        found: dict[str, Any] = self.wait_for(what, check)
        return found

    def wait_for(self, what: str, check: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.wait_s
        while True:
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out after {self.wait_s:.0f} s waiting for {what}")
            time.sleep(0.5)


@dataclass
class Party:
    name: str
    account: LocalAccount

    @property
    def address(self) -> str:
        return self.account.address.lower()


def parties() -> dict[str, Party]:
    return {name: Party(name, Account.from_key(dev_private_key(i))) for name, i in PARTY_ACCOUNTS.items()}


class Day:
    """One run of the scenario; ``run`` returns the summary the report is made of."""

    def __init__(self, cluster: Cluster, tag: str) -> None:
        self.c = cluster
        self.tag = tag
        self.p = parties()
        self.nonce = time.time_ns()  # unique per signed request, also across runs
        self.attestors: list[tuple[int, int]] = []  # (id, secret key)
        self.summary: dict[str, Any] = {"tag": tag}

    def _next_nonce(self) -> int:
        self.nonce += 1
        return self.nonce

    def _expiry(self) -> int:
        return int(time.time()) + SIGNED_REQUEST_TTL_S

    # -- 1. points -----------------------------------------------------------------------------

    def points(self) -> dict[str, int]:
        c, tag = self.c, self.tag
        delivery, on_time = "demo.delivery", "demo.on_time"
        rule = c.call(
            "POST",
            "/points/rules",
            {"event_type": delivery, "points": "1000", "tier_multipliers_bps": {"gold": 15_000}},
        )
        second = c.call(
            "POST",
            "/points/rules",
            {"event_type": on_time, "points": "250", "tier_multipliers_bps": {"gold": 15_000}},
        )
        tiers = {"alice": "gold", "bob": "silver", "carol": "silver", "dave": "gold"}
        for name, tier in tiers.items():
            c.call(
                "PUT",
                f"/points/participants/{tag}-{name}",
                {"tier": tier, "wallet": self.p[name].address},
                role="operator",
            )
        since = max(datetime.fromisoformat(r["effective_at"]) for r in (rule, second)) + timedelta(
            milliseconds=1
        )
        counts = {"alice": (30, 30), "bob": (20, 10), "carol": (25, 0), "dave": (10, 20)}
        events: list[dict[str, Any]] = []
        for name, (deliveries, on_times) in counts.items():
            for kind, n in ((delivery, deliveries), (on_time, on_times)):
                events.extend(
                    {
                        "source": "dock-scanner",
                        "event_id": f"{tag}-{name}-{kind}-{i}",
                        "participant": f"{tag}-{name}",
                        "type": kind,
                        "occurred_at": (since + timedelta(milliseconds=i)).isoformat(),
                    }
                    for i in range(n)
                )
        while datetime.now(UTC) <= since + timedelta(milliseconds=max(max(d, o) for d, o in counts.values())):
            time.sleep(0.05)  # the events' times must not lie in the future
        first = c.call("POST", "/points/events", {"events": events}, role="operator")
        if first["created"] != len(events):
            raise DemoFailed(
                f"points: {len(events) - first['created']} of {len(events)} events accrued nothing"
            )
        again = c.call("POST", "/points/events", {"events": events}, role="operator")  # the scanner retried
        earned = {
            name: int(c.get(f"/points/participants/{tag}-{name}/balance")["available"]) for name in tiers
        }
        c.step(
            f"points: {len(events)} shipment events accrued {sum(earned.values()):,} points"
            f" (the scanner's retry of the batch: {again['exists']} already counted, {again['created']} new)"
        )
        # Alice and Bob claim with their wallets' signatures; finance pays Carol and Dave.
        claims = {}
        for name in ("alice", "bob"):
            request = ClaimPointsRequest(f"{tag}-{name}", earned[name], self._next_nonce(), self._expiry())
            signature = party.sign(
                request,  # type: ignore[arg-type]
                self.p[name].account.key,
                c.deployment.chain_id,
                c.deployment.token,
            )
            body = {
                "request": {
                    "participant": request.participant,
                    "points": str(request.points),
                    "nonce": request.nonce,
                    "expiry": request.expiry,
                },
                "signature": signature,
            }
            claims[name] = c.call("POST", "/party/points/claims", body, role=None)
        for name in ("carol", "dave"):
            body = {"participant": f"{tag}-{name}", "points": str(earned[name]), "key": f"{tag}-{name}"}
            claims[name] = c.call("POST", "/points/claims", body)
        paid = {}
        for name, claim in claims.items():
            final = c.wait_until(
                f"{name}'s claim to be paid",
                partial(c.get, f"/points/claims/{claim['id']}"),
                lambda got: got["status"] in ("paid", "failed"),
            )
            if final["status"] != "paid":
                raise DemoFailed(f"{name}'s points claim {claim['id']} failed on chain")
            paid[name] = int(final["trace_amount"])
        c.step(
            "points: claims paid on chain: "
            + ", ".join(f"{name} {trace(amount)}" for name, amount in paid.items())
        )
        self.summary["points"] = {
            "events": len(events),
            "points_earned": sum(earned.values()),
            "claims_paid": {name: str(amount) for name, amount in paid.items()},
        }
        return paid

    # -- 2. treasury and the pool ----------------------------------------------------------------

    def treasury_and_pool(self) -> int:
        c, tag = self.c, self.tag
        top_up = c.call(
            "POST",
            "/treasury/mints",
            {"key": f"{tag}-treasury", "amount": str(TREASURY_TOP_UP)},
            role="admin",
        )
        pool = c.call(
            "POST",
            "/staking/pools",
            {
                "name": f"{tag} dock stakers",
                "kind": "emission",
                "rate_per_s": str(REWARD_RATE_PER_S),
                "lock_seconds": 0,
                "min_stake": str(TRACE),
            },
        )
        pool_id = int(pool["id"])
        c.call(
            "POST", f"/staking/pools/{pool_id}/fund", {"key": f"{tag}-pool-fund", "amount": str(POOL_BUDGET)}
        )
        c.wait_for(
            "the treasury top-up to be minted",
            lambda: c.get(f"/treasury/mints/{top_up['key']}")["status"] == "minted",
        )
        c.wait_for(
            f"pool {pool_id} to open on the vault", lambda: bool(c.vault.functions.pools(pool_id).call()[3])
        )
        c.step(
            f"treasury: {trace(TREASURY_TOP_UP)} minted into {c.deployment.treasury};"
            f" pool {pool_id} emits {trace(REWARD_RATE_PER_S)}/s from a {trace(POOL_BUDGET)} budget"
        )
        return pool_id

    # -- 3. staking ------------------------------------------------------------------------------

    def stake(self, pool_id: int, stakes: dict[str, int]) -> None:
        c = self.c
        for name, amount in stakes.items():
            account = self.p[name].account
            transact(c.w3, c.token.functions.approve(c.vault.address, amount), account)
            transact(c.w3, c.vault.functions.stake(pool_id, amount), account)
        for name, amount in stakes.items():
            c.wait_for(f"{name}'s stake to be booked", partial(self._staked, pool_id, name, amount))
        c.step("staking: " + ", ".join(f"{name} staked {trace(amount)}" for name, amount in stakes.items()))

    def _rewards(self, pool_id: int, name: str) -> dict[str, Any] | None:
        pools = self.c.get(f"/stakers/{self.p[name].address}/rewards", role=None)["pools"]
        return next((r for r in pools if r["pool_id"] == pool_id), None)

    def _staked(self, pool_id: int, name: str, amount: int) -> bool:
        return self._stake(pool_id, name) == amount

    def _stake(self, pool_id: int, name: str) -> int:
        found = self._rewards(pool_id, name)
        return 0 if found is None else int(found["stake"])

    def claim_rewards(self, pool_id: int, name: str, *, compound: bool) -> dict[str, Any]:
        c = self.c
        request = party.ClaimRewardsRequest(pool_id, 0, compound, self._next_nonce(), self._expiry())
        signature = party.sign(request, self.p[name].account.key, c.deployment.chain_id, c.deployment.vault)
        body = {
            "request": {
                "poolId": pool_id,
                "amount": "0",
                "compound": compound,
                "nonce": request.nonce,
                "expiry": request.expiry,
            },
            "signature": signature,
        }
        claim: dict[str, Any] = c.call("POST", f"/stakers/{self.p[name].address}/claims", body, role=None)
        return claim

    # -- 4. escrows ----------------------------------------------------------------------------

    def register_attestors(self) -> None:
        c = self.c
        for name in ("carrier", "customs"):
            seed = hashlib.sha256(f"tracechain demo {self.tag} {name}".encode()).digest()
            secret, pubkey, pop = attestation.generate_attestor(seed)
            made = c.call(
                "POST",
                "/attestors",
                {
                    "name": f"{self.tag} {name}",
                    "pubkey": "0x" + pubkey.hex(),
                    "proof_of_possession": "0x" + pop.hex(),
                },
            )
            self.attestors.append((int(made["id"]), secret))

    def create_escrow(self, key: str, buyer: str, amount: int, deadline: datetime) -> dict[str, Any]:
        created: dict[str, Any] = self.c.call(
            "POST",
            "/escrows",
            {
                "key": f"{self.tag}-{key}",
                "buyer": self.p[buyer].address,
                "seller": self.p["seller"].address,
                "amount": str(amount),
                "fee_bps": self.c.fee_bps,
                "deadline": deadline.replace(microsecond=0).isoformat(),
                "delivery_ref": f"BOL-{self.tag}-{key}",
                "attestors": [a for a, _ in self.attestors],
                "threshold": len(self.attestors),
                "auto_release": True,
            },
            role="operator",
        )
        return created

    def create_signed_escrow(self, key: str, buyer: str, amount: int, deadline: datetime) -> dict[str, Any]:
        c = self.c
        request = party.CreateEscrowRequest(
            key=f"{self.tag}-{key}",
            seller=self.p["seller"].address,
            amount=amount,
            fee_bps=c.fee_bps,
            deadline=int(deadline.timestamp()),
            delivery_ref=f"BOL-{self.tag}-{key}",
            attestors=tuple(a for a, _ in self.attestors),
            threshold=len(self.attestors),
            auto_release=False,
            nonce=self._next_nonce(),
            expiry=self._expiry(),
        )
        signature = party.sign(request, self.p[buyer].account.key, c.deployment.chain_id, c.deployment.escrow)
        message = request.typed_data(c.deployment.chain_id, c.deployment.escrow)["message"]
        body = {
            "buyer": self.p[buyer].address,
            "request": {**message, "amount": str(amount)},
            "signature": signature,
        }
        created: dict[str, Any] = c.call("POST", "/party/escrows", body, role=None)
        return created

    def fund(self, buyer: str, created: dict[str, Any]) -> None:
        account = self.p[buyer].account
        self.c.send_call(account, created["funding"]["approve"])
        self.c.send_call(account, created["funding"]["fund"])

    def escrow(self, escrow_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.c.get(f"/escrows/{escrow_id}")
        return found

    def wait_escrow(self, escrow_id: str, status: str, what: str) -> dict[str, Any]:
        return self.c.wait_until(what, lambda: self.escrow(escrow_id), lambda e: e["status"] == status)

    def attest(self, escrow: dict[str, Any]) -> None:
        message = attestation.delivery_message(
            escrow["chain_id"],
            escrow["contract"],
            escrow["id"],
            escrow["delivery_ref"],
            int(escrow["amount"]),
        )
        for attestor_id, secret in self.attestors:
            signature = "0x" + attestation.sign_delivery(secret, message).hex()
            self.c.call(
                "POST",
                f"/escrows/{escrow['id']}/attestations",
                {"attestor_id": attestor_id, "signature": signature},
                role=None,
            )

    def dispute_and_split(self, escrow: dict[str, Any], buyer: str) -> dict[str, Any]:
        c = self.c
        request = party.OpenDisputeRequest(
            escrow_id=escrow["id"],
            reason="two pallets arrived crushed",
            nonce=self._next_nonce(),
            expiry=self._expiry(),
        )
        signature = party.sign(request, self.p[buyer].account.key, c.deployment.chain_id, c.deployment.escrow)
        c.call(
            "POST",
            f"/party/escrows/{escrow['id']}/dispute",
            {
                "request": request.typed_data(c.deployment.chain_id, c.deployment.escrow)["message"],
                "signature": signature,
            },
            role=None,
        )
        amount = int(escrow["amount"])
        seller, fee = amount * 60 // 100, amount * 2 // 100
        split = {"seller_amount": str(seller), "buyer_amount": str(amount - seller - fee), "fee": str(fee)}
        resolution = c.call("POST", f"/escrows/{escrow['id']}/resolution", split, role="finance")
        if resolution.get("needs_approval"):
            c.call("POST", f"/resolutions/{resolution['id']}/approve", role="finance2")
            c.step(f"escrow {escrow['id'][:10]}…: split proposed by one finance user, approved by another")
        return split

    # -- the day -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        c = self.c
        c.step(
            f"day {self.tag} on chain {c.deployment.chain_id}: token {c.deployment.token},"
            f" escrow {c.deployment.escrow}, vault {c.deployment.vault}"
        )
        first_exception = self._last_exception_id()
        self.register_attestors()
        paid = self.points()
        pool_id = self.treasury_and_pool()

        # Escrows are created and funded; the second one's deadline is close.
        alice, bob = paid["alice"], paid["bob"]
        chain_now = max(c.chain_now(), datetime.now(UTC))
        released = self.create_escrow("release", "alice", alice * 50 // 100, chain_now + timedelta(hours=4))
        expiring = self.create_escrow("expire", "alice", alice * 25 // 100, chain_now + timedelta(seconds=20))
        disputed = self.create_signed_escrow(
            "dispute", "bob", bob * 80 // 100, chain_now + timedelta(hours=4)
        )
        for buyer, created in (("alice", expiring), ("alice", released), ("bob", disputed)):
            self.fund(buyer, created)
        ids = {
            name: made["escrow"]["id"]
            for name, made in (("release", released), ("expire", expiring), ("dispute", disputed))
        }
        c.step(
            f"escrows funded: {ids['release'][:10]}… {trace(released['escrow']['amount'])} (alice),"
            f" {ids['expire'][:10]}… {trace(expiring['escrow']['amount'])} due in 20 s (alice),"
            f" {ids['dispute'][:10]}… {trace(disputed['escrow']['amount'])} (bob, signed request)"
        )

        # A wallet sends TRACE straight to the escrow contract: no escrow explains it.
        stray = max(bob * 5 // 100, 1)
        stray_tx = transact(
            c.w3, c.token.functions.transfer(c.escrow_contract.address, stray), self.p["bob"].account
        )
        stray_hash = "0x" + bytes(stray_tx["transactionHash"]).hex().removeprefix("0x")
        c.step(f"bob sent {trace(stray)} straight to the escrow contract (tx {stray_hash[:12]}…)")

        self.stake(pool_id, {"carol": paid["carol"] * 80 // 100, "dave": paid["dave"]})

        funded = self.wait_escrow(ids["release"], "funded", "the first escrow to be funded")
        self.attest(funded)
        c.step(f"escrow {ids['release'][:10]}…: carrier and customs attested delivery")
        to_split = self.wait_escrow(ids["dispute"], "funded", "the disputed escrow to be funded")
        split = self.dispute_and_split(to_split, "bob")
        c.step(
            f"escrow {ids['dispute'][:10]}…: bob disputed; split seller {trace(split['seller_amount'])},"
            f" buyer {trace(split['buyer_amount'])}, fee {trace(split['fee'])}"
        )

        # Stakers: Carol takes her rewards, Dave compounds his.
        c.wait_for(
            "rewards to accrue",
            lambda: all(
                int((self._rewards(pool_id, n) or {}).get("accrued", 0)) > 0 for n in ("carol", "dave")
            ),
        )
        carol_before = c.balance_of(self.p["carol"].address)
        dave_stake = self._stake(pool_id, "dave")
        carol_claim = self.claim_rewards(pool_id, "carol", compound=False)
        dave_claim = self.claim_rewards(pool_id, "dave", compound=True)
        c.wait_for(
            "carol's rewards to be paid",
            lambda: c.balance_of(self.p["carol"].address) - carol_before == int(carol_claim["amount"]),
        )
        c.wait_for(
            "dave's rewards to be compounded",
            lambda: self._stake(pool_id, "dave") == dave_stake + int(dave_claim["amount"]),
        )
        c.step(
            f"staking: carol was paid {trace(carol_claim['amount'])} from the treasury;"
            f" dave compounded {trace(dave_claim['amount'])} into his stake"
        )

        final = {
            "release": self.wait_escrow(ids["release"], "released", "the first escrow to be released"),
            "expire": self.wait_escrow(ids["expire"], "refunded", "the deadline to refund the second escrow"),
            "dispute": self.wait_escrow(ids["dispute"], "resolved", "the split to be paid"),
        }
        c.step(
            f"escrows settled: released {trace(final['release']['released_amount'])} to the seller"
            f" (fee {trace(final['release']['fee_amount'])});"
            f" refunded {trace(final['expire']['refunded_amount'])} to alice after the deadline;"
            " split executed"
        )
        stray_exception = c.wait_for(
            "the indexer to raise the unexplained transfer",
            lambda: next(
                (e for e in self._open_exceptions(first_exception) if e.get("tx_hash") == stray_hash), None
            ),
        )
        self.summary.update(
            {
                "escrows": {name: {"id": e["id"], "status": e["status"]} for name, e in final.items()},
                "staking": {
                    "pool_id": pool_id,
                    "paid": {"staker": "carol", "amount": carol_claim["amount"]},
                    "compounded": {"staker": "dave", "amount": dave_claim["amount"]},
                },
                "unexplained_transfer": {
                    "tx_hash": stray_hash,
                    "amount": str(stray),
                    "exception_id": stray_exception["id"],
                },
            }
        )
        return self.reconcile(first_exception)

    def _exceptions(self, *, after: int = 0, status: str | None = None) -> list[dict[str, Any]]:
        """The exceptions queue after id ``after``, oldest first, read a page at a time."""
        found: list[dict[str, Any]] = []
        cursor = after
        while True:
            query = f"/exceptions?limit={PAGE}&after={cursor}" + (f"&status={status}" if status else "")
            page = self.c.get(query)
            found.extend(page["items"])
            if page["next"] is None:
                return found
            cursor = int(page["next"])

    def _last_exception_id(self) -> int:
        every = self._exceptions()
        return int(every[-1]["id"]) if every else 0

    def _open_exceptions(self, after: int) -> list[dict[str, Any]]:
        return self._exceptions(after=after, status="open")

    def reconcile(self, first_exception: int) -> dict[str, Any]:
        c = self.c
        run = c.call("POST", "/reconciliation/runs", {}, role="finance")
        still_open = self._open_exceptions(0)
        exceptions = [e for e in still_open if int(e["id"]) > first_exception]
        earlier = len(still_open) - len(exceptions)
        reserves = c.get(f"/reconciliation/reserves?at_block={run['to_block']}")
        expected = self.summary["unexplained_transfer"]["tx_hash"]
        checks = {
            "no_breaks": run["ok"] and run["balance_breaks"] == 0,
            "one_exception_the_unexplained_transfer": [e.get("tx_hash") for e in exceptions] == [expected]
            and exceptions[0]["kind"] == "unexplained_transfer",
            "reserves_cover_liabilities": bool(reserves["solvent"]),
            "mirrors_match_the_chain": all(
                a["ledger_mirror"] == a["on_chain"] for a in reserves["addresses"].values()
            ),
        }
        self.summary.update(
            {
                "reconciliation": run,
                "exceptions": exceptions,
                "earlier_open_exceptions": earlier,
                "reserves": reserves,
                "checks": checks,
                "ok": all(checks.values()),
            }
        )
        return self.summary


def report_lines(summary: dict[str, Any]) -> list[str]:
    """The end-of-day report for people: the run, the open exceptions, the proof of reserves."""
    run = summary["reconciliation"]
    counts = run["counts"]
    lines = [
        "",
        f"Reconciliation run {run['run_id']}: blocks {run['from_block']}-{run['to_block']},"
        f" {run['transfers_checked']} transfers checked",
        f"  matched {counts.get('matched', 0)}, chain-only {counts.get('chain_only', 0)},"
        f" ledger-only {counts.get('ledger_only', 0)}, mismatched {counts.get('mismatched', 0)};"
        f" balance breaks {run['balance_breaks']}",
    ]
    for address, balance in sorted(run["balances"].items()):
        lines.append(
            f"  {address}  books {trace(balance['ledger'])}  chain {trace(balance['chain'])}"
            f"  drift {balance['drift']}"
        )
    lines.append(
        f"  minted to claimants: books {trace(run['minted']['ledger'])},"
        f" chain {trace(run['minted']['chain'])}"
    )
    lines.append("")
    earlier = summary["earlier_open_exceptions"]
    lines.append(
        f"Open exceptions raised during the day: {len(summary['exceptions'])}"
        + (f" ({earlier} from before the day are still open)" if earlier else "")
    )
    for e in summary["exceptions"]:
        details = e.get("details") or {}
        amount = details.get("amount")
        moved = f"{trace(amount)} from {details.get('from')} to {details.get('to')}" if amount else ""
        lines.append(f"  #{e['id']} {e['kind']}: {moved} tx {e.get('tx_hash')} (age {e.get('age_s', 0)} s)")
    reserves = summary["reserves"]
    lines.append("")
    lines.append(
        f"Proof of reserves at block {reserves['block']}:"
        f" {'solvent' if reserves['solvent'] else 'NOT SOLVENT'}"
    )
    for address, r in sorted(reserves["addresses"].items(), key=lambda item: item[1]["role"]):
        lines.append(
            f"  {r['role']:<10} {address}  owes {trace(r['liabilities'])}  holds {trace(r['on_chain'])}"
            f"  cover {trace(r['cover'])}"
        )
    lines.append("")
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append(
        "The day reconciles: every check holds."
        if not failed
        else f"Checks that do not hold: {', '.join(failed)}"
    )
    return lines
