"""The worker cluster's processes: ``tracechain index|send`` (one pass or a loop, without Celery)
and ``tracechain worker|sender|beat`` (the Celery processes of the Procfile)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import click

from admin_api.cli.runtime import BadUsage, Failed, app_engine, chain_node, emit, load_deployment
from contracts.client import ProviderError
from ledger.settings import Settings
from workers.app import QUEUE_CHAIN, QUEUE_CHAIN_SEND, QUEUE_LEDGER
from workers.indexer import run_forever as index_forever
from workers.keys import SigningKeyError, load_signer
from workers.runtime import build_indexer, build_sender
from workers.sender import run_forever as send_forever


def _once_or_forever(
    run_once: Callable[[], Any],
    forever: Callable[[Any, float, Callable[[], bool]], None],
    job: Any,
    interval_s: float,
    once: bool,
) -> None:
    """One pass printed as JSON, or the loop until SIGINT/SIGTERM."""
    if once:
        try:
            emit(run_once().as_dict())
        except ProviderError as exc:
            raise Failed(f"the chain node failed: {exc}") from exc
        return
    stop = _stop_flag()
    forever(job, interval_s, stop.is_set)


def _stop_flag() -> threading.Event:
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


@click.command("index")
@click.option("--once", is_flag=True, help="One pass (catch up, hand over confirmed events), then exit.")
@click.pass_obj
def index(settings: Settings, once: bool) -> None:
    """Index the deployment's logs into the database; prints the JSON report of each pass with --once."""
    deployment = load_deployment(settings)
    w3 = chain_node(settings)
    with app_engine(settings, pool_size=3) as engine:
        indexer = build_indexer(settings, engine, w3, deployment)
        _once_or_forever(indexer.run_once, index_forever, indexer, settings.indexer_interval_s, once)


@click.command("send")
@click.option("--once", is_flag=True, help="One pass (sign, broadcast, settle, bump), then exit.")
@click.pass_obj
def send(settings: Settings, once: bool) -> None:
    """Send the outbox of the signing key (TRACE_SIGNER_KEY or keystore) to the chain."""
    deployment = load_deployment(settings)
    w3 = chain_node(settings)
    try:
        account = load_signer(settings)
    except SigningKeyError as exc:
        raise BadUsage(str(exc)) from exc
    with app_engine(settings, pool_size=3) as engine:
        sender = build_sender(settings, engine, w3, deployment, account)
        _once_or_forever(sender.run_once, send_forever, sender, settings.sender_interval_s, once)


def _celery_main(argv: list[str]) -> None:
    from workers.app import app, serve_metrics

    serve_metrics(app)

    if argv[0] == "worker":
        app.worker_main(argv)
    else:
        app.start(argv)


@click.command("worker")
@click.option("--concurrency", "-c", default=2, show_default=True, help="Worker threads.")
def worker(concurrency: int) -> None:
    """The Celery worker of the domain queues (ledger, chain), with threads: the tasks wait on
    PostgreSQL and the node, and one process exports one set of metrics."""
    queues = f"{QUEUE_LEDGER},{QUEUE_CHAIN}"
    argv = ["worker", "-Q", queues, "-P", "threads", "-c", str(concurrency), "-n", "worker@%h", "-l", "INFO"]
    _celery_main(argv)


@click.command("sender")
def sender() -> None:
    """The Celery worker of the chain-send queue: one process, one task at a time, per signing key."""
    _celery_main(["worker", "-Q", QUEUE_CHAIN_SEND, "-P", "solo", "-c", "1", "-n", "sender@%h", "-l", "INFO"])


@click.command("beat")
@click.option("--schedule-file", default=None, help="Where beat keeps its schedule state.")
@click.pass_obj
def beat(settings: Settings, schedule_file: str | None) -> None:
    """The one beat process: schedules the indexer, the sender and the sweeps."""
    path = schedule_file or str(settings.data_dir / "celerybeat-schedule")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _celery_main(["beat", "-s", path, "-l", "INFO"])


@click.command("deploy")
@click.option(
    "--grace-seconds", default=3 * 86_400, show_default=True, type=click.IntRange(0, 10 * 365 * 86_400)
)
@click.option("--force", is_flag=True, help="Deploy again even if the recorded deployment is live.")
@click.pass_obj
def deploy(settings: Settings, grace_seconds: int, force: bool) -> None:
    """Deploy the contracts to TRACE_RPC_URL and write the deployment record (printed as JSON).

    The deployer key (TRACE_DEPLOYER_KEY, else the signing key) becomes the contracts' admin; the
    signing key gets the minter and arbiter roles and is the treasury wallet; TRACE_FEE_ADDRESS
    (else the signing key's address) receives escrow fees. A record whose contracts are live on
    the chain is kept (exit 0, printed) unless --force.
    """
    from dataclasses import asdict

    from contracts.bindings import ChainTxFailed
    from contracts.deploy import deploy_platform, is_live
    from workers.keys import load_deployer

    w3 = chain_node(settings)
    path = settings.deployment_path
    if path.exists() and not force:
        existing = load_deployment(settings)
        if is_live(w3, existing):
            emit({"status": "exists", "path": str(path), **asdict(existing)})
            return
    try:
        deployer = load_deployer(settings)
        signer = load_signer(settings)
    except SigningKeyError as exc:
        raise BadUsage(str(exc)) from exc
    try:
        record = deploy_platform(
            w3,
            deployer,
            signer=signer.address,
            fee_wallet=settings.fee_address or signer.address,
            grace_seconds=grace_seconds,
        )
    except (ChainTxFailed, ProviderError) as exc:
        raise Failed(f"deployment failed: {exc}") from exc
    record.save(path)
    emit({"status": "created", "path": str(path), **asdict(record)})
