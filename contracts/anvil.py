"""A local anvil node (npm ``@foundry-rs/anvil``) for tests and benches: the real-node path of §6.

``start_anvil()`` runs the binary installed under ``contracts/node_modules`` on a free port and
returns once its JSON-RPC answers. The node's dev accounts come from the well-known development
mnemonic, so their private keys are known here and transactions can be signed locally.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

ANVIL_BIN = Path(__file__).resolve().parent / "node_modules" / ".bin" / "anvil"
# The mnemonic and derivation path anvil (and hardhat) use for their dev accounts.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_HD_PATH = "m/44'/60'/0'/0"
DEFAULT_CHAIN_ID = 31337
HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
RPC_TIMEOUT_S = 30.0
_START_ATTEMPTS = 3  # a free port can be taken by someone else before anvil binds it


class AnvilError(RuntimeError):
    """anvil is missing, did not start, or refused a request."""


@functools.cache
def dev_private_key(index: int) -> str:
    """The private key (0x hex) of anvil's dev account ``index``."""
    if index < 0:
        raise ValueError("account index must be >= 0")
    Account.enable_unaudited_hdwallet_features()
    account: LocalAccount = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"{DEV_HD_PATH}/{index}")
    return "0x" + bytes(account.key).hex()


def next_base_fee(base_fee: int, gas_used: int, gas_limit: int) -> int:
    """The base fee of the block after one with these figures (EIP-1559, elasticity 2)."""
    target = gas_limit // 2
    if target in (0, gas_used):
        return base_fee
    if gas_used > target:
        return base_fee + max(1, base_fee * (gas_used - target) // target // 8)
    return base_fee - base_fee * (target - gas_used) // target // 8


class AnvilNode:
    """A running anvil process; stop it with :meth:`stop` or use it as a context manager."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, chain_id: int, accounts: int, log: IO[bytes]
    ) -> None:
        self._process = process
        self._log = log
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.chain_id = chain_id
        self.account_count = accounts
        self._ids = 0

    def __repr__(self) -> str:
        return f"AnvilNode({self.url}, chain {self.chain_id})"

    @property
    def private_keys(self) -> tuple[str, ...]:
        """The dev accounts' private keys, account 0 first (test keys; never use them for value)."""
        return tuple(dev_private_key(i) for i in range(self.account_count))

    @property
    def accounts(self) -> tuple[LocalAccount, ...]:
        """The dev accounts as local signing accounts."""
        return tuple(Account.from_key(key) for key in self.private_keys)

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    # -- JSON-RPC ---------------------------------------------------------------------------

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        """Call ``method`` on the node; a JSON-RPC error answer raises :class:`AnvilError`."""
        self._ids += 1
        body = json.dumps({"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params or []})
        request = urllib.request.Request(  # noqa: S310 - always our own http://127.0.0.1 URL
            self.url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S) as response:  # noqa: S310
            answer = json.loads(response.read())
        if "error" in answer:
            raise AnvilError(f"{method}: {answer['error']}")
        return answer.get("result")

    def snapshot(self) -> str:
        """Take a snapshot of the chain state; :meth:`revert` goes back to it (once)."""
        return str(self.rpc("evm_snapshot"))

    def revert(self, snapshot_id: str) -> None:
        """Go back to ``snapshot_id``. As in anvil, that snapshot and later ones are used up."""
        if self.rpc("evm_revert", [snapshot_id]) is not True:
            raise AnvilError(f"anvil could not revert to snapshot {snapshot_id}")
        # anvil keeps the next block's base fee from before the revert; a test that drove it up
        # would leave later transactions priced from the reverted head refused. Put it back.
        head = self.rpc("eth_getBlockByNumber", ["latest", False])
        if head.get("baseFeePerGas") is not None:
            next_fee = next_base_fee(
                int(head["baseFeePerGas"], 16), int(head["gasUsed"], 16), int(head["gasLimit"], 16)
            )
            self.rpc("anvil_setNextBlockBaseFeePerGas", [hex(next_fee)])

    def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` blocks now (with whatever the pool holds)."""
        if blocks < 1:
            raise ValueError("blocks must be >= 1")
        self.rpc("anvil_mine", [hex(blocks)])

    def set_automine(self, enabled: bool) -> None:
        """Mine a block per transaction (anvil's default) or only on :meth:`mine`."""
        self.rpc("evm_setAutomine", [enabled])

    def block_number(self) -> int:
        return int(str(self.rpc("eth_blockNumber")), 16)

    # -- lifetime ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the node (its whole process group: the npm wrapper and the binary)."""
        if self._process.poll() is None:
            _signal_group(self._process, signal.SIGTERM)
            try:
                self._process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(self._process, signal.SIGKILL)
                self._process.wait()
        self._log.close()

    def __enter__(self) -> AnvilNode:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_anvil(
    *,
    port: int | None = None,
    chain_id: int = DEFAULT_CHAIN_ID,
    block_time_s: float | None = None,
    accounts: int = 10,
) -> AnvilNode:
    """Start anvil on ``port`` (a free one when None) and wait until its JSON-RPC answers.

    ``block_time_s`` None mines a block per transaction; a number mines on that interval instead.
    """
    if not ANVIL_BIN.exists():
        raise AnvilError(
            f"anvil is not installed at {ANVIL_BIN}; run `make contracts` (or `npm ci --prefix contracts`)"
        )
    if chain_id <= 0 or accounts < 1:
        raise ValueError("chain_id must be positive and accounts at least 1")
    if block_time_s is not None and block_time_s <= 0:
        raise ValueError("block_time_s must be positive")
    last_error = ""
    for _ in range(1 if port is not None else _START_ATTEMPTS):
        chosen = port if port is not None else _free_port()
        args = [
            str(ANVIL_BIN),
            "--silent",
            "--host",
            HOST,
            "--port",
            str(chosen),
            "--chain-id",
            str(chain_id),
            "--accounts",
            str(accounts),
        ]
        if block_time_s is not None:
            args += ["--block-time", f"{block_time_s:g}"]
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by AnvilNode.stop
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        node = AnvilNode(process, chosen, chain_id, accounts, log)
        if _wait_ready(node):
            return node
        log.seek(0)
        last_error = log.read().decode(errors="replace")[-2000:]
        node.stop()
    raise AnvilError(f"anvil did not start: {last_error or 'no answer on its JSON-RPC port'}")


def _wait_ready(node: AnvilNode) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not node.running:
            return False
        try:
            answered = int(str(node.rpc("eth_chainId")), 16)
        except (OSError, urllib.error.URLError, ValueError):
            time.sleep(0.05)
            continue
        # Another chain answering means something else holds this port.
        return answered == node.chain_id
    return False
