"""``tracechain demo``: a realistic day on a running ``tracechain dev`` cluster (:mod:`admin_api.demo`)."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from admin_api.cli.runtime import Failed, app_engine, cli_actor, emit, load_deployment
from ledger.settings import Settings

DEMO_ROLES = {
    "admin": "admin",
    "operator": "operator",
    "finance": "finance",
    "finance2": "finance",
    "auditor": "auditor",
}


@click.command("demo")
@click.option("--api-url", help="The admin API (default: http://TRACE_API_HOST:TRACE_API_PORT).")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(1, 3600),
    default=300,
    show_default=True,
    help="Seconds to wait for each step the workers and the chain carry out.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the day's summary as JSON (the narrative goes to stderr)."
)
@click.pass_obj
def demo(settings: Settings, api_url: str | None, wait_s: float, as_json: bool) -> None:
    """Drive a running cluster through a realistic day, reconcile, and print the report.

    Points earned and claimed, a treasury top-up, stakers staking and claiming, three escrows
    (released, expired, disputed and split) and one unexplained transfer to the escrow contract;
    then a reconciliation run, its open exceptions (that transfer alone) and the proof of
    reserves. It uses the same settings as `tracechain dev` (TRACE_DATA_DIR, TRACE_API_PORT, ...):
    staff keys of its own for the day (revoked at the end), development accounts 3-7 as the
    parties. Exits 1 when a step fails or the day does not reconcile.
    """
    from web3 import Web3

    from admin_api.auth import create_api_key, revoke_api_key
    from admin_api.demo import Cluster, Day, DemoFailed, report_lines

    deployment = load_deployment(settings)
    rpc_url = settings.rpc_url or f"http://127.0.0.1:{settings.chain_port}"
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    try:
        chain_id = int(w3.eth.chain_id)
    except Exception as exc:  # any failure to reach the node says the same
        raise Failed(f"no chain answers at {rpc_url}: {exc}") from exc
    if chain_id != deployment.chain_id:
        raise Failed(
            f"the node at {rpc_url} is chain {chain_id}, the deployment record chain {deployment.chain_id}"
        )

    def say(line: str) -> None:
        click.echo(line, err=as_json)

    tag = datetime.now(UTC).strftime("demo-%Y%m%d%H%M%S")
    actor = cli_actor("demo")
    with app_engine(settings) as engine:
        with engine.begin() as conn:
            keys = {
                name: create_api_key(conn, role, f"tracechain demo {tag} {name}", actor=actor)
                for name, role in DEMO_ROLES.items()
            }
        cluster = Cluster(
            api_url or f"http://{settings.api_host}:{settings.api_port}",
            keys,
            w3,
            deployment,
            settings.escrow_fee_bps,
            wait_s=wait_s,
            say=say,
        )
        try:
            summary = Day(cluster, tag).run()
        except DemoFailed as exc:
            raise Failed(f"the day stopped: {exc}") from exc
        finally:
            cluster.close()
            with engine.begin() as conn:
                for key in keys.values():
                    revoke_api_key(conn, key, actor=actor)
    for line in report_lines(summary):
        say(line)
    if as_json:
        emit(summary)
    if not summary["ok"]:
        raise Failed(
            "the day does not reconcile: " + ", ".join(k for k, ok in summary["checks"].items() if not ok)
        )
