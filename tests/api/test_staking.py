"""The staking routes of the admin API without a chain: a deployment record with made-up
addresses, a database of this module's own, stakes booked the way the indexer books the vault's
confirmed events, and the routes' clock set by the test (rewards are exact to the second).

Every refusal asserts the status, the problem code and that nothing was written.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from eth_abi.abi import decode
from eth_account import Account
from eth_account.signers.local import LocalAccount

from admin_api.resources import staking as staking_routes
from contracts.deployment import Deployment
from ledger import custody, db
from ledger.commands import ChainRef
from ledger.engine import post_batch
from ledger.escrow import party
from ledger.staking import service
from ledger.staking.accumulator import YEAR_S
from tests.api.conftest import RouteClient, deployed_app, names
from tests.conftest import APP_ROLE, Databases
from workers import staking_events

CHAIN_ID = 31337
DEPLOYMENT = Deployment(
    chain_id=CHAIN_ID,
    start_block=0,
    token="0x" + "70" * 20,
    escrow="0x" + "e5" * 20,
    vault="0x" + "7a" * 20,
    treasury="0x" + "73" * 20,
    fee_wallet="0x" + "fe" * 20,
)
TRACE = 10**18
T0 = 1_800_000_000
ALICE: LocalAccount = Account.from_key("0x" + "a1" * 32)
BOB: LocalAccount = Account.from_key("0x" + "b0" * 32)
STRANGER: LocalAccount = Account.from_key("0x" + "57" * 32)
_txs = itertools.count(1)

_STATE_SQL = {
    "counts": "SELECT (SELECT count(*) FROM staking_pools), (SELECT count(*) FROM staking_moves),"
    " (SELECT count(*) FROM staking_positions), (SELECT count(*) FROM staking_claims),"
    " (SELECT count(*) FROM party_nonces), (SELECT count(*) FROM chain_outbox),"
    " (SELECT count(*) FROM audit_log), (SELECT count(*) FROM ledger_entries),"
    " (SELECT count(*) FROM ledger_accounts)",
    "pools": "SELECT id, apr_bps, rate_per_s, lock_seconds, min_stake, cap, active, acc, last_tick_s"
    " FROM staking_pools ORDER BY id",
    "positions": "SELECT pool_id, staker, stake, accrued FROM staking_positions ORDER BY 1, 2",
}


@dataclass(frozen=True)
class VaultEvent:
    chain: ChainRef
    contract: str
    event: str
    args: dict[str, Any]


@dataclass
class Api(RouteClient):
    clock: list[int] = field(default_factory=lambda: [T0])
    STATE_SQL = _STATE_SQL

    def pool(self, name: str, **changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "kind": "emission",
            "rate_per_s": str(TRACE),
            "lock_seconds": 0,
            "min_stake": "0",
        }
        body.update(changes)
        body = {k: v for k, v in body.items() if v is not None}
        created: dict[str, Any] = self.ok("POST", "/staking/pools", body, expect=201)
        return created

    def vault_event(self, pool_id: int, staker: str, amount: int, *, staked: bool, new_balance: int) -> None:
        """Book a confirmed vault event as the indexer does: the custody transfer against the
        account the staking explainer names, then the event applied to the position, at the
        routes' clock."""
        n = next(_txs)
        chain = ChainRef(
            CHAIN_ID, "0x" + hashlib.sha256(f"tx{n}".encode()).hexdigest(), 1, n, "0x" + "b0" * 32
        )
        transfer_ref = ChainRef(CHAIN_ID, chain.tx_hash, 0, n, chain.block_hash)
        name = "Staked" if staked else "Unstaked"
        args: dict[str, Any] = {
            "poolId": str(pool_id),
            "staker": staker.lower(),
            "amount": str(amount),
            "newBalance": str(new_balance),
        }
        if staked:
            args["unlockAt"] = str(self.clock[0] + 3600)
        event = VaultEvent(chain, DEPLOYMENT.vault, name, args)
        sender, recipient = (
            (staker.lower(), DEPLOYMENT.vault) if staked else (DEPLOYMENT.vault, staker.lower())
        )
        with self.engine.begin() as conn:
            custody.ensure_chart(conn, CHAIN_ID, DEPLOYMENT.custody)
            transfer = custody.TokenTransfer(transfer_ref, sender, recipient, amount)
            counter = staking_events.explain_transfer(conn, DEPLOYMENT.vault, transfer, [event])
            assert counter == f"stake:{pool_id}:{staker.lower()}"
            booking = custody.book_custody_transfer(transfer, DEPLOYMENT.custody, counter)
            assert booking is not None
            [booked] = post_batch(conn, [booking.entry])
            assert booked.status == "created", booked
            staking_events.apply_events(conn, DEPLOYMENT.vault, [event], now_s=lambda: self.clock[0])

    def rewards(self, staker: str) -> dict[int, dict[str, Any]]:
        body = self.ok("GET", f"/stakers/{staker}/rewards", role=None)
        return {r["pool_id"]: r for r in body["pools"]}


def signed_claim(
    pool_id: int,
    nonce: int,
    *,
    amount: int = 0,
    compound: bool = False,
    signer: LocalAccount = ALICE,
    expiry: int | None = None,
) -> dict[str, Any]:
    request = party.ClaimRewardsRequest(pool_id, amount, compound, nonce, expiry or T0 + 86_400)
    signature = party.sign(request, signer.key, CHAIN_ID, DEPLOYMENT.vault)
    return {
        "request": {
            "poolId": pool_id,
            "amount": str(amount),
            "compound": compound,
            "nonce": nonce,
            "expiry": request.expiry,
        },
        "signature": signature,
    }


@pytest.fixture(scope="module")
def engine(databases: Databases, template_db: str) -> Iterator[sa.Engine]:
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    yield engine
    engine.dispose()
    databases.drop(name)


@pytest.fixture(scope="module")
def api(engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    work: Path = tmp_path_factory.mktemp("staking-api")
    roles = ("admin", "finance", "auditor", "operator")
    with deployed_app(engine, work, DEPLOYMENT, "staking tests", roles) as (client, keys):
        yield Api(client, engine, keys)


@pytest.fixture(autouse=True)
def clock(api: Api, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The routes' clock, moved by the tests."""
    api.clock[0] = T0
    monkeypatch.setattr(staking_routes, "_now_s", lambda: api.clock[0])
    return api.clock


def outbox_rows(api: Api, prefix: str) -> list[dict[str, Any]]:
    with api.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT key, action, to_address, data, hold_keys, status FROM chain_outbox"
                " WHERE key LIKE :p ORDER BY id"
            ),
            {"p": prefix + "%"},
        ).mappings()
        return [dict(r) for r in rows]


def balance(api: Api, code: str) -> tuple[int, int, int, int]:
    with api.engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT debits_posted, credits_posted, debits_pending, credits_pending FROM ledger_accounts"
                " WHERE code = :c"
            ),
            {"c": code},
        ).one()
        return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


# -- pools ------------------------------------------------------------------------------------


def test_a_pool_is_created_once_audited_and_mirrored_on_the_vault(api: Api) -> None:
    body = {
        "name": "gold",
        "kind": "fixed_apr",
        "apr_bps": 1200,
        "lock_seconds": 86_400,
        "min_stake": "10",
        "cap": str(10**6 * TRACE),
    }
    pool = api.ok("POST", "/staking/pools", body, expect=201)
    assert (pool["kind"], pool["apr_bps"], pool["rate_per_s"], pool["cap"]) == (
        "fixed_apr",
        1200,
        None,
        str(10**6 * TRACE),
    )
    assert pool["vault"] == DEPLOYMENT.vault and pool["budget_exhausted"] is False
    assert api.ok("POST", "/staking/pools", body, expect=200) == pool
    [mirror] = outbox_rows(api, f"staking:configure:{pool['id']}:")
    assert (mirror["action"], mirror["to_address"], mirror["hold_keys"]) == (
        "staking.configure_pool",
        DEPLOYMENT.vault,
        [],
    )
    args = decode(["uint256", "uint64", "uint256", "uint256", "bool"], bytes(mirror["data"])[4:])
    assert args == (pool["id"], 86_400, 10, 10**6 * TRACE, True)
    with api.engine.connect() as conn:
        actions = (
            conn.execute(
                sa.text("SELECT action FROM audit_log WHERE target = :t"), {"t": f"pool:{pool['id']}"}
            )
            .scalars()
            .all()
        )
    assert actions == ["staking.pool.create"]
    assert api.ok("GET", f"/staking/pools/{pool['id']}", role="auditor") == pool
    page = api.ok("GET", "/staking/pools?limit=500", role="operator")
    assert pool in page["items"]
    api.refused(409, "pool_conflict", "POST", "/staking/pools", {**body, "apr_bps": 1300})


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"kind": "compound"}, "kind"),
        ({"apr_bps": 100}, "no apr_bps"),  # an emission pool has no APR
        ({"rate_per_s": None}, "rate_per_s"),
        ({"rate_per_s": 5}, "rate_per_s"),  # a JSON number, not a string of digits
        ({"rate_per_s": "-1"}, "rate_per_s"),
        ({"rate_per_s": str(2**256)}, "rate_per_s"),
        ({"lock_seconds": -1}, "lock_seconds"),
        ({"lock_seconds": 2**64}, "lock_seconds"),
        ({"min_stake": "1.5"}, "min_stake"),
        ({"cap": "0"}, "cap"),
        ({"active": "yes"}, "active"),
        ({"name": ""}, "name"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_malformed_pool_is_refused_and_writes_nothing(api: Api, change: dict[str, Any], named: str) -> None:
    body: dict[str, Any] = {
        "name": "malformed",
        "kind": "emission",
        "rate_per_s": "1",
        "lock_seconds": 0,
        "min_stake": "0",
    }
    problem = api.refused(400, "invalid_input", "POST", "/staking/pools", {**body, **change})
    assert names(problem, named), problem


@pytest.mark.parametrize(
    ("role", "status", "code"),
    [("operator", 403, "forbidden"), ("auditor", 403, "forbidden"), (None, 401, "unauthenticated")],
)
def test_only_admin_and_finance_manage_pools(api: Api, role: str | None, status: int, code: str) -> None:
    pool = api.pool(f"roles-{role}")
    body = {
        "name": "by-the-wrong-role",
        "kind": "emission",
        "rate_per_s": "1",
        "lock_seconds": 0,
        "min_stake": "0",
    }
    refusals = [
        api.refused(status, code, "POST", "/staking/pools", body, role=role),
        api.refused(status, code, "PATCH", f"/staking/pools/{pool['id']}", {"rate_per_s": "2"}, role=role),
        api.refused(
            status, code, "POST", f"/staking/pools/{pool['id']}/fund", {"key": "k", "amount": "1"}, role=role
        ),
    ]
    # A wrong role is told which roles may; no key is told a key is needed.
    expected = "needs admin or finance" if role else "API key"
    assert all(names(p, expected) for p in refusals), refusals
    assert api.ok("GET", f"/staking/pools/{pool['id']}", role="auditor") == pool


def test_funding_is_idempotent_by_key(api: Api) -> None:
    pool = api.pool("funded")
    body = {"key": "fund-funded-1", "amount": str(500 * TRACE)}
    first = api.ok("POST", f"/staking/pools/{pool['id']}/fund", body, expect=201)
    again = api.ok("POST", f"/staking/pools/{pool['id']}/fund", body, expect=200)
    assert first["entry_id"] == again["entry_id"]
    assert balance(api, f"rewards:{pool['id']}:budget")[1] == 500 * TRACE
    assert balance(api, "staking:rewards:expense")[0] >= 500 * TRACE
    api.refused(
        409,
        "idempotency_conflict",
        "POST",
        f"/staking/pools/{pool['id']}/fund",
        {"key": "fund-funded-1", "amount": str(501 * TRACE)},
    )
    for amount in ("0", "-5", str(2**256), 5):
        api.refused(
            400,
            "invalid_input",
            "POST",
            f"/staking/pools/{pool['id']}/fund",
            {"key": "fund-funded-2", "amount": amount},
        )
    api.refused(404, "pool_not_found", "POST", "/staking/pools/999999/fund", {"key": "k-404", "amount": "1"})
    api.refused(404, "pool_not_found", "GET", "/staking/pools/999999", role="auditor")


# -- rewards ----------------------------------------------------------------------------------


def test_rewards_grow_to_the_second_and_a_rate_change_applies_from_its_moment(
    api: Api, clock: list[int]
) -> None:
    pool = api.pool("emission-2", rate_per_s=str(2 * TRACE))
    pid = pool["id"]
    api.ok(
        "POST", f"/staking/pools/{pid}/fund", {"key": "fund-e2", "amount": str(10_000 * TRACE)}, expect=201
    )
    # Stakes of 40 and 10 TRACE: each share of the accumulator is exact, no flooring dust.
    api.vault_event(pid, ALICE.address, 40 * TRACE, staked=True, new_balance=40 * TRACE)
    clock[0] += 10
    api.vault_event(pid, BOB.address, 10 * TRACE, staked=True, new_balance=10 * TRACE)
    clock[0] += 7
    alice = api.rewards(ALICE.address)[pid]
    # 10 s alone at 2 TRACE/s, then 7 s with four fifths of the pool.
    assert alice["accrued"] == str(20 * TRACE + 112 * TRACE // 10)
    assert alice["stake"] == str(40 * TRACE) and alice["unlock_at_s"] == T0 + 3600 and not alice["unlocked"]
    assert alice["claimable"] == alice["accrued"] and alice["budget_exhausted"] is False
    assert api.rewards(BOB.address)[pid]["accrued"] == str(28 * TRACE // 10)
    # Reading wrote nothing; a second later the reward is one second larger.
    clock[0] += 1
    assert int(api.rewards(ALICE.address)[pid]["accrued"]) == 328 * TRACE // 10
    api.ok("PATCH", f"/staking/pools/{pid}", {"rate_per_s": str(TRACE)})
    clock[0] += 4
    assert int(api.rewards(ALICE.address)[pid]["accrued"]) == 36 * TRACE
    assert int(api.rewards(BOB.address)[pid]["accrued"]) == 4 * TRACE
    # Bob leaves; from then on Alice has it all.
    api.vault_event(pid, BOB.address, 10 * TRACE, staked=False, new_balance=0)
    clock[0] += 2
    assert int(api.rewards(ALICE.address)[pid]["accrued"]) == 38 * TRACE
    assert int(api.rewards(BOB.address)[pid]["accrued"]) == 4 * TRACE
    assert api.rewards(BOB.address)[pid]["stake"] == "0"
    assert balance(api, f"stake:{pid}:{BOB.address.lower()}")[:2] == (10 * TRACE, 10 * TRACE)


def test_flooring_dust_is_booked_to_the_remainder_and_handed_out_later(api: Api, clock: list[int]) -> None:
    pool = api.pool("dust", rate_per_s="10")
    pid = pool["id"]
    api.ok("POST", f"/staking/pools/{pid}/fund", {"key": "fund-dust", "amount": "1000000"}, expect=201)
    stakers = ["0x" + f"{i:02x}" * 20 for i in (0x31, 0x32, 0x33)]
    for staker in stakers:
        api.vault_event(pid, staker, 1, staked=True, new_balance=1)
    clock[0] += 1  # 10 units over 3 staked units: 3 each, 1 unit of dust
    assert [api.rewards(s)[pid]["accrued"] for s in stakers] == ["3", "3", "3"]
    with api.engine.begin() as conn:
        service.settle_position(conn, pid, stakers[0], clock[0])
        service.tick_pool(conn, pid, clock[0] + 1)
    # The dust of the first second went back to the remainder account and out again with the
    # next tick: 10 + 1 over 3 units.
    clock[0] += 1
    assert [api.rewards(s)[pid]["accrued"] for s in stakers] == ["6", "6", "6"]
    report = {p["pool_id"]: p for p in api.ok("GET", "/staking/liabilities", role="auditor")["pools"]}[pid]
    assert report["emitted"] == "20"
    assert int(report["stakers_accrued"]) + int(report["remainder"]) <= 20
    assert int(report["accrued_unpaid"]) + int(report["remainder"]) == 20


def test_fixed_apr_and_the_apy_it_compounds_to(api: Api, clock: list[int]) -> None:
    pool = api.pool("apr-10", kind="fixed_apr", apr_bps=1000, rate_per_s=None)
    pid = pool["id"]
    api.ok(
        "POST", f"/staking/pools/{pid}/fund", {"key": "fund-apr", "amount": str(10**6 * TRACE)}, expect=201
    )
    staker = "0x" + "ab" * 20
    api.vault_event(pid, staker, 1000 * TRACE, staked=True, new_balance=1000 * TRACE)
    clock[0] += YEAR_S // 2
    reward = api.rewards(staker)[pid]
    assert reward["accrued"] == str(50 * TRACE)
    assert (reward["apr_bps"], reward["apr"], reward["apy"]) == (1000, "0.10000000", "0.10515578")


def test_a_budget_that_runs_out_stops_accrual_and_says_so(api: Api, clock: list[int]) -> None:
    pool = api.pool("small-budget", rate_per_s="100")
    pid = pool["id"]
    api.ok("POST", f"/staking/pools/{pid}/fund", {"key": "fund-small", "amount": "1000"}, expect=201)
    staker = "0x" + "cd" * 20
    clock[0] += 50  # nobody staked: nothing emitted, nothing lost
    api.vault_event(pid, staker, 5, staked=True, new_balance=5)
    clock[0] += 7
    reward = api.rewards(staker)[pid]
    assert (reward["accrued"], reward["budget_exhausted"]) == ("700", False)
    clock[0] += 100
    reward = api.rewards(staker)[pid]
    assert (reward["accrued"], reward["budget_exhausted"], reward["apr_bps"]) == ("1000", True, 0)
    report = {p["pool_id"]: p for p in api.ok("GET", "/staking/liabilities", role="auditor")["pools"]}[pid]
    assert report["budget_exhausted"] is True
    assert (report["funded"], report["accrued_unpaid_to_now"], report["budget_remaining_to_now"]) == (
        "1000",
        "1000",
        "0",
    )
    # Funding again resumes accrual from now, not for the time it stood still.
    api.ok("POST", f"/staking/pools/{pid}/fund", {"key": "fund-small-2", "amount": "1000"}, expect=201)
    clock[0] += 3
    reward = api.rewards(staker)[pid]
    assert (reward["accrued"], reward["budget_exhausted"]) == ("1300", False)


def test_rewards_of_a_malformed_address_are_refused(api: Api) -> None:
    for bad in ("alice", "0x" + "g" * 40, "0x" + "ab" * 19):
        api.refused(400, "invalid_input", "GET", f"/stakers/{bad}/rewards", role=None)
    assert api.ok("GET", f"/stakers/{'0x' + '99' * 20}/rewards", role=None)["pools"] == []


# -- claims -----------------------------------------------------------------------------------


def _claimable_pool(api: Api, name: str, clock: list[int]) -> int:
    pool = api.pool(name, rate_per_s=str(TRACE))
    pid: int = pool["id"]
    api.ok(
        "POST",
        f"/staking/pools/{pid}/fund",
        {"key": f"fund-{name}", "amount": str(10_000 * TRACE)},
        expect=201,
    )
    api.vault_event(pid, ALICE.address, 10 * TRACE, staked=True, new_balance=10 * TRACE)
    clock[0] += 100
    return pid


def test_a_signed_claim_pays_from_the_treasury_through_the_outbox(api: Api, clock: list[int]) -> None:
    pid = _claimable_pool(api, "claims-pay", clock)
    alice = ALICE.address.lower()
    body = signed_claim(pid, 1, amount=40 * TRACE)
    claim = api.ok("POST", f"/stakers/{ALICE.address}/claims", body, role=None, expect=202)
    assert (claim["amount"], claim["mode"], claim["status"]) == (str(40 * TRACE), "pay", "queued")
    [row] = outbox_rows(api, claim["outbox"])
    assert (row["action"], row["to_address"]) == ("staking.payout", DEPLOYMENT.token)
    assert decode(["address", "uint256"], bytes(row["data"])[4:]) == (alice, 40 * TRACE)
    assert balance(api, f"rewards:{pid}:payable")[2] == 40 * TRACE
    assert balance(api, f"clearing:outbox:{CHAIN_ID}")[3] >= 40 * TRACE
    assert api.rewards(alice)[pid]["accrued"] == str(60 * TRACE)
    # The same signed claim again answers with the same claim and writes nothing.
    before = api.state()
    assert api.ok("POST", f"/stakers/{ALICE.address}/claims", body, role=None) == claim
    assert api.state() == before
    # Everything else (amount 0) with the next nonce.
    rest = api.ok("POST", f"/stakers/{alice}/claims", signed_claim(pid, 2), role=None, expect=202)
    assert rest["amount"] == str(60 * TRACE)
    assert api.rewards(alice)[pid]["accrued"] == "0"


def test_a_compounding_claim_approves_the_vault_once_then_stakes_for_the_staker(
    api: Api, clock: list[int]
) -> None:
    pid = _claimable_pool(api, "claims-compound", clock)
    alice = ALICE.address.lower()
    first = api.ok(
        "POST",
        f"/stakers/{alice}/claims",
        signed_claim(pid, 11, amount=TRACE, compound=True),
        role=None,
        expect=202,
    )
    second = api.ok(
        "POST",
        f"/stakers/{alice}/claims",
        signed_claim(pid, 12, amount=TRACE, compound=True),
        role=None,
        expect=202,
    )
    approvals = outbox_rows(api, f"staking:approve:{CHAIN_ID}:")
    assert len(approvals) == 1 and approvals[0]["to_address"] == DEPLOYMENT.token
    assert decode(["address", "uint256"], bytes(approvals[0]["data"])[4:]) == (DEPLOYMENT.vault, 2**256 - 1)
    for claim in (first, second):
        [row] = outbox_rows(api, claim["outbox"])
        assert (row["action"], row["to_address"]) == ("staking.compound", DEPLOYMENT.vault)
        assert decode(["uint256", "address", "uint256"], bytes(row["data"])[4:]) == (pid, alice, TRACE)
    with api.engine.connect() as conn:
        ids = (
            conn.execute(
                sa.text("SELECT key FROM chain_outbox WHERE key = ANY(:k) ORDER BY id"),
                {"k": [approvals[0]["key"], first["outbox"], second["outbox"]]},
            )
            .scalars()
            .all()
        )
    assert ids[0] == approvals[0]["key"], "the approval goes first"
    # Both holds wait on the payable account for their receipts (the stake account moves with
    # the confirmed Staked events).
    assert balance(api, f"rewards:{pid}:payable")[2] == 2 * TRACE


def test_bad_claims_are_refused_and_write_nothing(api: Api, clock: list[int]) -> None:
    pid = _claimable_pool(api, "claims-bad", clock)
    path = f"/stakers/{ALICE.address}/claims"
    api.ok("POST", path, signed_claim(pid, 21, amount=TRACE), role=None, expect=202)
    api.refused(409, "nonce_replayed", "POST", path, signed_claim(pid, 21, amount=2 * TRACE), role=None)
    api.refused(400, "invalid_input", "POST", path, signed_claim(pid, 22, signer=STRANGER), role=None)
    api.refused(
        400, "invalid_input", "POST", f"/stakers/{BOB.address}/claims", signed_claim(pid, 23), role=None
    )
    api.refused(400, "invalid_input", "POST", path, signed_claim(pid, 24, expiry=T0 - 1), role=None)
    api.refused(422, "exceeds_accrued", "POST", path, signed_claim(pid, 25, amount=1000 * TRACE), role=None)
    api.refused(
        422,
        "nothing_to_claim",
        "POST",
        f"/stakers/{BOB.address}/claims",
        signed_claim(pid, 26, signer=BOB),
        role=None,
    )
    api.refused(404, "pool_not_found", "POST", path, signed_claim(999_999, 27), role=None)
    tampered = signed_claim(pid, 28, amount=TRACE)
    tampered["request"]["amount"] = str(2 * TRACE)
    api.refused(400, "invalid_input", "POST", path, tampered, role=None)
    malformed = signed_claim(pid, 29)
    for field_name, value in (("compound", "yes"), ("poolId", -1), ("amount", str(2**256)), ("nonce", 1.5)):
        body = {"request": {**malformed["request"], field_name: value}, "signature": malformed["signature"]}
        api.refused(400, "invalid_input", "POST", path, body, role=None)
    api.refused(400, "invalid_input", "POST", path, {**malformed, "signature": "0x1234"}, role=None)


def test_the_liability_report_is_for_finance_and_auditors(api: Api, clock: list[int]) -> None:
    pid = _claimable_pool(api, "liability", clock)
    api.ok(
        "POST",
        f"/stakers/{ALICE.address}/claims",
        signed_claim(pid, 31, amount=30 * TRACE),
        role=None,
        expect=202,
    )
    for role in ("admin", "finance", "auditor"):
        report = {p["pool_id"]: p for p in api.ok("GET", "/staking/liabilities", role=role)["pools"]}[pid]
        assert report["funded"] == str(10_000 * TRACE)
        assert report["emitted"] == str(100 * TRACE)
        assert report["paying"] == str(30 * TRACE)
        assert report["paid"] == "0"
        assert report["accrued_unpaid"] == str(100 * TRACE)
        assert report["stakers_accrued"] == str(70 * TRACE)
        assert report["budget_remaining"] == str(9_900 * TRACE)
    treasury = api.ok("GET", "/staking/liabilities", role="finance")["treasury"]
    # The made-up treasury holds nothing on chain: the pools' commitments are not covered.
    assert treasury["account"] == f"chain:{CHAIN_ID}:{DEPLOYMENT.treasury}"
    assert (treasury["holds"], treasury["covered"]) == ("0", False)
    assert int(treasury["committed"]) >= 10_000 * TRACE - 30 * TRACE
    api.refused(403, "forbidden", "GET", "/staking/liabilities", role="operator")
    api.refused(401, "unauthenticated", "GET", "/staking/liabilities", role=None)


def test_a_bad_pool_change_is_refused_and_writes_nothing(api: Api) -> None:
    pool = api.pool("change-refusals")
    path = f"/staking/pools/{pool['id']}"
    for body in (
        {},
        {"kind": "fixed_apr"},
        {"apr_bps": 5},
        {"rate_per_s": "-1"},
        {"lock_seconds": 2**64},
        {"active": 1},
        {"name": "renamed"},
    ):
        api.refused(400, "invalid_input", "PATCH", path, body)
    api.refused(404, "pool_not_found", "PATCH", "/staking/pools/999999", {"rate_per_s": "1"})
    # A change the vault keeps is mirrored there; a rate change alone is not.
    api.ok("PATCH", path, {"rate_per_s": "7"})
    assert len(outbox_rows(api, f"staking:configure:{pool['id']}:")) == 1
    changed = api.ok("PATCH", path, {"min_stake": "5", "cap": str(TRACE)})
    assert (changed["min_stake"], changed["cap"], changed["rate_per_s"]) == ("5", str(TRACE), "7")
    mirrors = outbox_rows(api, f"staking:configure:{pool['id']}:")
    assert [m["key"] for m in mirrors] == [
        f"staking:configure:{pool['id']}:1",
        f"staking:configure:{pool['id']}:3",
    ]
    assert decode(["uint256", "uint64", "uint256", "uint256", "bool"], bytes(mirrors[1]["data"])[4:]) == (
        pool["id"],
        0,
        5,
        TRACE,
        True,
    )
