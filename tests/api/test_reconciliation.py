"""The reconciliation routes of the admin API against the embedded dev chain over HTTP and a real
PostgreSQL: runs on demand (audited), reports as JSON and CSV, proof of reserves, bad input."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from eth_account import Account
from flask.testing import FlaskClient
from web3 import Web3

from contracts.bindings import contract_at, transact
from contracts.client import ChainClient
from contracts.deploy import deploy_platform
from contracts.deployment import Deployment
from contracts.devchain import DevChain, DevChainServer
from contracts.events import LogDecoder
from ledger import db
from tests.api.conftest import assert_problem, audit_rows, bearer, deployed_app
from tests.conftest import APP_ROLE, Databases
from workers.indexer import Indexer

TRACE = 10**18


@dataclass
class Api:
    client: FlaskClient
    engine: sa.Engine
    keys: dict[str, str]
    deployment: Deployment

    def post(self, body: Any, role: str = "finance") -> Any:
        return self.client.post("/reconciliation/runs", json=body, headers=bearer(self.keys[role]))

    def get(self, url: str, role: str = "auditor") -> Any:
        return self.client.get(url, headers=bearer(self.keys[role]))

    def runs(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM recon_runs")).scalar_one())


@pytest.fixture(scope="module")
def api(databases: Databases, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    work = tmp_path_factory.mktemp("recon-api")
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    with DevChainServer(DevChain(), "127.0.0.1", 0) as server:
        deployer, signer, fees, user = server.chain.accounts[:4]
        w3 = Web3(Web3.HTTPProvider(server.url))
        deployment = deploy_platform(
            w3, Account.from_key(deployer.private_key), signer=signer.address, fee_wallet=fees.address
        )
        token = contract_at(w3, "TraceToken", deployment.token)
        platform = Account.from_key(signer.private_key)
        transact(w3, token.functions.mint(user.address, 40 * TRACE), platform)
        transact(
            w3,
            token.functions.transfer(Web3.to_checksum_address(deployment.escrow), 6 * TRACE),
            Account.from_key(user.private_key),
        )
        Indexer(engine, ChainClient(w3), deployment, LogDecoder(), confirmations=0, window_max=100).run_once()
        roles = ("finance", "auditor", "admin")
        try:
            with deployed_app(engine, work, deployment, "recon", roles, TRACE_RPC_URL=server.url) as (
                client,
                keys,
            ):
                yield Api(client, engine, keys, deployment)
        finally:
            engine.dispose()
            databases.drop(name)


def test_a_run_on_demand_is_stored_audited_and_read_back(api: Api) -> None:
    response = api.post({})
    assert response.status_code == 201, response.get_json()
    run = response.get_json()
    # The unasked transfer into escrow is booked to suspense (matched); the user's mint went
    # round the books: a chain-only mint and the minted totals drift.
    assert run["counts"] == {"matched": 1, "chain_only": 1, "ledger_only": 0, "mismatched": 0}
    assert [b["class"] for b in run["breaks"]] == ["chain_only", "mint_drift"]
    assert run["balances"][api.deployment.escrow]["chain"] == str(6 * TRACE)
    assert run["ok"] is False
    assert run["requested_by"].startswith("apikey:")
    trail = audit_rows(api.engine, f"reconciliation:{run['run_id']}")
    assert [r["action"] for r in trail] == ["reconciliation.run"]
    assert trail[0]["after"]["counts"]["chain_only"] == 1

    read = api.get(f"/reconciliation/runs/{run['run_id']}")
    assert read.status_code == 200
    assert read.get_json()["breaks"] == run["breaks"]
    listed = api.get("/reconciliation/runs")
    assert listed.status_code == 200
    assert run["run_id"] in [r["run_id"] for r in listed.get_json()["items"]]
    assert "breaks" not in listed.get_json()["items"][0]


def test_reports_as_csv(api: Api) -> None:
    run = api.post({}).get_json()
    summary = api.get(f"/reconciliation/runs/{run['run_id']}?format=csv")
    assert summary.status_code == 200
    assert summary.headers["Content-Type"].startswith("text/csv")
    assert dict(csv.reader(io.StringIO(summary.get_data(as_text=True))))["chain_only"] == "1"
    breaks = api.get(f"/reconciliation/runs/{run['run_id']}?format=csv&part=breaks")
    assert [r["class"] for r in csv.DictReader(io.StringIO(breaks.get_data(as_text=True)))] == [
        "chain_only",
        "mint_drift",
    ]
    queue = api.get(f"/reconciliation/runs/{run['run_id']}?format=csv&part=exceptions")
    kinds = sorted(r["kind"] for r in csv.DictReader(io.StringIO(queue.get_data(as_text=True))))
    assert kinds == ["recon_chain_only", "recon_mint_drift", "unexplained_transfer"]


def test_proof_of_reserves(api: Api) -> None:
    response = api.get("/reconciliation/reserves")
    assert response.status_code == 200, response.get_json()
    statement = response.get_json()
    assert statement["solvent"] is True
    assert statement["addresses"][api.deployment.escrow] == {
        "role": "escrow",
        "liabilities": "0",
        "on_chain": str(6 * TRACE),
        "ledger_mirror": str(6 * TRACE),
        "cover": str(6 * TRACE),
        "covered": True,
    }


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"from_block": -1}, "invalid_input"),
        ({"to_block": "ten"}, "invalid_input"),
        ({"to_block": 2**70}, "invalid_input"),
        ({"extra": 1}, "invalid_input"),
        ({"to_block": 10**9}, "invalid_input"),
        ({"from_block": 10**6, "to_block": 1}, "invalid_input"),
    ],
)
def test_bad_runs_are_refused_and_store_nothing(api: Api, body: dict[str, Any], code: str) -> None:
    before = api.runs()
    assert_problem(api.post(body), 400, code)
    assert api.runs() == before


def test_unknown_runs_and_bad_queries(api: Api) -> None:
    assert_problem(api.get("/reconciliation/runs/999999"), 404, "unknown_run")
    assert_problem(api.get("/reconciliation/runs/1?format=xml"), 400, "invalid_input")
    assert_problem(api.get("/reconciliation/runs?limit=0"), 400, "invalid_input")
    assert_problem(api.get("/reconciliation/reserves?at_block=-3"), 400, "invalid_input")
    assert_problem(api.post({}, role="auditor"), 403, "forbidden")


def test_paging_runs_newest_first(api: Api) -> None:
    ids = [api.post({}).get_json()["run_id"] for _ in range(3)]
    first = api.get("/reconciliation/runs?limit=2").get_json()
    assert [r["run_id"] for r in first["items"]] == sorted(ids, reverse=True)[:2]
    rest = api.get(f"/reconciliation/runs?limit=2&before={first['next']}").get_json()
    assert rest["items"][0]["run_id"] == min(ids)
