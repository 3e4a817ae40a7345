"""What the end-to-end tests share: the platform deployed on anvil, an admin API on a database of
the test's own, and real `tracechain worker`, `sender` and `beat` processes on a Redis database of
the module's own, stopped at the end whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import sqlalchemy as sa
from flask.testing import FlaskClient
from web3 import Web3

from admin_api.app import close_app, create_app
from admin_api.auth import create_api_key
from contracts.anvil import AnvilNode, start_anvil
from contracts.deploy import deploy_platform
from contracts.deployment import Deployment
from ledger import db
from ledger.settings import load_settings
from tests.conftest import APP_ROLE, Databases

BIN = Path(sys.executable).parent
TRACE = 10**18


def own_redis_db(url: str, number: int) -> str:
    """The test Redis server on database ``number``, one per e2e module, so its queues meet no
    other test's. An embedded server is already this test worker's own and is used as it is."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    return urlunsplit(parts._replace(path=f"/{number}"))


class World:
    """The running platform: chain, contracts, database, API client, staff keys, processes."""

    WAIT_S = 90.0

    def __init__(
        self,
        anvil: AnvilNode,
        deployment: Deployment,
        engine: sa.Engine,
        client: FlaskClient,
        keys: dict[str, str],
        env: dict[str, str],
    ) -> None:
        self.anvil = anvil
        self.w3 = Web3(Web3.HTTPProvider(anvil.url))
        self.deployment = deployment
        self.engine = engine
        self.client = client
        self.keys = keys
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        self.processes[name] = subprocess.Popen(
            [str(BIN / "tracechain"), *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Until ``check`` holds, or fail after ``WAIT_S``; a process that died fails at once."""
        deadline = time.monotonic() + self.WAIT_S
        while time.monotonic() < deadline:
            if check():
                return
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} exited with {process.returncode}"
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")


W = TypeVar("W", bound="World")


@contextlib.contextmanager
def running_platform(
    make: Callable[[AnvilNode, Deployment, sa.Engine, FlaskClient, dict[str, str], dict[str, str]], W],
    databases: Databases,
    template_db: str,
    redis_url: str,
    work: Path,
    *,
    redis_db: int,
    keys: Mapping[str, str],
    env: Mapping[str, str],
) -> Iterator[W]:
    """Deploy on a fresh anvil (a block a second), make the world with ``make`` (staff ``keys``:
    name -> role; ``env`` adds to the settings every process gets), start the worker, the sender
    and beat, and yield it; stop them all and clean up afterwards."""
    broker = own_redis_db(redis_url, redis_db)
    redis.Redis.from_url(broker).flushdb()
    database_url = databases.url(databases.create(template=template_db))
    engine = db.make_engine(database_url, role=APP_ROLE, pool_size=4)
    with start_anvil(block_time_s=1.0) as anvil:
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        deployer, signer, fees = anvil.accounts[:3]
        deployment = deploy_platform(w3, deployer, signer=signer.address, fee_wallet=fees.address)
        deployment.save(work / "deployment.json")
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TRACE_")},
            "TRACE_DATABASE_URL": database_url,
            "TRACE_REDIS_URL": broker,
            "TRACE_RPC_URL": anvil.url,
            "TRACE_DATA_DIR": str(work),
            "TRACE_DEPLOYMENT_FILE": str(work / "deployment.json"),
            "TRACE_SIGNER_KEY": anvil.private_keys[1],
            "TRACE_CONFIRMATIONS": "1",
            "TRACE_INDEXER_INTERVAL_S": "0.5",
            "TRACE_SENDER_INTERVAL_S": "0.5",
            "TRACE_LOG_LEVEL": "WARNING",
            **env,
        }
        app = create_app(load_settings(full_env), engine=engine)
        with engine.begin() as conn:
            staff = {name: create_api_key(conn, role, f"e2e {name}") for name, role in keys.items()}
        world = make(anvil, deployment, engine, app.test_client(), staff, full_env)
        try:
            world.start("worker", "worker", "--concurrency", "2")
            world.start("sender", "sender")
            world.start("beat", "beat", "--schedule-file", str(work / "beat-schedule"))
            yield world
        finally:
            for name in list(world.processes):
                world.kill(name, signal.SIGTERM)
            close_app(app)
            engine.dispose()
            redis.Redis.from_url(broker).flushdb()
