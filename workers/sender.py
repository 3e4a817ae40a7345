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

from contracts.client import ProviderError, hex32
from ledger import outbox
from workers import locks

log = structlog.get_logger(__name__)

BUMP_PERCENT = 125  # geth needs >= 110% of both fees to replace a pending transaction
PRIORITY_FEE_DEFAULT = 1_000_000_000


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
            for offset, row in enumerate(rows):
                nonce = next_nonce + offset
                raw, tx_hash = self._sign(row, nonce, max_fee, priority)
                conn.execute(
                    sa.text(
                        "INSERT INTO chain_tx_attempts (outbox_id, nonce, tx_hash, raw_tx, max_fee_per_gas,"
                        " max_priority_fee_per_gas) VALUES (:o, :n, :h, :raw, :mf, :pf)"
                    ),
                    {"o": row.id, "n": nonce, "h": tx_hash, "raw": raw, "mf": max_fee, "pf": priority},
                )
                conn.execute(
                    sa.text(
                        "UPDATE chain_outbox SET status = 'signed', nonce = :n, tx_hash = :h,"
                        " updated_at = now() WHERE id = :id"
                    ),
                    {"n": nonce, "h": tx_hash, "id": row.id},
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
        for attempt in attempts:
            self._broadcast(bytes(attempt.raw_tx))
            with self.engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE chain_tx_attempts SET broadcast_at = now() WHERE id = :id"),
                    {"id": attempt.id},
                )
                conn.execute(
                    sa.text(
                        "UPDATE chain_outbox SET status = 'sent', updated_at = now()"
                        " WHERE id = :id AND status = 'signed'"
                    ),
                    {"id": attempt.outbox_id},
                )
            report.broadcast += 1

    def _broadcast(self, raw: bytes) -> None:
        try:
            self.w3.eth.send_raw_transaction(raw)
        except Web3RPCError as exc:
            text = str(exc).lower()
            # Sent before a crash, or already mined: the receipt check settles it.
            if any(
                s in text for s in ("already known", "known transaction", "nonce too low", "already imported")
            ):
                return
            if "underpriced" in text:
                return  # a bumped version of the same nonce is already in the pool
            if "less than block base fee" in text:
                # The base fee rose past this version's max fee (anvil refuses it outright). Retrying
                # it would fail every pass and hold back every later nonce; the fee bump replaces it.
                log.warning("sender.fee_below_base_fee", error=text[:200])
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
        for row in rows:
            receipt = self._receipt(row.hashes)
            if receipt is None:
                if now - row.last_signed >= self.bump_after:
                    self._bump(row, report)
                continue
            block_number = int(receipt["blockNumber"])
            if head - block_number < self.confirmations:
                continue
            if not self._canonical(block_number, hex32(receipt["blockHash"])):
                continue
            succeeded = int(receipt["status"]) == 1
            with self.engine.begin() as conn:
                status = outbox.settle(
                    conn,
                    row.id,
                    succeeded=succeeded,
                    tx_hash=hex32(receipt["transactionHash"]),
                    block_number=block_number,
                    block_hash=hex32(receipt["blockHash"]),
                    error=None if succeeded else "the transaction reverted (receipt status 0)",
                )
            if status == "confirmed":
                report.confirmed += 1
            else:
                report.failed += 1

    def _receipt(self, hashes: list[str]) -> Any:
        for tx_hash in hashes:
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                continue
            except (Web3Exception, OSError) as exc:
                raise ProviderError(str(exc)) from exc
        return None

    def _canonical(self, number: int, block_hash: str) -> bool:
        try:
            block = self.w3.eth.get_block(number)
        except (Web3Exception, OSError):
            return False
        return hex32(block["hash"]) == block_hash

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
