"""Schemathesis against the admin API's own `/openapi.json`: for every documented operation,
generated requests (valid and not) never get a 5xx, and every response has the documented
content type and, where a schema is documented for its status, that shape.

The app runs on a database of its own with a deployment on the embedded dev chain, so the routes
that read the chain answer as they would in production; requests carry an admin key, so the
role checks let them through to the handlers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import sqlalchemy as sa
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from web3 import Web3

from admin_api.app import close_app, create_app
from admin_api.auth import create_api_key
from contracts.client import ChainClient
from contracts.deploy import deploy_platform
from contracts.devchain import DevChain, DevChainServer
from contracts.events import LogDecoder
from ledger import db
from ledger.exceptions_queue import open_exception
from ledger.settings import load_settings
from tests.conftest import APP_ROLE, Databases
from workers.indexer import Indexer

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def served(databases: Databases, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    work: Path = tmp_path_factory.mktemp("schemathesis")
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=4)
    with DevChainServer(DevChain(), "127.0.0.1", 0) as server:
        deployer, signer, fees = server.chain.accounts[:3]
        w3 = Web3(Web3.HTTPProvider(server.url))
        deployment = deploy_platform(
            w3, Account.from_key(deployer.private_key), signer=signer.address, fee_wallet=fees.address
        )
        deployment.save(work / "deployment.json")
        Indexer(engine, ChainClient(w3), deployment, LogDecoder(), confirmations=0, window_max=100).run_once()
        app = create_app(
            load_settings(
                {
                    "TRACE_DATA_DIR": str(work),
                    "TRACE_DEPLOYMENT_FILE": str(work / "deployment.json"),
                    "TRACE_RPC_URL": server.url,
                    "TRACE_SIGNER_KEY": signer.private_key,
                    "TRACE_LOG_LEVEL": "WARNING",
                }
            ),
            engine=engine,
        )
        with engine.begin() as conn:
            key = create_api_key(conn, "admin", "schemathesis")
        _seed(app.test_client(), key, engine)
        try:
            yield app, key, engine
        finally:
            close_app(app)
            engine.dispose()
            databases.drop(name)


def _seed(client: Any, key: str, engine: sa.Engine) -> None:
    """Something behind every list and lookup, so response shapes are checked on real rows."""
    headers = {"Authorization": f"Bearer {key}"}

    def post(url: str, body: Any, status: int, method: str = "POST", **extra: str) -> None:
        response = client.open(url, method=method, json=body, headers={**headers, **extra})
        assert response.status_code == status, (url, response.get_json())

    post("/assets", {"code": "USD", "scale": 2}, 201)
    post("/accounts", {"code": "bank", "asset": "USD", "kind": "asset"}, 201)
    post("/accounts", {"code": "user:alice", "asset": "USD", "kind": "liability"}, 201)
    post(
        "/entries",
        {"transfers": [{"debit": "bank", "credit": "user:alice", "amount": "500"}]},
        201,
        **{"Idempotency-Key": "seed-1"},
    )
    post("/points/rules", {"event_type": "checkpoint", "points": "10"}, 201)
    post("/points/participants/carrier-1", {"tier": "gold"}, 201, method="PUT")
    post(
        "/points/events",
        {
            "events": [
                {
                    "source": "seed",
                    "event_id": "e-1",
                    "participant": "carrier-1",
                    "type": "checkpoint",
                    "occurred_at": "2026-01-01T00:00:00Z",
                }
            ]
        },
        200,
    )
    post(
        "/staking/pools",
        {"name": "seed", "kind": "fixed_apr", "apr_bps": 500, "lock_seconds": 0, "min_stake": "0"},
        201,
    )
    post("/reconciliation/runs", {}, 201)
    with engine.begin() as conn:
        open_exception(conn, "seed:1", "unexplained_transfer", {"amount": "1"})


def test_every_operation_answers_within_its_documented_contract(served: Any) -> None:
    app, key, engine = served
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,  # the same requests every run: a failure reproduces, CI does not flicker
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            check()
        except Exception as exc:  # collected per operation, reported together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations > 50
    assert not failures, "\n\n".join(failures)
    with engine.connect() as conn:
        # The generated writes went through the same checks as any request: the books still balance.
        unbalanced = conn.execute(
            sa.text(
                "SELECT s.code FROM ledger_accounts a JOIN ledger_assets s ON s.id = a.asset_id"
                " GROUP BY s.code HAVING sum(a.debits_posted) <> sum(a.credits_posted)"
                " OR sum(a.debits_pending) <> sum(a.credits_pending)"
            )
        ).all()
    assert unbalanced == []
