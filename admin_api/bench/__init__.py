"""`tracechain bench`: benchmarks that print figures (they are never timed tests)."""

from __future__ import annotations

import click

from admin_api.bench.chain import indexer_bench, sender_bench
from admin_api.bench.escrow import escrow_bench
from admin_api.bench.ledger import ledger_bench
from admin_api.bench.points import points_bench
from admin_api.bench.reconcile import reconcile_bench
from admin_api.bench.staking import staking_bench


@click.group()
def bench() -> None:
    """Measure how fast the product is on this machine."""


bench.add_command(ledger_bench)
bench.add_command(indexer_bench)
bench.add_command(sender_bench)
bench.add_command(escrow_bench)
bench.add_command(points_bench)
bench.add_command(staking_bench)
bench.add_command(reconcile_bench)

__all__ = ["bench"]
