"""Reconciliation runs against the chain: the web3 side of :mod:`ledger.reconciliation`.

A run reads the books in one REPEATABLE READ snapshot and asks the chain node for ``balanceOf`` of
each custody address at the run's last block (a historical call), so both sides describe the
same block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from web3 import Web3
from web3.exceptions import Web3Exception

from contracts.artifacts import load_artifact
from contracts.client import ProviderError
from contracts.deployment import Deployment
from ledger import reconciliation
from ledger.reconciliation import BalanceOf, RunReport, Trigger


def balance_reader(w3: Web3, token: str) -> BalanceOf:
    """``balanceOf(address)`` of the TRACE token at a given block."""
    contract = w3.eth.contract(address=Web3.to_checksum_address(token), abi=load_artifact("TraceToken").abi)

    def balance_of(address: str, block: int) -> int:
        try:
            return int(
                contract.functions.balanceOf(Web3.to_checksum_address(address)).call(block_identifier=block)
            )
        except (Web3Exception, OSError, ValueError) as exc:
            raise ProviderError(f"balanceOf({address}) at block {block}: {exc}") from exc

    return balance_of


def _custody_roles(deployment: Deployment) -> dict[str, str]:
    return {
        "escrow": deployment.escrow,
        "vault": deployment.vault,
        "treasury": deployment.treasury,
        "fee_wallet": deployment.fee_wallet,
    }


@contextlib.contextmanager
def _snapshot(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One REPEATABLE READ transaction: every read of a run sees the same books."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def reconcile(
    engine: sa.Engine,
    w3: Web3,
    deployment: Deployment,
    *,
    from_block: int | None = None,
    to_block: int | None = None,
    trigger: Trigger = "on_demand",
    requested_by: str = "system",
    unseen_within_s: float = 3600.0,
) -> RunReport:
    """One stored run over the confirmed range (by default everything the indexer has handled)."""
    balance_of = balance_reader(w3, deployment.token)
    with _snapshot(engine) as conn:
        lo, hi = reconciliation.confirmed_range(
            conn, deployment.chain_id, deployment.start_block, from_block=from_block, to_block=to_block
        )
        scope = reconciliation.Scope(deployment.chain_id, deployment.token, deployment.custody, lo, hi)
        return reconciliation.run(
            conn,
            scope,
            balance_of,
            trigger=trigger,
            requested_by=requested_by,
            unseen_within=timedelta(seconds=unseen_within_s),
        )


def scheduled(
    engine: sa.Engine, w3: Web3, deployment: Deployment, *, unseen_within_s: float = 3600.0
) -> RunReport | None:
    """The beat's run: the blocks handled since the last scheduled run (all of them the first
    time); None when no new block has been handled since."""
    with engine.connect() as conn:
        handled = conn.execute(
            sa.text("SELECT handled_block FROM chain_cursors WHERE chain_id = :c"), {"c": deployment.chain_id}
        ).scalar_one_or_none()
        last = conn.execute(
            sa.text("SELECT max(to_block) FROM recon_runs WHERE chain_id = :c AND trigger = 'schedule'"),
            {"c": deployment.chain_id},
        ).scalar_one()
    start = deployment.start_block if last is None else max(deployment.start_block, int(last) + 1)
    if handled is None or int(handled) < start:
        return None
    return reconcile(
        engine,
        w3,
        deployment,
        from_block=start,
        to_block=int(handled),
        trigger="schedule",
        requested_by="beat",
        unseen_within_s=unseen_within_s,
    )


def reserves(engine: sa.Engine, w3: Web3, deployment: Deployment, block: int | None = None) -> dict[str, Any]:
    """The proof-of-reserves statement at ``block`` (default: the last block the books have followed)."""
    balance_of = balance_reader(w3, deployment.token)
    with _snapshot(engine) as conn:
        _, hi = reconciliation.confirmed_range(
            conn, deployment.chain_id, deployment.start_block, from_block=None, to_block=block
        )
        return reconciliation.proof_of_reserves(
            conn, deployment.chain_id, _custody_roles(deployment), hi, balance_of
        )
