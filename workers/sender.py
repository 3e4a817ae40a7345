"""The transaction sender (DESIGN §6): one per signing key, owner of that key's nonces.

Each pass (``Sender.run_once``, under an advisory lock per key):
1. signs queued outbox rows with the next nonces and stores every raw transaction and its hash
   in the same commit that assigns the nonce, before anything is broadcast;
2. broadcasts what is signed but not yet known to have been broadcast (again after a crash:
   the node answers "already known" or the transaction simply lands once);
3. settles rows whose receipt is confirmed and still canonical: status 1 posts the holds,
   status 0 voids them and raises an exception;
4. re-signs a transaction stuck longer than ``bump_after_s`` with the same nonce and higher
   fees (a fee bump): whichever version lands, the nonce makes it land once.
A transaction is therefore sent at most once per outbox row, whatever crashes, and a nonce is
never skipped: rows get consecutive nonces in the commit that signs them.

For throughput, a pass writes its signatures in one commit and its broadcasts in another,
settles rows in batches of ``SETTLE_BATCH`` per commit, and sends its broadcasts, receipt
look-ups and block checks as JSON-RPC batches where the provider takes them (one block check
per block, not per row). A crash between a batch and its commit only repeats work that is
idempotent: a rebroadcast the node answers "already known", a settlement done again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3Exception, Web3RPCError

from contracts.client import ProviderError, hex32, json_rpc_batch, rpc_error_text
from ledger import outbox
from workers import locks

log = structlog.get_logger(__name__)

BUMP_PERCENT = 125  # geth needs >= 110% of both fees to replace a pending transaction
PRIORITY_FEE_DEFAULT = 1_000_000_000
SETTLE_BATCH = 200  # rows settled per database transaction
# Requests of one kind in a pass from which they go to the node as JSON-RPC batches; fewer go
# one at a time, where a batch would save a round trip or two.
RPC_BATCH_MIN = 8


@dataclass
class SenderReport:
    signed: int = 0
    broadcast: int = 0
    confirmed: int = 0
    failed: int = 0
    bumped: int = 0
    in_flight: int = 0
    skipped_locked: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Sender:
    """Sends the outbox rows of one signing key on one chain."""

    def __init__(
        self,
        engine: sa.Engine,
        w3: Web3,
        account: LocalAccount,
        chain_id: int,
        *,
        confirmations: int,
        bump_after_s: float,
        max_in_flight: int,
    ) -> None:
        self.engine = engine
        self.w3 = w3
        self.account = account
        self.address = account.address.lower()
        self.chain_id = chain_id
        self.confirmations = confirmations
        self.bump_after = timedelta(seconds=bump_after_s)
        self.max_in_flight = max_in_flight
        self._can_batch = True

    def __repr__(self) -> str:  # never show the key
        return f"Sender({self.address} on chain {self.chain_id})"

    def run_once(self) -> SenderReport:
        report = SenderReport()
        with locks.exclusive(self.engine, locks.SENDER_LOCKS, int(self.address[2:10], 16)) as got:
            if not got:
                report.skipped_locked = True
                return report
            try:
                node_chain = int(self.w3.eth.chain_id)
            except (Web3Exception, OSError) as exc:
                raise ProviderError(str(exc)) from exc
            if node_chain != self.chain_id:
                raise ProviderError(f"the node serves chain {node_chain}, the sender is for {self.chain_id}")
            self._sign_queued(report)
            self._broadcast_pending(report)
            self._settle_and_bump(report)
        return report

    # -- 1. sign -----------------------------------------------------------------------------

    def _fees(self) -> tuple[int, int]:
        try:
            block = self.w3.eth.get_block("latest")
            base_fee = int(block.get("baseFeePerGas", 0) or 0)
        except (Web3Exception, OSError) as exc:
            raise ProviderError(str(exc)) from exc
        priority = PRIORITY_FEE_DEFAULT
        return 2 * base_fee + priority, priority

    def _sign_queued(self, report: SenderReport) -> None:
        with self.engine.begin() as conn:
            in_flight = conn.execute(
                sa.text(
                    "SELECT count(*) FROM chain_outbox WHERE chain_id = :c AND signer = :s"
                    " AND status IN ('signed', 'sent')"
                ),
                {"c": self.chain_id, "s": self.address},
            ).scalar_one()
            room = self.max_in_flight - int(in_flight)
            if room <= 0:
                return
            rows = conn.execute(
                sa.text(
                    "SELECT id, to_address, data, value, gas_limit FROM chain_outbox"
                    " WHERE chain_id = :c AND signer = :s AND status = 'queued'"
                    " ORDER BY id LIMIT :n FOR UPDATE"
                ),
                {"c": self.chain_id, "s": self.address, "n": room},
            ).all()
            if not rows:
                return
            next_nonce = self._next_nonce(conn)
            max_fee, priority = self._fees()
            attempts = []
            for offset, row in enumerate(rows):
                nonce = next_nonce + offset
                raw, tx_hash = self._sign(row, nonce, max_fee, priority)
                attempts.append(
                    {
                        "o": row.id,
                        "id": row.id,
                        "n": nonce,
                        "h": tx_hash,
                        "raw": raw,
                        "mf": max_fee,
                        "pf": priority,
                    }
                )
            # One statement each for the whole pass (executemany pipelines them), in this commit.
            conn.execute(
                sa.text(
                    "INSERT INTO chain_tx_attempts (outbox_id, nonce, tx_hash, raw_tx, max_fee_per_gas,"
                    " max_priority_fee_per_gas) VALUES (:o, :n, :h, :raw, :mf, :pf)"
                ),
                attempts,
            )
            conn.execute(
                sa.text(
                    "UPDATE chain_outbox SET status = 'signed', nonce = :n, tx_hash = :h,"
                    " updated_at = now() WHERE id = :id"
                ),
                attempts,
            )
            conn.execute(
                sa.text("UPDATE chain_signers SET next_nonce = :n WHERE chain_id = :c AND address = :a"),
                {"n": next_nonce + len(rows), "c": self.chain_id, "a": self.address},
            )
            report.signed += len(rows)

    def _next_nonce(self, conn: sa.Connection) -> int:
        """Our counter, never behind what the chain has mined from this key."""
        try:
            mined = int(self.w3.eth.get_transaction_count(Web3.to_checksum_address(self.address), "latest"))
        except (Web3Exception, OSError) as exc:
            raise ProviderError(str(exc)) from exc
        stored = conn.execute(
            sa.text("SELECT next_nonce FROM chain_signers WHERE chain_id = :c AND address = :a FOR UPDATE"),
            {"c": self.chain_id, "a": self.address},
        ).scalar()
        if stored is None:
            conn.execute(
                sa.text("INSERT INTO chain_signers (chain_id, address, next_nonce) VALUES (:c, :a, :n)"),
                {"c": self.chain_id, "a": self.address, "n": mined},
            )
            return mined
        if mined > int(stored):
            # Something else used this key (it must not): skip past it rather than collide.
            log.error("sender.foreign_nonce", address=self.address, mined=mined, stored=int(stored))
            return mined
        return int(stored)

    def _sign(self, row: Any, nonce: int, max_fee: int, priority: int) -> tuple[bytes, str]:
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "to": Web3.to_checksum_address(row.to_address),
            "data": bytes(row.data),
            "value": int(row.value),
            "gas": int(row.gas_limit),
            "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": priority,
        }
        signed = self.account.sign_transaction(tx)
        return bytes(signed.raw_transaction), hex32(signed.hash)

    # -- 2. broadcast ------------------------------------------------------------------------

    def _broadcast_pending(self, report: SenderReport) -> None:
        with self.engine.connect() as conn:
            attempts = conn.execute(
                sa.text(
                    "SELECT a.id, a.outbox_id, a.raw_tx, a.tx_hash FROM chain_tx_attempts a"
                    " JOIN chain_outbox o ON o.id = a.outbox_id"
                    " WHERE o.chain_id = :c AND o.signer = :s AND o.status = 'signed'"
                    " ORDER BY a.nonce, a.id"
                ),
                {"c": self.chain_id, "s": self.address},
            ).all()
        if not attempts:
            return
        # Broadcast in nonce order; the attempts before the first failure are known to the node.
        failure: ProviderError | None = None
        answers = self._rpc_batch(
            [("eth_sendRawTransaction", ["0x" + bytes(a.raw_tx).hex()]) for a in attempts]
        )
        if answers is None:
            done = len(attempts)
            for index, attempt in enumerate(attempts):
                try:
                    self._broadcast(bytes(attempt.raw_tx))
                except ProviderError as exc:
                    failure, done = exc, index
                    break
        else:
            done = len(attempts)
            for index, answer in enumerate(answers):
                error = rpc_error_text(answer)
                if error is not None and not _broadcast_error_is_benign(error):
                    failure, done = ProviderError(error), index
                    break
        if done:
            sent = attempts[:done]
            with self.engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE chain_tx_attempts SET broadcast_at = now() WHERE id = ANY(:ids)"),
                    {"ids": [a.id for a in sent]},
                )
                conn.execute(
                    sa.text(
                        "UPDATE chain_outbox SET status = 'sent', updated_at = now()"
                        " WHERE id = ANY(:ids) AND status = 'signed'"
                    ),
                    {"ids": [a.outbox_id for a in sent]},
                )
            report.broadcast += done
        if failure is not None:
            raise failure

    def _rpc_batch(self, calls: list[tuple[str, list[Any]]]) -> list[dict[str, Any]] | None:
        """Raw answers to ``calls`` sent as batches; None when they go one at a time instead."""
        if not self._can_batch or len(calls) < RPC_BATCH_MIN:
            return None
        answers = json_rpc_batch(self.w3, calls)
        if answers is None:
            self._can_batch = False  # an in-process provider, or a node that refuses batches
        return answers

    def _broadcast(self, raw: bytes) -> None:
        try:
            self.w3.eth.send_raw_transaction(raw)
        except Web3RPCError as exc:
            if _broadcast_error_is_benign(str(exc)):
                return
            raise ProviderError(str(exc)) from exc
        except (Web3Exception, OSError) as exc:
            text = str(exc).lower()
            if "nonce too low" in text or "already known" in text:
                return
            raise ProviderError(str(exc)) from exc

    # -- 3 and 4. settle, bump ---------------------------------------------------------------

    def _settle_and_bump(self, report: SenderReport) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT o.id, o.nonce, o.to_address, o.data, o.value, o.gas_limit,"
                    " array_agg(a.tx_hash ORDER BY a.id) AS hashes, max(a.created_at) AS last_signed,"
                    " max(a.max_fee_per_gas) AS max_fee, max(a.max_priority_fee_per_gas) AS priority"
                    " FROM chain_outbox o JOIN chain_tx_attempts a ON a.outbox_id = o.id"
                    " WHERE o.chain_id = :c AND o.signer = :s AND o.status = 'sent'"
                    " GROUP BY o.id ORDER BY o.nonce"
                ),
                {"c": self.chain_id, "s": self.address},
            ).all()
        if not rows:
            return
        try:
            head = int(self.w3.eth.block_number)
        except (Web3Exception, OSError) as exc:
            raise ProviderError(str(exc)) from exc
        report.in_flight = len(rows)
        now = datetime.now(UTC)
        receipts = self._receipts([list(row.hashes) for row in rows])
        deep = {
            r.block_number for r in receipts if r is not None and head - r.block_number >= self.confirmations
        }
        canonical = self._canonical_hashes(sorted(deep))
        ready: list[tuple[Any, _Receipt]] = []
        for row, receipt in zip(rows, receipts, strict=True):
            if receipt is None:
                if now - row.last_signed >= self.bump_after:
                    self._bump(row, report)
                continue
            if receipt.block_number not in deep or canonical.get(receipt.block_number) != receipt.block_hash:
                continue
            ready.append((row, receipt))
        # Rows settle in batches, one commit each: a crash loses at most a batch, settled again next pass.
        for start in range(0, len(ready), SETTLE_BATCH):
            batch = [
                outbox.Settlement(
                    row.id,
                    receipt.succeeded,
                    receipt.tx_hash,
                    receipt.block_number,
                    receipt.block_hash,
                    None if receipt.succeeded else "the transaction reverted (receipt status 0)",
                )
                for row, receipt in ready[start : start + SETTLE_BATCH]
            ]
            with self.engine.begin() as conn:
                statuses = outbox.settle_many(conn, batch)
            report.confirmed += statuses.count("confirmed")
            report.failed += len(statuses) - statuses.count("confirmed")

    def _receipts(self, hashes_by_row: list[list[str]]) -> list[_Receipt | None]:
        """For each row, the receipt of the first of its attempts the chain holds (None: none yet)."""
        flat = [tx_hash for hashes in hashes_by_row for tx_hash in hashes]
        answers = self._rpc_batch([("eth_getTransactionReceipt", [tx_hash]) for tx_hash in flat])
        if answers is None:
            return [self._receipt(hashes) for hashes in hashes_by_row]
        by_hash: dict[str, _Receipt | None] = {}
        for tx_hash, answer in zip(flat, answers, strict=True):
            error = rpc_error_text(answer)
            if error is not None:
                raise ProviderError(f"eth_getTransactionReceipt {tx_hash}: {error}")
            by_hash[tx_hash] = _Receipt.from_json(answer["result"]) if answer.get("result") else None
        return [next((r for h in hashes if (r := by_hash[h]) is not None), None) for hashes in hashes_by_row]

    def _receipt(self, hashes: list[str]) -> _Receipt | None:
        for tx_hash in hashes:
            try:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                continue
            except (Web3Exception, OSError) as exc:
                raise ProviderError(str(exc)) from exc
            return _Receipt(
                tx_hash=hex32(receipt["transactionHash"]),
                block_number=int(receipt["blockNumber"]),
                block_hash=hex32(receipt["blockHash"]),
                succeeded=int(receipt["status"]) == 1,
            )
        return None

    def _canonical_hashes(self, numbers: list[int]) -> dict[int, str]:
        """The hash of each canonical block of ``numbers``; a block the node cannot give is left out."""
        if not numbers:
            return {}
        answers = self._rpc_batch([("eth_getBlockByNumber", [hex(n), False]) for n in numbers])
        if answers is None:
            hashes: dict[int, str] = {}
            for number in numbers:
                try:
                    hashes[number] = hex32(self.w3.eth.get_block(number)["hash"])
                except (Web3Exception, OSError):
                    continue
            return hashes
        return {
            number: hex32(answer["result"]["hash"])
            for number, answer in zip(numbers, answers, strict=True)
            if isinstance(answer.get("result"), dict)
        }

    def _bump(self, row: Any, report: SenderReport) -> None:
        max_fee, priority = self._fees()
        max_fee = max(max_fee, int(row.max_fee) * BUMP_PERCENT // 100)
        priority = max(priority, int(row.priority) * BUMP_PERCENT // 100)
        max_fee = max(max_fee, priority)
        raw, tx_hash = self._sign(row, int(row.nonce), max_fee, priority)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO chain_tx_attempts (outbox_id, nonce, tx_hash, raw_tx, max_fee_per_gas,"
                    " max_priority_fee_per_gas) VALUES (:o, :n, :h, :raw, :mf, :pf)"
                    " ON CONFLICT (tx_hash) DO NOTHING"
                ),
                {"o": row.id, "n": row.nonce, "h": tx_hash, "raw": raw, "mf": max_fee, "pf": priority},
            )
        self._broadcast(raw)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE chain_tx_attempts SET broadcast_at = now() WHERE tx_hash = :h"),
                {"h": tx_hash},
            )
        report.bumped += 1
        log.info("sender.fee_bump", outbox_id=row.id, nonce=row.nonce, max_fee=max_fee)


@dataclass(frozen=True, slots=True)
class _Receipt:
    tx_hash: str
    block_number: int
    block_hash: str
    succeeded: bool

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> _Receipt:
        """A receipt as JSON-RPC sends it (quantities as 0x hex)."""
        return cls(
            tx_hash=hex32(raw["transactionHash"]),
            block_number=int(raw["blockNumber"], 16),
            block_hash=hex32(raw["blockHash"]),
            succeeded=int(raw["status"], 16) == 1,
        )


def _broadcast_error_is_benign(message: str) -> bool:
    """Whether a node's refusal of a raw transaction still leaves it on its way (or superseded)."""
    text = message.lower()
    # Sent before a crash, or already mined: the receipt check settles it.
    if any(s in text for s in ("already known", "known transaction", "nonce too low", "already imported")):
        return True
    if "underpriced" in text:
        return True  # a bumped version of the same nonce is already in the pool
    if "less than block base fee" in text:
        # The base fee rose past this version's max fee (anvil refuses it outright). Retrying
        # it would fail every pass and hold back every later nonce; the fee bump replaces it.
        log.warning("sender.fee_below_base_fee", error=text[:200])
        return True
    return False


def run_forever(sender: Sender, interval_s: float, stop: Callable[[], bool]) -> None:
    """Run the sender every ``interval_s`` until ``stop()``."""
    while not stop():
        try:
            report = sender.run_once()
            if report.signed or report.confirmed or report.failed or report.bumped:
                log.info("sender.run", **report.as_dict())
        except ProviderError as exc:
            log.warning("sender.provider_error", error=str(exc)[:300])
        time.sleep(interval_s)
