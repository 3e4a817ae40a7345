"""``tracechain web`` (the admin API under gunicorn) and ``tracechain dev`` (everything local)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import structlog

from admin_api.cli.runtime import Failed, cli_actor, database_url, require_head, shown_url
from ledger import db
from ledger.settings import Settings

log = structlog.get_logger(__name__)

WEB_START_TIMEOUT_S = 60.0
WEB_STOP_TIMEOUT_S = 20.0
ADMIN_KEY_FILE = "admin-api-key"


def _gunicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "bind": f"{settings.api_host}:{settings.api_port}",
        "workers": settings.api_workers,
        # Threads let concurrent requests of one worker share a posting batch (coalescing).
        "worker_class": "gthread",
        "threads": settings.api_threads,
        "proc_name": "tracechain-web",
        "loglevel": settings.log_level.lower(),
        "errorlog": "-",
        "accesslog": None,  # the app logs each request itself, as JSON
        "graceful_timeout": 10,
        "timeout": 60,
        # Newer gunicorns open a control socket at one fixed path per user; servers would collide.
        "control_socket_disable": True,
    }


@click.command("web")
@click.pass_obj
def web(settings: Settings) -> None:
    """Serve the admin API under gunicorn.

    It listens on TRACE_API_HOST:TRACE_API_PORT with TRACE_API_WORKERS workers.
    """
    from gunicorn.app.base import BaseApplication

    from admin_api.app import create_app

    class _Server(BaseApplication):  # type: ignore[misc]
        def __init__(self, factory: Callable[[], Any], options: dict[str, Any]) -> None:
            self.factory = factory
            self.options = options
            super().__init__()

        def load_config(self) -> None:
            for name, value in self.options.items():
                if name in self.cfg.settings:  # settings of newer gunicorns are skipped by older
                    self.cfg.set(name, value)

        def load(self) -> Any:
            return self.factory()

    with database_url(settings) as url:
        require_head(url)
        served = replace(settings, database_url=url)
        log.info("web.starting", bind=f"{settings.api_host}:{settings.api_port}", database=shown_url(url))
        # Each worker builds its own app (engine, posting queue threads) after the fork.
        _Server(lambda: create_app(served), _gunicorn_options(settings)).run()


# --- dev -------------------------------------------------------------------------------------


def _shown_redis(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, replacing it atomically."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text + "\n")
        os.chmod(partial, 0o600)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def ensure_admin_key(settings: Settings, url: str) -> tuple[str, bool]:
    """The dev admin API key kept in the data directory; (key, created now)."""
    from admin_api.auth import authenticate, create_api_key
    from admin_api.errors import Problem

    path = settings.data_dir / ADMIN_KEY_FILE
    engine = db.make_engine(url, role=settings.db_role, pool_size=1)
    try:
        with engine.begin() as conn:
            stored = path.read_text().strip() if path.exists() else ""
            if stored:
                try:
                    _prefix, role = authenticate(conn, f"Bearer {stored}")
                except Problem:
                    role = ""
                if role == "admin":
                    os.chmod(path, 0o600)
                    return stored, False
            key = create_api_key(conn, "admin", "tracechain dev", actor=cli_actor("dev"))
            _write_secret(path, key)  # before the commit: no stored key the file does not hold
            return key, True
    finally:
        engine.dispose()


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()  # gunicorn: graceful shutdown
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("dev.web_kill", pid=process.pid)
        process.kill()
        process.wait(5)


def _wait_until_serving(process: subprocess.Popen[bytes], api_url: str, stop: threading.Event) -> bool:
    """True once the API answers /healthz; False if asked to stop first."""
    import httpx

    deadline = time.monotonic() + WEB_START_TIMEOUT_S
    while not stop.is_set():
        if process.poll() is not None:
            raise Failed(f"the admin API exited with status {process.returncode} while starting")
        try:
            if httpx.get(f"{api_url}/healthz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise Failed(f"the admin API did not answer at {api_url} within {WEB_START_TIMEOUT_S:.0f} s")
        stop.wait(0.1)
    return False


CHAIN_START_TIMEOUT_S = 60.0
DEV_BLOCK_TIME_S = 1  # the dev chain mines on its own too, so confirmations accrue while idle
# Roles of the development accounts (well-known keys: development only).
DEV_DEPLOYER, DEV_SIGNER, DEV_FEE_WALLET = 0, 1, 2


def _wait_for_chain(
    process: subprocess.Popen[bytes] | None, rpc_url: str, stop: threading.Event
) -> int | None:
    """The chain id once the node answers; None if asked to stop first."""
    import httpx

    deadline = time.monotonic() + CHAIN_START_TIMEOUT_S
    while not stop.is_set():
        if process is not None and process.poll() is not None:
            raise Failed(f"the dev chain exited with status {process.returncode} while starting")
        try:
            answer = httpx.post(
                rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=2.0
            ).json()
            return int(answer["result"], 16)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            raise Failed(f"no chain answered at {rpc_url} within {CHAIN_START_TIMEOUT_S:.0f} s")
        stop.wait(0.2)
    return None


def _chain_settings(settings: Settings, embedded_chain: bool) -> Settings:
    """With the embedded dev chain and no keys configured, the development accounts sign."""
    if not embedded_chain or settings.signer_key or settings.signer_keystore:
        return settings
    from eth_account import Account

    from contracts.anvil import dev_private_key

    return replace(
        settings,
        signer_key=dev_private_key(DEV_SIGNER),
        deployer_key=settings.deployer_key or dev_private_key(DEV_DEPLOYER),
        fee_address=settings.fee_address or Account.from_key(dev_private_key(DEV_FEE_WALLET)).address,
    )


def _deploy_once(settings: Settings, rpc_url: str) -> tuple[Any, bool]:
    """The live deployment of the record, or a new one written to it; (record, created now)."""
    from web3 import Web3

    from contracts.deploy import deploy_platform, is_live
    from contracts.deployment import Deployment, DeploymentError
    from workers.keys import SigningKeyError, load_deployer, load_signer

    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    path = settings.deployment_path
    if path.exists():
        try:
            existing = Deployment.load(path)
        except DeploymentError as exc:
            raise Failed(str(exc)) from exc
        if is_live(w3, existing):
            return existing, False
        log.warning("dev.redeploy", reason="the recorded contracts are not on this chain", path=str(path))
    try:
        deployer, signer = load_deployer(settings), load_signer(settings)
    except SigningKeyError as exc:
        raise Failed(str(exc)) from exc
    record = deploy_platform(
        w3, deployer, signer=signer.address, fee_wallet=settings.fee_address or signer.address
    )
    record.save(path)
    return record, True


def _child_env(settings: Settings, **urls: str) -> dict[str, str]:
    env = {**os.environ, **urls, "TRACE_DEPLOYMENT_FILE": str(settings.deployment_path.resolve())}
    env["TRACE_DATA_DIR"] = str(settings.data_dir.resolve())
    for name, value in (
        ("TRACE_SIGNER_KEY", settings.signer_key),
        ("TRACE_DEPLOYER_KEY", settings.deployer_key),
        ("TRACE_FEE_ADDRESS", settings.fee_address),
    ):
        if value:
            env[name] = value
    return env


@click.command("dev")
@click.pass_obj
def dev(settings: Settings) -> None:
    """Run everything locally: PostgreSQL, Redis, the dev chain, the admin API and the workers.

    Starts the servers and the dev chain, migrates, deploys the contracts once, makes sure an
    admin API key exists, then runs the admin API, the Celery worker, the sender and beat.

    Without TRACE_DATABASE_URL / TRACE_REDIS_URL the embedded servers run under TRACE_DATA_DIR
    and keep their data there for the next start; without TRACE_RPC_URL the embedded dev chain
    runs on TRACE_CHAIN_PORT (its state lives in memory: a restart deploys again). Ctrl-C (or
    SIGTERM) stops everything.
    """
    from admin_api.embedded import EmbeddedService, EmbeddedServiceError, start_postgres, start_redis

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("dev.stopping", signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    services: list[EmbeddedService] = []
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start_child(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Its own session: a terminal's Ctrl-C reaches only us, and we stop children in order.
        process = subprocess.Popen(
            [sys.executable, "-m", "admin_api.cli", *args], env=env, start_new_session=True
        )
        children.append((name, process))
        return process

    try:
        # The admin key and the deployment record live there, whichever servers are embedded.
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if settings.database_url:
                pg_url = settings.database_url
            else:
                services.append(start_postgres(settings.data_dir))
                pg_url = services[-1].url
            if settings.redis_url:
                redis_url = settings.redis_url
            else:
                services.append(start_redis(settings.data_dir))
                redis_url = services[-1].url
        except EmbeddedServiceError as exc:
            raise Failed(f"cannot start an embedded server: {exc}") from exc
        if stop.is_set():
            return
        embedded_chain = not settings.rpc_url
        rpc_url = settings.rpc_url or f"http://127.0.0.1:{settings.chain_port}"
        chain_process = None
        if embedded_chain:
            chain_process = start_child(
                "chain",
                ["chain", "--port", str(settings.chain_port), "--block-time", str(DEV_BLOCK_TIME_S)],
                {**os.environ},
            )
        chain_id = _wait_for_chain(chain_process, rpc_url, stop)
        if chain_id is None:
            return
        revision = db.upgrade(pg_url, role=settings.db_role)
        key, created = ensure_admin_key(settings, pg_url)
        settings = _chain_settings(settings, embedded_chain)
        deployment, deployed = _deploy_once(settings, rpc_url)
        if stop.is_set():
            return
        env = _child_env(
            settings, TRACE_DATABASE_URL=pg_url, TRACE_REDIS_URL=redis_url, TRACE_RPC_URL=rpc_url
        )
        web_process = start_child("web", ["web"], env)
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        if not _wait_until_serving(web_process, api_url, stop):
            return
        start_child("worker", ["worker", "--concurrency", "1"], env)
        start_child("sender", ["sender"], env)
        start_child("beat", ["beat"], env)
        chain_note = ", embedded dev chain" if embedded_chain else ""
        from web3 import Web3

        checksum = Web3.to_checksum_address
        for line in (
            "TraceChain dev is running; Ctrl-C stops it.",
            f"  API:            {api_url}",
            f"  API docs:       {api_url}/docs",
            f"  OpenAPI:        {api_url}/openapi.json",
            f"  PostgreSQL:     {shown_url(pg_url)}  (revision {revision})",
            f"  Redis:          {_shown_redis(redis_url)}",
            f"  Chain:          {rpc_url}  (chain id {chain_id}{chain_note})",
            f"  Token:          {checksum(deployment.token)}" + ("  (deployed now)" if deployed else ""),
            f"  Escrow:         {checksum(deployment.escrow)}",
            f"  Staking vault:  {checksum(deployment.vault)}",
            f"  Treasury:       {checksum(deployment.treasury)}",
            "  Workers:        worker (ledger, chain queues), sender (chain-send), beat",
            f"  Admin API key:  {key}" + ("  (new)" if created else ""),
            f"  Data:           {settings.data_dir.resolve()}",
        ):
            click.echo(line)
        while not stop.wait(0.5):
            for name, process in children:
                if process.poll() is not None:
                    raise Failed(f"{name} exited with status {process.returncode}")
    finally:
        for name, process in reversed(children):
            log.info("dev.stopping_process", process=name)
            _stop_process(process, WEB_STOP_TIMEOUT_S)
        for service in reversed(services):
            try:
                service.stop()
            except EmbeddedServiceError as exc:
                log.error("dev.stop_failed", service=service.name, error=str(exc))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("dev.stopped")
