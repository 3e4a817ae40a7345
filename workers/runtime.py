"""What a worker process builds once and reuses: the database engine, the chain, the roles.

Built lazily in the process that uses it (after Celery forks its pool), from the settings.
"""

from __future__ import annotations

import os
import threading

import sqlalchemy as sa
from eth_account.signers.local import LocalAccount
from web3 import Web3

from contracts.client import ChainClient
from contracts.deployment import Deployment
from contracts.events import LogDecoder
from ledger import db
from ledger.settings import Settings, SettingsError
from workers.indexer import Indexer
from workers.keys import load_signer
from workers.sender import Sender


class Runtime:
    """Per-process resources of the workers, created on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._engine: sa.Engine | None = None
        self._w3: Web3 | None = None
        self._deployment: Deployment | None = None
        self._decoder: LogDecoder | None = None

    def _fresh(self) -> None:
        # A forked child must not share its parent's connections.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._engine = None
            self._w3 = None

    @property
    def engine(self) -> sa.Engine:
        with self._lock:
            self._fresh()
            if self._engine is None:
                if not self.settings.database_url:
                    raise SettingsError("workers need TRACE_DATABASE_URL")
                self._engine = db.make_engine(self.settings.database_url, role=self.settings.db_role)
            return self._engine

    @property
    def w3(self) -> Web3:
        with self._lock:
            self._fresh()
            if self._w3 is None:
                if not self.settings.rpc_url:
                    raise SettingsError("workers need TRACE_RPC_URL")
                self._w3 = Web3(Web3.HTTPProvider(self.settings.rpc_url, request_kwargs={"timeout": 30}))
            return self._w3

    @property
    def deployment(self) -> Deployment:
        if self._deployment is None:
            self._deployment = Deployment.load(self.settings.deployment_path)
        return self._deployment

    def indexer(self) -> Indexer:
        if self._decoder is None:
            self._decoder = LogDecoder()
        return build_indexer(self.settings, self.engine, self.w3, self.deployment, self._decoder)

    def sender(self) -> Sender:
        return build_sender(self.settings, self.engine, self.w3, self.deployment, load_signer(self.settings))


def build_indexer(
    settings: Settings, engine: sa.Engine, w3: Web3, deployment: Deployment, decoder: LogDecoder | None = None
) -> Indexer:
    """The indexer of ``deployment`` as the settings configure it."""
    return Indexer(
        engine,
        ChainClient(w3),
        deployment,
        decoder or LogDecoder(),
        confirmations=settings.confirmations,
        window_max=settings.indexer_window_blocks,
    )


def build_sender(
    settings: Settings, engine: sa.Engine, w3: Web3, deployment: Deployment, account: LocalAccount
) -> Sender:
    """The sender of ``account`` on the deployment's chain as the settings configure it."""
    return Sender(
        engine,
        w3,
        account,
        deployment.chain_id,
        confirmations=settings.confirmations,
        bump_after_s=settings.sender_bump_after_s,
        max_in_flight=settings.sender_max_in_flight,
    )
