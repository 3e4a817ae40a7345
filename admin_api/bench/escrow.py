"""`tracechain bench escrow`: escrows settled end to end per second, through the real workers.

The command starts its own anvil (deployed on automine, then mining a block every
``BLOCK_TIME_S`` as a real chain does, see ``tracechain bench sender``), a scratch database on
``TRACE_DATABASE_URL``'s server or the embedded PostgreSQL, and the worker processes as the
Procfile runs them: ``tracechain worker`` (the indexer task and the escrow sweep), ``tracechain
sender`` (the chain-send queue) and ``tracechain beat``, with confirmations 1 and the intervals of
:data:`WORKER_SETTINGS`. Their broker is ``TRACE_REDIS_URL`` (refused while another worker
consumes it; its TraceChain queues are purged before and after the run) or, when it is unset, a
private embedded Redis in a temporary directory.

Not measured: the escrows are created through the service (two attestors, threshold 2, 2.5 %
fee, a few sellers), each buyer (dev accounts 3 to 9) is minted its TRACE and approves the escrow
contract once, every ``fund`` transaction is signed and every delivery signed by both
attestors beforehand. The clock starts when the first ``fund`` transaction is broadcast (all of
them go as raw transactions in JSON-RPC batches) and stops when every escrow is ``released``
with no outbox row open. In between, the workers index the ``Funded`` events; this process
records the attestations through :func:`workers.escrow_saga.attest` with the fast verifier, one
transaction each as the API does, and the second one starts the release saga; the sender
signs, broadcasts and settles the releases (posting their holds) while the indexer books the
``Released`` events. ``escrows_per_s`` is the escrows divided by that time. The baseline, on the
same node and workers in the same run, settles a sample one escrow at a time.

``verify_ms_p50`` times, for each verifier, one attestation's ``verify`` plus the
``FastAggregateVerify`` of the escrow's aggregate (both attestors), over a sample of escrows,
outside the measured flow. Afterwards the command checks the books against the chain: every
escrow released for its amount less the fee, every outbox row confirmed, each seller's and the
fee wallet's token balance equal to what the ledger paid them, every custody mirror equal to
its ``balanceOf``, no hold open, no exception raised, the books balanced.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import milagro_bls_binding as milagro
import redis
import sqlalchemy as sa
from celery import Celery
from eth_abi import abi as eth_abi
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from eth_utils.crypto import keccak
from rich.console import Console
from rich.table import Table
from web3 import Web3

from admin_api.bench.chain import (
    TRACE,
    _anvil,
    _database_name,
    _deploy,
    _emit,
    _mark,
    _migrated_engine,
    _per_s,
    _Platform,
    _ratio,
    _recipient,
    _run,
    database_server,
)
from admin_api.bench.ledger import (
    BenchError,
    BenchProgress,
    scratch_database,
    shielded_from_interrupts,
    terminate_as_interrupt,
)
from contracts.anvil import AnvilNode, dev_private_key
from contracts.bindings import transact
from contracts.client import json_rpc_batch, rpc_error_text
from contracts.deployment import Deployment
from ledger import custody, db
from ledger.accounts import get_account
from ledger.check import check_ledger
from ledger.escrow import attestation, service
from ledger.settings import Settings, load_settings
from workers import escrow_saga
from workers.app import make_celery
from workers.sender import PRIORITY_FEE_DEFAULT

TARGET_ESCROWS_PER_S = 50
BLOCK_TIME_S = 1  # whole seconds: what evm_setIntervalMining takes
CONFIRMATIONS = 1
FEE_BPS = 250
THRESHOLD = 2
ATTESTOR_NAMES = ("bench-carrier", "bench-customs")
BUYER_ACCOUNTS = range(3, 10)  # anvil's dev accounts 3..9 (0 deploys, 1 signs, 2 takes the fees)
SELLERS = 20
DEADLINE_DAYS = 7
CREATE_BATCH = 250  # escrows created per database transaction (set-up)
GAS_HEADROOM_PERCENT = 25
FUND_FEE_FACTOR = 10  # the buyers' max fee: this many times the base fee, so a busy block never strands one
HOT_VERIFIER = "blst"  # what the workers and the attesters verify with (TRACE_BLS_VERIFIER)
FAST_VERIFIERS = ("blst", "milagro")  # timed besides the reference, py-ecc
ATTESTERS = 2  # as many as the API's worker processes by default (TRACE_API_WORKERS)
ATTEST_BATCH = 500  # funded escrows attested per look-up
POLL_S = 0.05
STALL_S = 120.0  # no escrow moved for this long: the run cannot finish
WORKER_READY_TIMEOUT_S = 90.0
WORKER_STOP_TIMEOUT_S = 20.0
PING_TIMEOUT_S = 1.0
LOG_TAIL_CHARS = 3000
_FUND_SELECTOR = keccak(text="fund(bytes32,address,uint256,uint64)")[:4]

# What the bench passes to the worker processes (besides the URLs, the key and the deployment).
WORKER_SETTINGS: dict[str, str] = {
    "TRACE_CONFIRMATIONS": str(CONFIRMATIONS),
    "TRACE_INDEXER_INTERVAL_S": "0.2",
    "TRACE_SENDER_INTERVAL_S": "0.2",
    # The default (64) caps releases at 64 a confirmation round trip, about 32 a second here.
    "TRACE_SENDER_MAX_IN_FLIGHT": "2000",
    # Beyond any run: a fee bump would only mean the node is not keeping up.
    "TRACE_SENDER_BUMP_AFTER_S": "120",
    "TRACE_ESCROW_SWEEP_INTERVAL_S": "30",
    "TRACE_INDEXER_WINDOW_BLOCKS": "2000",
    "TRACE_BLS_VERIFIER": HOT_VERIFIER,
    "TRACE_LOG_LEVEL": "WARNING",
}
WORKER_COMMANDS = (("beat", ("beat",)), ("worker", ("worker",)), ("sender", ("sender",)))


# --- plans -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EscrowPlan:
    name: str
    escrows: int  # settled together, measured
    sample: int  # settled one at a time for the baseline
    fast_samples: int  # escrows whose verification is timed with each fast verifier
    py_ecc_samples: int  # and with py-ecc (about a second each)
    attesters: int = ATTESTERS  # processes recording attestations, as the API's workers do


FULL = EscrowPlan("full", escrows=1_000, sample=5, fast_samples=50, py_ecc_samples=20)
QUICK = EscrowPlan("quick", escrows=150, sample=2, fast_samples=50, py_ecc_samples=3)


# --- the world: chain, escrows, signatures ---------------------------------------------------


@dataclass(frozen=True)
class _Attestor:
    id: int
    secret: int
    pubkey: bytes


@dataclass(frozen=True)
class _Prepared:
    """Everything made before the clock starts."""

    escrows: list[service.Escrow]  # the measured ones, then the baseline's
    fund_txs: list[str]  # raw signed ``fund`` transactions (0x hex), one per escrow, same order
    signatures: dict[str, list[tuple[int, bytes]]]  # escrow id -> (attestor id, signature)
    attestors: list[_Attestor]
    fund_gas: int


def _buyers() -> list[LocalAccount]:
    return [Account.from_key(dev_private_key(i)) for i in BUYER_ACCOUNTS]


def _seller(index: int) -> str:
    return _recipient("escrow-seller", index % SELLERS)


def _amount(index: int) -> int:
    return 10 * TRACE + index  # distinct amounts, so a release paid twice would show in the sums


def _register_attestors(engine: sa.Engine) -> list[_Attestor]:
    attestors = []
    for name in ATTESTOR_NAMES:
        secret, pubkey, pop = attestation.generate_attestor(f"{name}:key-seed".encode().ljust(32, b"-"))
        with engine.begin() as conn:
            attestor_id, _ = service.register_attestor(conn, name, pubkey, pop)
        attestors.append(_Attestor(attestor_id, secret, pubkey))
    return attestors


def _create_escrows(
    engine: sa.Engine, platform: _Platform, attestors: Sequence[_Attestor], count: int
) -> list[service.Escrow]:
    deployment = platform.deployment
    chain_now = datetime.fromtimestamp(int(platform.w3.eth.get_block("latest")["timestamp"]), UTC)
    deadline = (chain_now + timedelta(days=DEADLINE_DAYS)).replace(microsecond=0)
    buyers = _buyers()
    escrows: list[service.Escrow] = []
    for start in range(0, count, CREATE_BATCH):
        with engine.begin() as conn:
            for i in range(start, min(count, start + CREATE_BATCH)):
                new = service.NewEscrow(
                    key=f"bench-escrow-{i}",
                    chain_id=deployment.chain_id,
                    contract=deployment.escrow,
                    buyer=buyers[i % len(buyers)].address,
                    seller=_seller(i),
                    amount=_amount(i),
                    fee_bps=FEE_BPS,
                    deadline=deadline,
                    delivery_ref=f"BOL-bench-{i}",
                    attestor_ids=tuple(a.id for a in attestors),
                    threshold=THRESHOLD,
                )
                escrow, _ = service.create_escrow(conn, new, "bench:escrow")
                escrows.append(escrow)
    return escrows


def _sign_deliveries(
    escrows: Sequence[service.Escrow], attestors: Sequence[_Attestor]
) -> dict[str, list[tuple[int, bytes]]]:
    """Every attestor's signature of every escrow's delivery message. milagro signs: the scheme is
    deterministic, so these are the bytes py-ecc's ``sign_delivery`` makes, a hundred times faster."""
    keys = [(a.id, a.secret.to_bytes(32, "big")) for a in attestors]
    return {
        escrow.id: [
            (attestor_id, bytes(milagro.Sign(secret, service.delivery_message_of(escrow))))
            for attestor_id, secret in keys
        ]
        for escrow in escrows
    }


def _fund_calldata(escrow: service.Escrow) -> bytes:
    return _FUND_SELECTOR + eth_abi.encode(
        ["bytes32", "address", "uint256", "uint64"],
        [bytes.fromhex(escrow.id[2:]), escrow.seller, escrow.amount, int(escrow.deadline.timestamp())],
    )


def _prepare_buyers(platform: _Platform, escrows: Sequence[service.Escrow]) -> None:
    """Mint each buyer what its escrows need and approve the escrow contract for it, once."""
    w3, token = platform.w3, platform.token
    escrow_contract = Web3.to_checksum_address(platform.deployment.escrow)
    for buyer in _buyers():
        total = sum(e.amount for e in escrows if e.buyer == buyer.address.lower())
        transact(w3, token.functions.mint(buyer.address, total), platform.signer)
        transact(w3, token.functions.approve(escrow_contract, total), buyer)


def _sign_fundings(platform: _Platform, escrows: Sequence[service.Escrow]) -> tuple[list[str], int]:
    """Each escrow's ``fund`` transaction signed by its buyer, nonces in escrow order; (raw, gas)."""
    w3, deployment = platform.w3, platform.deployment
    buyers = {b.address.lower(): b for b in _buyers()}
    first = escrows[0]
    # The first funding of the contract costs the most (its token balance slot goes from zero).
    estimate = int(
        w3.eth.estimate_gas(
            {
                "from": Web3.to_checksum_address(first.buyer),
                "to": Web3.to_checksum_address(deployment.escrow),
                "data": _fund_calldata(first),
            }
        )
    )
    gas = estimate + estimate * GAS_HEADROOM_PERCENT // 100
    base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
    max_fee = FUND_FEE_FACTOR * base_fee + PRIORITY_FEE_DEFAULT
    nonces = {a: int(w3.eth.get_transaction_count(b.address, "pending")) for a, b in buyers.items()}
    raws = []
    for escrow in escrows:
        buyer = buyers[escrow.buyer]
        signed = buyer.sign_transaction(
            {
                "type": 2,
                "chainId": deployment.chain_id,
                "nonce": nonces[escrow.buyer],
                "to": Web3.to_checksum_address(deployment.escrow),
                "data": _fund_calldata(escrow),
                "value": 0,
                "gas": gas,
                "maxFeePerGas": max_fee,
                "maxPriorityFeePerGas": PRIORITY_FEE_DEFAULT,
            }
        )
        nonces[escrow.buyer] += 1
        raws.append("0x" + bytes(signed.raw_transaction).hex())
    return raws, gas


def _prepare(engine: sa.Engine, platform: _Platform, count: int, progress: BenchProgress) -> _Prepared:
    attestors = progress.step(
        "Registering two attestors (proofs checked with py-ecc)", lambda: _register_attestors(engine)
    )
    escrows = progress.step(
        f"Creating {count:,} escrows", lambda: _create_escrows(engine, platform, attestors, count)
    )
    progress.step(
        "Minting to the buyers, approving the escrow contract", lambda: _prepare_buyers(platform, escrows)
    )
    fund_txs, gas = progress.step(
        f"Signing {count:,} fund transactions", lambda: _sign_fundings(platform, escrows)
    )
    signatures = progress.step(
        f"Signing {count * len(attestors):,} deliveries", lambda: _sign_deliveries(escrows, attestors)
    )
    return _Prepared(escrows, fund_txs, signatures, attestors, gas)


# --- the verifiers ---------------------------------------------------------------------------


def _verify_ms(name: str, prepared: _Prepared, samples: int, progress: BenchProgress) -> list[float]:
    """Per escrow: one attestation's verify plus FastAggregateVerify of the escrow's aggregate (ms)."""
    verifier = attestation.verifier(name)
    pubkeys = {a.id: a.pubkey for a in prepared.attestors}
    cases = prepared.escrows[:samples]
    task = progress.task(f"Timing the {name} verifier on {len(cases)} escrows", len(cases))
    timings = []
    for number, escrow in enumerate(cases):
        message = service.delivery_message_of(escrow)
        signed = prepared.signatures[escrow.id]
        keys = [pubkeys[attestor_id] for attestor_id, _ in signed]
        aggregate = bytes(milagro.Aggregate([signature for _, signature in signed]))
        started = time.perf_counter()
        valid = verifier.verify(keys[0], message, signed[0][1]) and verifier.fast_aggregate_verify(
            keys, message, aggregate
        )
        timings.append((time.perf_counter() - started) * 1000)
        if not valid:
            raise BenchError(f"{name} refused the attestations of escrow {escrow.id}")
        progress.update(task, number + 1)
    return timings


# --- the broker and the workers --------------------------------------------------------------


def _celery(redis_url: str) -> Celery:
    return make_celery(replace(load_settings({}), redis_url=redis_url))


def _shown_redis(url: str) -> str:
    parsed = redis.connection.parse_url(url)
    return f"redis://{parsed.get('host', '?')}:{parsed.get('port', 6379)}/{parsed.get('db', 0)}"


@contextlib.contextmanager
def broker(settings: Settings, scratch_dir: Path) -> Iterator[str]:
    """``TRACE_REDIS_URL`` if set and no worker consumes it (its queues purged before and after),
    else a private embedded Redis under ``scratch_dir``, stopped afterwards."""
    if settings.redis_url is None:
        from admin_api.embedded import start_redis

        service_ = start_redis(scratch_dir / "redis")
        try:
            yield service_.url
        finally:
            with shielded_from_interrupts():
                service_.stop()
        return
    url = settings.redis_url
    celery = _celery(url)
    replies = celery.control.ping(timeout=PING_TIMEOUT_S) or []
    if replies:
        names = ", ".join(sorted(name for reply in replies for name in reply))
        raise BenchError(
            f"Celery workers ({names}) already consume {_shown_redis(url)}; the bench's workers would"
            " take their tasks. Point TRACE_REDIS_URL at a Redis database no TraceChain uses, or unset it."
        )
    # Only ticks of idempotent sweeps go to these queues; with nobody consuming them they are stale.
    celery.control.purge()
    try:
        yield url
    finally:
        with shielded_from_interrupts():
            celery.control.purge()


def _worker_env(
    settings: Settings, database_url: str, redis_url: str, node: AnvilNode, scratch_dir: Path
) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    return (
        inherited
        | WORKER_SETTINGS
        | {
            "TRACE_DATABASE_URL": database_url,
            "TRACE_DB_ROLE": settings.db_role,
            "TRACE_REDIS_URL": redis_url,
            "TRACE_RPC_URL": node.url,
            "TRACE_DEPLOYMENT_FILE": str(scratch_dir / "deployment.json"),
            "TRACE_SIGNER_KEY": dev_private_key(1),
            "TRACE_DATA_DIR": str(scratch_dir),
        }
    )


@dataclass
class _Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        # Celery's warm shutdown: the running task finishes, the reserved ones go back to the queue.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def worker_processes(env: dict[str, str], scratch_dir: Path) -> Iterator[list[_Worker]]:
    """beat, the worker and the sender as the Procfile runs them; stopped (beat first) at the end."""
    workers: list[_Worker] = []
    try:
        for name, args in WORKER_COMMANDS:
            log = scratch_dir / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "admin_api.cli", *args],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            workers.append(_Worker(name, process, log))
        yield workers
    finally:
        with shielded_from_interrupts():
            for worker in workers:
                worker.stop()


def _check_alive(workers: Sequence[_Worker]) -> None:
    for worker in workers:
        if worker.process.poll() is not None:
            raise BenchError(
                f"`tracechain {worker.name}` exited with status {worker.process.returncode}:\n{worker.tail()}"
            )


def _wait_ready(celery: Celery, engine: sa.Engine, workers: Sequence[_Worker], chain_id: int) -> None:
    """Both Celery workers answer, and beat's ticks reach the indexer (its cursor exists)."""
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    answered: set[str] = set()
    while time.monotonic() < deadline:
        _check_alive(workers)
        for reply in celery.control.ping(timeout=PING_TIMEOUT_S) or []:
            answered.update(name.split("@", 1)[0] for name in reply)
        with engine.connect() as conn:
            indexed = conn.execute(
                sa.text("SELECT 1 FROM chain_cursors WHERE chain_id = :c"), {"c": chain_id}
            ).first()
        if {"worker", "sender"} <= answered and indexed is not None:
            return
        time.sleep(POLL_S)
    raise BenchError(
        f"the workers were not ready within {WORKER_READY_TIMEOUT_S:.0f} s (answered: {sorted(answered)})"
    )


# --- the measured flow -----------------------------------------------------------------------


def _broadcast(w3: Web3, raws: Sequence[str]) -> None:
    """Send raw transactions, as JSON-RPC batches where the node takes them."""
    calls = [("eth_sendRawTransaction", [raw]) for raw in raws]
    answers = json_rpc_batch(w3, calls)
    if answers is None:
        answers = [{"result": w3.eth.send_raw_transaction(HexStr(raw)).hex()} for raw in raws]
    for answer in answers:
        error = rpc_error_text(answer)
        if error is not None:
            raise BenchError(f"the node refused a fund transaction: {error}")


def _attest_funded(
    engine: sa.Engine,
    deployment: Deployment,
    signatures: dict[str, list[tuple[int, bytes]]],
    verifier: attestation.Verifier,
    timings: dict[str, list[float]],
) -> int:
    """Record both attestations of every funded escrow of ``signatures``, one transaction each as
    the API does (the second starts the release saga); returns the escrows attested. Each
    transaction's milliseconds go to ``timings`` under ``first`` or ``second``."""
    with engine.connect() as conn:
        funded = (
            conn.execute(
                sa.text(
                    "SELECT id FROM escrows WHERE status = 'funded' AND id = ANY(:ids) ORDER BY id LIMIT :n"
                ),
                {"ids": list(signatures), "n": ATTEST_BATCH},
            )
            .scalars()
            .all()
        )
    for escrow_id in funded:
        for which, (attestor_id, signature) in zip(("first", "second"), signatures[escrow_id], strict=True):
            started = time.perf_counter()
            with engine.begin() as conn:
                escrow_saga.attest(
                    conn, deployment, escrow_id, attestor_id, signature, verifier, f"attestor:{attestor_id}"
                )
            timings[which].append((time.perf_counter() - started) * 1000)
    return len(funded)


@dataclass(frozen=True)
class _AttesterJob:
    database_url: str
    role: str
    deployment: Deployment
    signatures: dict[str, list[tuple[int, bytes]]]  # this attester's share of the escrows


def _attester_main(job: _AttesterJob, ready: Any, stop: Any, results: Any) -> None:
    """An attester process: attests its share of the escrows as they get funded until ``stop``, then
    sends its timings (or the failure) to ``results``."""
    engine = db.make_engine(job.database_url, role=job.role, pool_size=1)
    verifier = attestation.verifier(HOT_VERIFIER)
    timings: dict[str, list[float]] = {"first": [], "second": []}
    try:
        ready.set()
        while not stop.is_set():
            if not _attest_funded(engine, job.deployment, job.signatures, verifier, timings):
                stop.wait(POLL_S)
        results.put(timings)
    except KeyboardInterrupt:
        pass  # the terminal's Ctrl-C reaches the whole group; the parent cleans up
    except Exception:
        results.put(traceback.format_exc()[-LOG_TAIL_CHARS:])
        raise SystemExit(1) from None
    finally:
        engine.dispose()


class Attesters:
    """Processes recording the attestations, each for its share of the escrows, as the API's
    worker processes take them."""

    def __init__(self, database_url: str, role: str, deployment: Deployment, prepared: _Prepared, count: int):
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._results: Any = ctx.Queue()
        self._children: list[Any] = []
        self.timings: dict[str, list[float]] = {"first": [], "second": []}
        ids = list(prepared.signatures)
        readies = []
        for k in range(count):
            share = {escrow_id: prepared.signatures[escrow_id] for escrow_id in ids[k::count]}
            ready = ctx.Event()
            child = ctx.Process(
                target=_attester_main,
                args=(_AttesterJob(database_url, role, deployment, share), ready, self._stop, self._results),
                name=f"attester-{k}",
                daemon=True,
            )
            child.start()
            self._children.append(child)
            readies.append(ready)
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        for child, ready in zip(self._children, readies, strict=True):
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise BenchError(f"{child.name} did not start within {WORKER_READY_TIMEOUT_S:.0f} s")

    def check(self) -> None:
        """Raise if an attester died (with its traceback)."""
        for child in self._children:
            if child.exitcode is not None:
                raise BenchError(f"{child.name} failed:\n{self._failure(child.exitcode)}")

    def _failure(self, exitcode: int) -> str:
        try:
            result = self._results.get(timeout=1.0)
        except queue.Empty:
            return f"exit status {exitcode}"
        return result if isinstance(result, str) else f"exit status {exitcode}"

    def stop(self) -> None:
        """Stop every attester and collect their timings (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        for _ in self._children:
            try:
                result = self._results.get(timeout=WORKER_STOP_TIMEOUT_S)
            except queue.Empty:
                break
            if isinstance(result, str):
                raise BenchError(f"an attester failed:\n{result}")
            for which, values in result.items():
                self.timings[which].extend(values)
        for child in self._children:
            child.join(timeout=WORKER_STOP_TIMEOUT_S)
            if child.is_alive():
                child.terminate()
                child.join(timeout=5)


@contextlib.contextmanager
def attester_processes(
    database_url: str, role: str, deployment: Deployment, prepared: _Prepared, count: int
) -> Iterator[Attesters]:
    """:class:`Attesters`, stopped at the end whatever happens."""
    attesters = Attesters(database_url, role, deployment, prepared, count)
    try:
        yield attesters
    finally:
        with shielded_from_interrupts(), contextlib.suppress(BenchError):
            attesters.stop()


def _progress_counts(engine: sa.Engine) -> tuple[dict[str, int], int, int]:
    """(escrows per status, outbox rows open, outbox rows failed)."""
    with engine.connect() as conn:
        statuses = {
            str(r.status): int(r.n)
            for r in conn.execute(sa.text("SELECT status, count(*) AS n FROM escrows GROUP BY status"))
        }
        open_rows, failed = conn.execute(
            sa.text(
                "SELECT count(*) FILTER (WHERE status NOT IN ('confirmed', 'failed')),"
                " count(*) FILTER (WHERE status = 'failed') FROM chain_outbox"
            )
        ).one()
    return statuses, int(open_rows), int(failed)


def _settle(
    engine: sa.Engine,
    w3: Web3,
    raws: Sequence[str],
    released_target: int,
    check_alive: Callable[[], None],
    on_progress: Callable[[dict[str, int], int], None],
) -> float:
    """Broadcast ``raws`` and wait until ``released_target`` escrows are released and no outbox row
    is open; returns the seconds from the broadcast."""
    started = time.perf_counter()
    _broadcast(w3, raws)
    last_state: tuple[Any, ...] = ()
    moved_at = time.perf_counter()
    while True:
        statuses, open_rows, failed = _progress_counts(engine)
        now = time.perf_counter()
        if failed:
            raise BenchError(f"{failed} outbox row(s) failed on chain")
        if statuses.get("released", 0) >= released_target and open_rows == 0:
            return now - started
        on_progress(statuses, open_rows)
        state = (tuple(sorted(statuses.items())), open_rows)
        if state != last_state:
            last_state, moved_at = state, now
        elif now - moved_at > STALL_S:
            raise BenchError(
                f"no escrow moved for {STALL_S:g} s: {dict(statuses)}, {open_rows} outbox rows open"
            )
        check_alive()
        time.sleep(POLL_S)


def _detail(statuses: dict[str, int], open_rows: int) -> str:
    return (
        f"funded {statuses.get('funded', 0)}, releasing {statuses.get('releasing', 0)},"
        f" released {statuses.get('released', 0)}, outbox open {open_rows}"
    )


def _measure_flow(
    engine: sa.Engine,
    platform: _Platform,
    prepared: _Prepared,
    check_alive: Callable[[], None],
    count: int,
    progress: BenchProgress,
) -> tuple[float, float, int]:
    """Settle the first ``count`` escrows together; (seconds, wall-clock start, blocks mined)."""
    task = progress.task(f"Settling {count:,} escrows (a block every {BLOCK_TIME_S:g} s)", count)

    def shown(statuses: dict[str, int], open_rows: int) -> None:
        progress.update(task, statuses.get("released", 0), _detail(statuses, open_rows))

    first_block = int(platform.w3.eth.block_number)
    wall_start = time.time()
    seconds = _settle(engine, platform.w3, prepared.fund_txs[:count], count, check_alive, shown)
    progress.update(task, count, f"{count:,} released")
    return seconds, wall_start, int(platform.w3.eth.block_number) - first_block


def _measure_baseline(
    engine: sa.Engine,
    platform: _Platform,
    prepared: _Prepared,
    check_alive: Callable[[], None],
    count: int,
    sample: int,
    progress: BenchProgress,
) -> float:
    """Settle ``sample`` more escrows one by one, each released before the next is funded."""
    task = progress.task(f"Baseline: {sample} escrows one at a time", sample)
    seconds = 0.0
    for k in range(sample):
        raw = prepared.fund_txs[count + k]
        seconds += _settle(engine, platform.w3, [raw], count + k + 1, check_alive, lambda *_: None)
        progress.update(task, k + 1)
    return seconds


def _stages(engine: sa.Engine, wall_start: float, ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """Seconds from the first broadcast until each step of the measured escrows: median and last."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT h.to_status AS step, EXTRACT(EPOCH FROM h.at) AS at FROM escrow_history h"
                " WHERE h.to_status IN ('funded', 'releasing', 'released')"
                " AND h.escrow_id = ANY(:ids)"
                " UNION ALL SELECT 'posted', EXTRACT(EPOCH FROM o.updated_at) FROM chain_outbox o"
                " WHERE o.status = 'confirmed' AND o.metadata->>'escrow_id' = ANY(:ids)"
            ),
            {"ids": list(ids)},
        ).all()
    times: dict[str, list[float]] = {}
    for row in rows:
        times.setdefault(str(row.step), []).append(float(row.at) - wall_start)
    return {
        step: {"p50_s": round(statistics.median(values), 3), "last_s": round(max(values), 3)}
        for step, values in times.items()
    }


# --- the checks ------------------------------------------------------------------------------


def _balance_of(platform: _Platform, address: str) -> int:
    return int(platform.token.functions.balanceOf(Web3.to_checksum_address(address)).call())


def _check_books(
    engine: sa.Engine, platform: _Platform, escrows: Sequence[service.Escrow]
) -> dict[str, bool]:
    """Every escrow released, every row confirmed, the chain paid what the books say, books balanced."""
    deployment = platform.deployment
    chain_id = deployment.chain_id
    with engine.connect() as conn:
        final = {e.id: service.get_escrow(conn, e.id) for e in escrows}
        outbox_rows = conn.execute(sa.text("SELECT status FROM chain_outbox")).scalars().all()
        paid_by_seller = {
            str(r.seller): int(r.paid)
            for r in conn.execute(
                sa.text("SELECT seller, sum(released_amount) AS paid FROM escrows GROUP BY seller")
            )
        }
        fees_booked = get_account(conn, service.fees_account()).balance
        mirrors = {a: get_account(conn, custody.mirror_code(chain_id, a)).balance for a in deployment.custody}
        clearing = get_account(conn, custody.clearing_code(chain_id)).balance
        open_holds = conn.execute(
            sa.text("SELECT count(*) FROM ledger_accounts WHERE debits_pending <> 0 OR credits_pending <> 0")
        ).scalar_one()
        exceptions = conn.execute(sa.text("SELECT count(*) FROM finance_exceptions")).scalar_one()
    with engine.connect() as conn:
        summary = check_ledger(conn)
    fees_due = sum(e.fee_for(e.amount) for e in escrows)
    return {
        "all_released": all(
            e.status == "released"
            and e.fee_amount == e.fee_for(e.amount)
            and e.released_amount == e.amount - e.fee_amount
            and e.remaining == 0
            for e in final.values()
        ),
        "outbox_confirmed": len(outbox_rows) == len(escrows) and set(outbox_rows) == {"confirmed"},
        "sellers_paid": all(_balance_of(platform, s) == paid for s, paid in paid_by_seller.items()),
        "fees_paid": _balance_of(platform, deployment.fee_wallet) == fees_booked == fees_due,
        "mirrors_match": clearing == 0 and all(_balance_of(platform, a) == b for a, b in mirrors.items()),
        "holds_closed": int(open_holds) == 0,
        "no_exceptions": int(exceptions) == 0,
        "books_balanced": bool(summary["ok"]),
    }


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EscrowReport:
    plan: EscrowPlan
    escrows: int
    seconds: float
    blocks: int
    stages: dict[str, dict[str, float]]
    baseline_escrows: int
    baseline_seconds: float
    verify_ms: dict[str, list[float]]
    attest_ms: dict[str, list[float]]  # each attestation's transaction, first and second of an escrow
    fund_gas_limit: int
    checks: dict[str, bool]
    redis: str
    duration_s: float
    scratch_database: str

    @property
    def escrows_per_s(self) -> float:
        return _per_s(self.escrows, self.seconds)

    @property
    def baseline_escrows_per_s(self) -> float:
        return _per_s(self.baseline_escrows, self.baseline_seconds)

    @property
    def ratio(self) -> float:
        return _ratio(self.escrows_per_s, self.baseline_escrows_per_s)

    @property
    def verify_ms_p50(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.verify_ms.items()}

    @property
    def verify_ratio(self) -> float:
        """How many times slower the reference (py-ecc) is than the hot path's verifier."""
        p50 = self.verify_ms_p50
        return _ratio(p50["py_ecc"], p50[HOT_VERIFIER])

    @property
    def checks_ok(self) -> bool:
        return all(self.checks.values())

    def targets(self) -> dict[str, bool]:
        return {"escrows_per_s_50": self.escrows_per_s >= TARGET_ESCROWS_PER_S}

    def as_dict(self) -> dict[str, Any]:
        return {
            "escrows": self.escrows,
            "seconds": round(self.seconds, 3),
            "escrows_per_s": round(self.escrows_per_s, 2),
            "baseline_escrows": self.baseline_escrows,
            "baseline_seconds": round(self.baseline_seconds, 3),
            "baseline_escrows_per_s": round(self.baseline_escrows_per_s, 4),
            "ratio": round(self.ratio, 2),
            "verify_ms_p50": {name: round(ms, 3) for name, ms in self.verify_ms_p50.items()},
            "verify_samples": {name: len(values) for name, values in self.verify_ms.items()},
            "verify_ratio": round(self.verify_ratio, 1),
            "attest_ms_p50": {
                which: round(statistics.median(values), 2)
                for which, values in self.attest_ms.items()
                if values
            },
            "stages": self.stages,
            "blocks": self.blocks,
            "block_time_s": BLOCK_TIME_S,
            "confirmations": CONFIRMATIONS,
            "fund_gas_limit": self.fund_gas_limit,
            "attesters": self.plan.attesters,
            "worker_settings": {k.removeprefix("TRACE_").lower(): v for k, v in WORKER_SETTINGS.items()},
            "checks": self.checks,
            "checks_ok": self.checks_ok,
            "target_escrows_per_s": TARGET_ESCROWS_PER_S,
            "targets": self.targets(),
            "redis": self.redis,
            "mode": self.plan.name,
            "duration_s": round(self.duration_s, 3),
            "scratch_database": self.scratch_database,
        }


_CHECK_LABELS = {
    "all_released": "Every escrow released, amount less fee",
    "outbox_confirmed": "Every release confirmed on chain, once",
    "sellers_paid": "Sellers' balanceOf = released to them",
    "fees_paid": "Fee wallet's balanceOf = fees booked",
    "mirrors_match": "Custody mirrors = balanceOf, clearing empty",
    "holds_closed": "No hold open",
    "no_exceptions": "No exception for finance",
    "books_balanced": "Books balance",
}


def _setting(name: str) -> str:
    return WORKER_SETTINGS[f"TRACE_{name}"]


def render_escrow_table(report: EscrowReport) -> Table:
    stages = ", ".join(
        f"{step} {report.stages[step]['p50_s']:.1f}/{report.stages[step]['last_s']:.1f} s"
        for step in ("funded", "releasing", "released", "posted")
        if step in report.stages
    )
    table = Table(
        title=f"Escrow benchmark ({report.plan.name}, {report.escrows:,} escrows, 2-of-2 attestors)",
        caption=(
            f"anvil mining a block every {BLOCK_TIME_S:g} s ({report.blocks} blocks during the run);"
            f" tracechain worker, sender and beat with confirmations {CONFIRMATIONS}, indexer and sender"
            f" every {_setting('INDEXER_INTERVAL_S')}/{_setting('SENDER_INTERVAL_S')} s,"
            f" max in flight {_setting('SENDER_MAX_IN_FLIGHT')}; Redis {report.redis};"
            f" {report.plan.attesters} attester processes (escrow_saga.attest, {HOT_VERIFIER})."
            f" From the first fund transaction, median/last escrow: {stages}. Baseline:"
            f" {report.baseline_escrows} escrows one at a time, same node and workers. Verify: one"
            " attestation plus FastAggregateVerify of the escrow's aggregate."
        ),
    )
    for column in ("Measure", "Value", "Baseline", "Ratio", "Target", "Result"):
        table.add_column(column, justify="left" if column in ("Measure", "Target") else "right")
    table.add_row(
        "Escrows settled per second",
        f"{report.escrows_per_s:,.1f}/s",
        f"{report.baseline_escrows_per_s:,.2f}/s",
        f"{report.ratio:,.1f}x",
        f">= {TARGET_ESCROWS_PER_S}/s",
        _mark(report.targets()["escrows_per_s_50"]),
    )
    table.add_row("Seconds", f"{report.seconds:.2f}", f"{report.baseline_seconds:.2f}", "", "", "")
    p50 = report.verify_ms_p50
    samples = {name: len(values) for name, values in report.verify_ms.items()}
    for name in FAST_VERIFIERS:
        table.add_row(f"Verify p50, {name} ({samples[name]} escrows)", f"{p50[name]:,.2f} ms")
    table.add_row(
        f"Verify p50, py-ecc ({samples['py_ecc']} escrows)",
        f"{p50['py_ecc']:,.0f} ms",
        "",
        f"{report.verify_ratio:,.0f}x slower",
    )
    attest = report.as_dict()["attest_ms_p50"]
    if {"first", "second"} <= set(attest):
        table.add_row(
            "Attestation p50, first / second (starts the release)",
            f"{attest['first']:,.1f} / {attest['second']:,.1f} ms",
        )
    for key, label in _CHECK_LABELS.items():
        ok = report.checks[key]
        table.add_row(label, "ok" if ok else "broken", "", "", "", _mark(ok))
    return table


# --- the run ---------------------------------------------------------------------------------


def run_escrow_bench(
    settings: Settings, plan: EscrowPlan, console: Console, *, server_url: str | None = None
) -> EscrowReport:
    """Prepare the escrows, start the workers, settle them all together, then a sample one by one."""
    started = time.time()
    total = plan.escrows + plan.sample
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())
        progress = stack.enter_context(BenchProgress(console))
        scratch_dir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="tracechain-bench-escrow-"))
        )
        # First: a broker others use is refused before anything else is set up.
        redis_url = progress.step(
            "Checking that no worker uses TRACE_REDIS_URL"
            if settings.redis_url
            else "Starting a private Redis",
            lambda: stack.enter_context(broker(settings, scratch_dir)),
        )
        node = progress.step("Starting anvil", lambda: stack.enter_context(_anvil(None)))
        platform: _Platform = progress.step("Deploying the platform", lambda: _deploy(node))
        platform.deployment.save(scratch_dir / "deployment.json")
        if server_url is None:
            server_url = stack.enter_context(database_server(settings))
        url = stack.enter_context(scratch_database(server_url))
        role = settings.db_role
        engine = progress.step("Migrating the scratch database", lambda: _migrated_engine(url, role))
        stack.callback(engine.dispose)
        prepared = _prepare(engine, platform, total, progress)
        verify_ms = {
            **{
                name: _verify_ms(name, prepared, min(plan.fast_samples, total), progress)
                for name in FAST_VERIFIERS
            },
            "py_ecc": _verify_ms("py_ecc", prepared, min(plan.py_ecc_samples, total), progress),
        }
        # From here on the chain mines on its own clock, as a real one does.
        node.rpc("evm_setIntervalMining", [BLOCK_TIME_S])
        env = _worker_env(settings, url, redis_url, node, scratch_dir)
        workers = stack.enter_context(worker_processes(env, scratch_dir))
        progress.step(
            "Starting tracechain worker, sender and beat",
            lambda: _wait_ready(_celery(redis_url), engine, workers, platform.deployment.chain_id),
        )
        attesters: Attesters = progress.step(
            f"Starting {plan.attesters} attester process(es)",
            lambda: stack.enter_context(
                attester_processes(url, role, platform.deployment, prepared, plan.attesters)
            ),
        )

        def check_alive() -> None:
            _check_alive(workers)
            attesters.check()

        seconds, wall_start, blocks = _measure_flow(
            engine, platform, prepared, check_alive, plan.escrows, progress
        )
        baseline_seconds = _measure_baseline(
            engine, platform, prepared, check_alive, plan.escrows, plan.sample, progress
        )
        attesters.stop()
        checks = progress.step(
            "Checking the books against the chain", lambda: _check_books(engine, platform, prepared.escrows)
        )
        report = EscrowReport(
            plan=plan,
            escrows=plan.escrows,
            seconds=seconds,
            blocks=blocks,
            stages=_stages(engine, wall_start, [e.id for e in prepared.escrows[: plan.escrows]]),
            baseline_escrows=plan.sample,
            baseline_seconds=baseline_seconds,
            verify_ms=verify_ms,
            attest_ms=attesters.timings,
            fund_gas_limit=prepared.fund_gas,
            checks=checks,
            redis="TRACE_REDIS_URL" if settings.redis_url else "embedded",
            duration_s=time.time() - started,
            scratch_database=_database_name(url),
        )
    return report


@click.command("escrow")
@click.option(
    "--quick",
    is_flag=True,
    help=f"{QUICK.escrows:,} escrows instead of {FULL.escrows:,}, fewer py-ecc samples (under 45 s).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
@click.option(
    "--escrows", type=click.IntRange(1, 20_000), help="Escrows settled together (the measured run)."
)
@click.option("--sample", type=click.IntRange(1, 100), hidden=True, help="Baseline escrows.")
@click.option("--attesters", type=click.IntRange(1, 16), help=f"Attester processes (default {ATTESTERS}).")
def escrow_bench(
    quick: bool, as_json: bool, escrows: int | None, sample: int | None, attesters: int | None
) -> None:
    """Escrows settled end to end per second (fund, attest, release, confirm, post) through the
    real workers on anvil, against settling them one at a time; BLS verify time per verifier.

    Starts anvil, a scratch database (TRACE_DATABASE_URL's server or the embedded PostgreSQL)
    and `tracechain worker`, `sender` and `beat`. Their broker is TRACE_REDIS_URL when set:
    refused if a Celery worker already consumes it, and its TraceChain queues are purged before
    and after the run (they only ever hold ticks of idempotent sweeps), so give it a database no
    running TraceChain uses. Unset, a private embedded Redis runs for the bench alone.

    Exits 1 if an escrow was not released for its amount, a payment on chain differs from the
    books, a hold is left open, an exception was raised or the books do not balance.
    """
    plan = QUICK if quick else FULL
    plan = replace(
        plan,
        escrows=escrows or plan.escrows,
        sample=sample or plan.sample,
        attesters=attesters or plan.attesters,
    )
    settings = load_settings()
    report: EscrowReport = _run(lambda console: run_escrow_bench(settings, plan, console))
    _emit(report, as_json, lambda: render_escrow_table(report))  # type: ignore[arg-type]  # as_dict() only
    if not report.checks_ok:
        failed = ", ".join(name for name, ok in report.checks.items() if not ok)
        raise BenchError(f"the books do not check out against the chain ({failed})")
