"""The embedded dev chain over real HTTP: web3's HTTPProvider, raw JSON-RPC, and the CLI.

One server runs in a thread for the module with a tiny hand-assembled contract deployed; every test
runs between an evm_snapshot and an evm_revert of it. One test runs `tracechain chain` itself.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractCustomError

from contracts.devchain import DEFAULT_BALANCE_WEI, DevChain, DevChainServer

TRACECHAIN = Path(sys.executable).with_name("tracechain")
CHAIN_ID = 31337
PINGED = keccak(text="Pinged(address,uint256)")
DEPLOYED = keccak(text="Deployed()")
REVERT_DATA = bytes.fromhex("deadbeef")


def _pinger_init_code() -> bytes:
    """Init code of a contract that logs Deployed() when created and, called with a word x,
    logs Pinged(caller indexed, x) and returns x; with x == 0 it reverts with 0xdeadbeef."""
    revert_at = 0x37
    runtime = b"".join(
        [
            bytes.fromhex("600035"),  # PUSH1 0 CALLDATALOAD          -> x
            bytes.fromhex("8015"),  # DUP1 ISZERO
            bytes([0x60, revert_at, 0x57]),  # PUSH1 revert_at JUMPI
            bytes.fromhex("600052"),  # PUSH1 0 MSTORE                 mem[0:32] = x
            bytes.fromhex("33"),  # CALLER                                 topic 1
            b"\x7f" + PINGED,  # PUSH32 Pinged                             topic 0
            bytes.fromhex("60206000a2"),  # PUSH1 32 PUSH1 0 LOG2
            bytes.fromhex("60206000f3"),  # PUSH1 32 PUSH1 0 RETURN
            bytes.fromhex("5b"),  # JUMPDEST (revert_at)
            b"\x63" + REVERT_DATA,  # PUSH4 0xdeadbeef
            bytes.fromhex("600052"),  # PUSH1 0 MSTORE                  -> mem[28:32]
            bytes.fromhex("6004601cfd"),  # PUSH1 4 PUSH1 28 REVERT
        ]
    )
    assert runtime[revert_at] == 0x5B
    constructor_size = 49
    constructor = b"".join(
        [
            b"\x7f" + DEPLOYED,  # PUSH32 Deployed
            bytes.fromhex("60006000a1"),  # PUSH1 0 PUSH1 0 LOG1 (no data)
            bytes([0x60, len(runtime)]) + bytes.fromhex("80"),  # PUSH1 size DUP1
            bytes([0x60, constructor_size]) + bytes.fromhex("600039"),  # PUSH1 offset PUSH1 0 CODECOPY
            bytes.fromhex("6000f3"),  # PUSH1 0 RETURN
        ]
    )
    assert len(constructor) == constructor_size
    return constructor + runtime


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _topic_of(address: str) -> str:
    return "0x" + _word(int(address, 16)).hex()


def rpc(url: str, method: str, *params: Any) -> dict[str, Any]:
    """One raw JSON-RPC call; the whole response object."""
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": list(params)}
    response = httpx.post(url, json=body, timeout=10)
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    assert answer["jsonrpc"] == "2.0" and answer["id"] == 7
    return answer


def send_signed(
    w3: Web3, private_key: str, *, to: str | None, value: int = 0, data: bytes = b"", gas: int | None = None
) -> HexBytes:
    """Sign with eth-account and send raw, as our sender does; returns the hash."""
    account = Account.from_key(private_key)
    tx: dict[str, Any] = {
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "chainId": w3.eth.chain_id,
        "value": value,
        "data": data,
        "maxPriorityFeePerGas": w3.eth.max_priority_fee,
        "maxFeePerGas": 2 * w3.eth.get_block("pending")["baseFeePerGas"] + w3.eth.max_priority_fee,
    }
    if to is not None:
        tx["to"] = to
    tx["gas"] = gas if gas is not None else w3.eth.estimate_gas({**tx, "from": account.address})
    return w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)


@dataclass(frozen=True)
class Served:
    server: DevChainServer
    w3: Web3
    keys: list[str]
    addresses: list[str]
    pinger: str

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with DevChainServer(DevChain(accounts=4), port=0) as server:
        w3 = Web3(Web3.HTTPProvider(server.url, request_kwargs={"timeout": 10}))
        keys = [account.private_key for account in server.chain.accounts]
        addresses = [account.address for account in server.chain.accounts]
        deployed = send_signed(w3, keys[0], to=None, data=_pinger_init_code())
        receipt = w3.eth.get_transaction_receipt(deployed)
        assert receipt["status"] == 1 and receipt["contractAddress"]
        yield Served(server, w3, keys, addresses, receipt["contractAddress"])


@pytest.fixture(autouse=True)
def _fresh_state(served: Served) -> Iterator[None]:
    """Each test starts from the deployed state (this also overrides the package's contract fixture)."""
    snapshot = rpc(served.url, "evm_snapshot")["result"]
    yield
    assert rpc(served.url, "evm_revert", snapshot)["result"] is True


def test_identity_accounts_and_genesis_funds(served: Served) -> None:
    w3 = served.w3
    assert w3.eth.chain_id == CHAIN_ID
    assert w3.net.version == str(CHAIN_ID)
    assert w3.client_version.startswith("tracechain-devchain/")
    assert w3.eth.accounts == served.addresses
    # The anvil/hardhat development mnemonic: the well-known first account.
    assert served.addresses[0] == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert Account.from_key(served.keys[1]).address == served.addresses[1]
    assert w3.eth.get_balance(served.addresses[3]) == DEFAULT_BALANCE_WEI
    assert w3.eth.get_balance(served.addresses[3], "earliest") == DEFAULT_BALANCE_WEI
    assert w3.eth.get_code(served.pinger) != b""


def test_signed_transfer_lands_with_a_receipt_and_moves_the_head(served: Served) -> None:
    w3 = served.w3
    sender, recipient = served.addresses[1], served.addresses[2]
    head = w3.eth.block_number
    nonce = w3.eth.get_transaction_count(sender, "pending")
    before = w3.eth.get_balance(recipient)

    tx_hash = send_signed(w3, served.keys[1], to=recipient, value=12_345)

    receipt = w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["status"] == 1 and receipt["gasUsed"] == 21_000
    assert receipt["blockNumber"] == head + 1 == w3.eth.block_number
    assert receipt["from"] == sender and receipt["to"] == recipient and receipt["contractAddress"] is None
    assert w3.eth.get_balance(recipient) == before + 12_345
    assert w3.eth.get_transaction_count(sender, "pending") == nonce + 1
    assert w3.eth.get_transaction_count(sender, "latest") == nonce + 1
    assert w3.eth.get_transaction_count(sender, head) == nonce

    tx = w3.eth.get_transaction(tx_hash)
    assert tx["hash"] == tx_hash and tx["blockHash"] == receipt["blockHash"]
    assert tx["from"] == sender and tx["value"] == 12_345 and tx["nonce"] == nonce and tx["type"] == 2
    block = w3.eth.get_block(receipt["blockNumber"], full_transactions=True)
    assert block["hash"] == receipt["blockHash"] and block["parentHash"] == w3.eth.get_block(head)["hash"]
    assert [t["hash"] for t in block["transactions"]] == [tx_hash]
    assert w3.eth.get_block_transaction_count(block["hash"]) == 1
    assert w3.eth.get_block("latest")["number"] == w3.eth.get_block("finalized")["number"] == head + 1
    assert w3.eth.get_block("pending")["number"] == head + 2 and w3.eth.get_block("pending")["hash"] is None
    assert w3.eth.get_block("earliest")["number"] == 0


def test_resent_wrong_chain_and_underfunded_transactions_are_refused(served: Served) -> None:
    w3 = served.w3
    account = Account.from_key(served.keys[2])
    base = {
        "to": served.addresses[0],
        "value": 1,
        "gas": 21_000,
        "maxFeePerGas": 10**10,
        "maxPriorityFeePerGas": 10**9,
        "chainId": CHAIN_ID,
        "nonce": w3.eth.get_transaction_count(account.address),
    }
    raw = "0x" + bytes(account.sign_transaction(base).raw_transaction).hex()
    assert "result" in rpc(served.url, "eth_sendRawTransaction", raw)
    head = w3.eth.block_number

    refused = {
        "resent": raw,
        "future nonce": account.sign_transaction({**base, "nonce": base["nonce"] + 5}).raw_transaction,
        "other chain": account.sign_transaction(
            {**base, "nonce": base["nonce"] + 1, "chainId": 1}
        ).raw_transaction,
        "too poor": account.sign_transaction(
            {**base, "nonce": base["nonce"] + 1, "value": 2 * DEFAULT_BALANCE_WEI}
        ).raw_transaction,
    }
    messages = {}
    for case, signed in refused.items():
        payload = signed if isinstance(signed, str) else "0x" + bytes(signed).hex()
        error = rpc(served.url, "eth_sendRawTransaction", payload)["error"]
        assert error["code"] == -32000, (case, error)
        messages[case] = error["message"]
    assert messages["resent"].startswith("nonce too low")
    assert messages["future nonce"].startswith("nonce too high")
    assert messages["other chain"].startswith("invalid chain id")
    assert messages["too poor"].startswith("insufficient funds")
    assert w3.eth.block_number == head


def test_send_transaction_signs_for_dev_accounts_only(served: Served) -> None:
    w3 = served.w3
    tx_hash = w3.eth.send_transaction({"from": served.addresses[3], "to": served.pinger, "data": _word(9)})
    receipt = w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["status"] == 1 and len(receipt["logs"]) == 1
    assert receipt["logs"][0]["topics"][1] == HexBytes(_topic_of(served.addresses[3]))

    stranger = Account.create().address
    error = rpc(
        served.url, "eth_sendTransaction", {"from": stranger, "to": served.addresses[0], "value": "0x1"}
    )
    assert error["error"]["code"] == -32000 and "unknown account" in error["error"]["message"]


def test_get_logs_filters_like_a_node(served: Served) -> None:
    w3 = served.w3
    a, b = served.addresses[1], served.addresses[2]
    first = w3.eth.block_number + 1
    hashes = [
        send_signed(w3, served.keys[1], to=served.pinger, data=_word(1)),
        send_signed(w3, served.keys[2], to=served.pinger, data=_word(2)),
        send_signed(w3, served.keys[1], to=served.pinger, data=_word(3)),
    ]
    last = w3.eth.block_number
    assert last == first + 2
    pinged = "0x" + PINGED.hex()

    def values(**query: Any) -> list[int]:
        logs = w3.eth.get_logs({"fromBlock": first, "toBlock": last, **query})
        assert all(entry["removed"] is False for entry in logs)
        return [int.from_bytes(entry["data"], "big") for entry in logs]

    assert values(address=served.pinger) == [1, 2, 3]
    assert values(address=[served.pinger, Account.create().address]) == [1, 2, 3]
    assert values(address=Account.create().address) == []
    assert values(topics=[pinged]) == [1, 2, 3]
    assert values(topics=[pinged, _topic_of(a)]) == [1, 3]
    assert values(topics=[None, _topic_of(b)]) == [2]
    assert values(topics=[pinged, [_topic_of(b), _topic_of(a)]]) == [1, 2, 3]
    assert values(topics=[[pinged, "0x" + DEPLOYED.hex()], None]) == [1, 2, 3]
    assert values(topics=[pinged, None, None]) == []  # more positions than the log has topics
    assert values(topics=["0x" + DEPLOYED.hex()]) == []  # the constructor's log is older

    everything = w3.eth.get_logs({"fromBlock": "earliest", "toBlock": "latest", "address": served.pinger})
    assert HexBytes("0x" + DEPLOYED.hex()) in [entry["topics"][0] for entry in everything]

    receipt = w3.eth.get_transaction_receipt(hashes[1])
    in_block = w3.eth.get_logs({"blockHash": receipt["blockHash"]})
    assert len(in_block) == 1
    entry = in_block[0]
    assert entry == receipt["logs"][0]
    assert entry["transactionHash"] == hashes[1] and entry["blockNumber"] == first + 1
    assert entry["logIndex"] == 0 and entry["address"] == served.pinger

    one_block = w3.eth.get_logs({"fromBlock": first + 2, "toBlock": first + 2})
    assert [int.from_bytes(e["data"], "big") for e in one_block] == [3]
    inverted = rpc(served.url, "eth_getLogs", {"fromBlock": hex(last), "toBlock": hex(first)})
    assert inverted["error"]["code"] == -32602
    both = rpc(
        served.url, "eth_getLogs", {"blockHash": "0x" + bytes(receipt["blockHash"]).hex(), "fromBlock": "0x1"}
    )
    assert both["error"]["code"] == -32602


def test_call_returns_data_and_a_revert_is_error_3_with_its_data(served: Served) -> None:
    w3 = served.w3
    assert w3.eth.call({"to": served.pinger, "data": _word(42)}) == _word(42)

    for method in ("eth_call", "eth_estimateGas"):
        answer = rpc(served.url, method, {"to": served.pinger, "data": "0x" + _word(0).hex()}, "latest")
        assert answer["error"]["code"] == 3, (method, answer)
        assert answer["error"]["data"] == "0x" + REVERT_DATA.hex()
        assert answer["error"]["message"].startswith("execution reverted")

    # web3 reads it as a node's answer: a custom error carrying the revert data.
    with pytest.raises(ContractCustomError) as raised:
        w3.eth.call({"to": served.pinger, "data": _word(0)})
    assert raised.value.data == "0x" + REVERT_DATA.hex()

    # Mined anyway when the sender sets the gas itself: a receipt with status 0.
    failed = send_signed(w3, served.keys[1], to=served.pinger, data=_word(0), gas=100_000)
    receipt = w3.eth.get_transaction_receipt(failed)
    assert receipt["status"] == 0 and receipt["logs"] == []


def test_protocol_errors_have_json_rpc_codes(served: Served) -> None:
    assert rpc(served.url, "eth_nonsense")["error"]["code"] == -32601
    assert rpc(served.url, "eth_getBalance", "0x1234", "latest")["error"]["code"] == -32602
    assert rpc(served.url, "eth_getBalance", served.addresses[0], "yesterday")["error"]["code"] == -32602
    assert rpc(served.url, "eth_blockNumber", "extra")["error"]["code"] == -32602
    assert rpc(served.url, "eth_getBlockByNumber", "0xffff", False)["result"] is None
    assert rpc(served.url, "eth_getTransactionReceipt", "0x" + "ab" * 32)["result"] is None
    assert rpc(served.url, "eth_getBalance", served.addresses[0], "0xffff")["error"]["code"] == -32000

    garbled = httpx.post(served.url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbled.json()["error"]["code"] == -32700
    empty_batch = httpx.post(served.url, json=[])
    assert empty_batch.json()["error"]["code"] == -32600


def test_batch_requests_answer_each_call(served: Served) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
        {"jsonrpc": "2.0", "id": "two", "method": "eth_nonsense", "params": []},
        {"jsonrpc": "2.0", "id": 3, "method": "eth_getBalance", "params": [served.addresses[0], "latest"]},
        {"jsonrpc": "2.0", "method": "eth_blockNumber", "params": []},  # a notification: no answer
    ]
    answers = httpx.post(served.url, json=batch, timeout=10).json()
    assert [answer["id"] for answer in answers] == [1, "two", 3]
    assert answers[0]["result"] == hex(CHAIN_ID)
    assert answers[1]["error"]["code"] == -32601
    assert int(answers[2]["result"], 16) == served.w3.eth.get_balance(served.addresses[0])

    with served.w3.batch_requests() as batch_call:
        batch_call.add(served.w3.eth.get_block("latest"))
        batch_call.add(served.w3.eth.get_balance(served.addresses[1]))
        block, balance = batch_call.execute()
    assert block["number"] == served.w3.eth.block_number and balance == DEFAULT_BALANCE_WEI


def test_snapshot_and_revert_rewind_the_chain(served: Served) -> None:
    w3 = served.w3
    head = w3.eth.block_number
    balance = w3.eth.get_balance(served.addresses[2])
    snapshot = rpc(served.url, "evm_snapshot")["result"]

    tx_hash = send_signed(w3, served.keys[1], to=served.addresses[2], value=10**18)
    assert rpc(served.url, "evm_mine", {"blocks": 2})["result"] == "0x0"
    assert w3.eth.block_number == head + 3

    assert rpc(served.url, "evm_revert", snapshot)["result"] is True
    assert w3.eth.block_number == head
    assert w3.eth.get_balance(served.addresses[2]) == balance
    assert rpc(served.url, "eth_getTransactionReceipt", "0x" + bytes(tx_hash).hex())["result"] is None
    assert rpc(served.url, "evm_revert", snapshot)["result"] is False  # used up
    # The chain goes on from there.
    send_signed(w3, served.keys[1], to=served.addresses[2], value=1)
    assert w3.eth.block_number == head + 1


def test_increase_time_and_next_timestamp_move_the_next_block(served: Served) -> None:
    w3 = served.w3
    latest = w3.eth.get_block("latest")["timestamp"]
    offset = rpc(served.url, "evm_increaseTime", 3_600)["result"]
    assert offset >= 3_600
    rpc(served.url, "evm_mine")
    assert w3.eth.get_block("latest")["timestamp"] >= latest + 3_600

    pinned = w3.eth.get_block("latest")["timestamp"] + 86_400
    assert rpc(served.url, "evm_setNextBlockTimestamp", hex(pinned))["result"] is None
    tx_hash = send_signed(w3, served.keys[1], to=served.addresses[0], value=1)
    block = w3.eth.get_block(w3.eth.get_transaction_receipt(tx_hash)["blockNumber"])
    assert block["timestamp"] == pinned
    rpc(served.url, "evm_mine")
    assert w3.eth.get_block("latest")["timestamp"] > pinned  # time goes on from the pinned one

    past = rpc(served.url, "evm_setNextBlockTimestamp", hex(pinned))
    assert past["error"]["code"] == -32000


def test_fee_answers_are_usable(served: Served) -> None:
    w3 = served.w3
    send_signed(w3, served.keys[1], to=served.addresses[0], value=1)
    history = w3.eth.fee_history(2, "latest", [25, 75])
    assert history["oldestBlock"] == w3.eth.block_number - 1
    assert len(history["baseFeePerGas"]) == 3 and len(history["gasUsedRatio"]) == 2
    assert history["reward"][-1] == [10**9, 10**9]  # the tip send_signed paid
    assert w3.eth.gas_price >= w3.eth.get_block("pending")["baseFeePerGas"]
    assert w3.eth.max_priority_fee == 10**9


# --- the command line -----------------------------------------------------------------------------

_URL = re.compile(r"^\s+RPC URL:\s+(\S+)")
_ACCOUNT = re.compile(r"^\s+\(\s*(\d+)\)\s+(0x[0-9a-fA-F]{40})\s+private key\s+(0x[0-9a-f]{64})")


def _refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) != 0


def test_cli_prints_its_accounts_mines_on_the_interval_and_stops_on_sigterm(tmp_path: Path) -> None:
    stderr_path = tmp_path / "chain.err"
    stderr = stderr_path.open("w")
    process = subprocess.Popen(
        [
            str(TRACECHAIN),
            "chain",
            "--port",
            "0",
            "--accounts",
            "2",
            "--chain-id",
            "1337",
            "--block-time",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "TRACE_LOG_LEVEL": "WARNING"},
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    printed: list[str] = []
    try:
        url = None
        accounts: dict[int, tuple[str, str]] = {}
        deadline = time.monotonic() + 60
        while url is None or len(accounts) < 2:
            if time.monotonic() > deadline or process.poll() is not None:
                output = "".join(printed) + "\n--- stderr ---\n" + stderr_path.read_text()
                pytest.fail(f"tracechain chain did not print its URL and accounts:\n{output}")
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            printed.append(line)
            if match := _URL.match(line):
                url = match.group(1)
            elif match := _ACCOUNT.match(line):
                accounts[int(match.group(1))] = (match.group(2), match.group(3))
        assert any("Chain id:" in line and "1337" in line for line in printed)
        assert any("DEVELOPMENT ONLY" in line for line in printed)

        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 10}))
        assert w3.eth.chain_id == 1337
        for address, key in accounts.values():
            assert Account.from_key(key).address == address == to_checksum_address(address)
            assert w3.eth.get_balance(address) == DEFAULT_BALANCE_WEI
        tx_hash = send_signed(w3, accounts[0][1], to=accounts[1][0], value=5)
        assert w3.eth.get_transaction_receipt(tx_hash)["status"] == 1

        # With --block-time the chain grows with nothing sent.
        mined_by_tx = w3.eth.get_transaction_receipt(tx_hash)["blockNumber"]
        deadline = time.monotonic() + 30
        while w3.eth.block_number <= mined_by_tx:
            assert time.monotonic() < deadline, "no block was mined on the interval"
            time.sleep(0.2)

        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, stderr_path.read_text()
        assert _refuses(url)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        stderr.close()
