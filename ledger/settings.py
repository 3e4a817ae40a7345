"""Configuration of every TraceChain process, read from environment variables in one place.

No other module reads the environment: entry points call :func:`load_settings` once and pass
the values they need down explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from pathlib import Path

from ledger.commands import BATCH_MAX_COMMANDS


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Every configurable value, with its environment variable named in the README table."""

    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".tracechain"))
    db_role: str = "tracechain_app"
    log_level: str = "INFO"
    log_json: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 2
    api_threads: int = 8
    engine_batch_max: int = 2000
    engine_linger_ms: float = 0.0
    gc_gen0_threshold: int = 10_000
    test_database_url: str | None = None
    test_redis_url: str | None = None
    rpc_url: str | None = None
    chain_port: int = 8545
    confirmations: int = 6
    deployment_file: Path | None = None
    # Private keys: kept out of repr so that a logged Settings never shows them.
    signer_key: str | None = field(default=None, repr=False)
    signer_keystore: Path | None = None
    signer_keystore_password: str | None = field(default=None, repr=False)
    deployer_key: str | None = field(default=None, repr=False)
    fee_address: str | None = None
    indexer_window_blocks: int = 2000
    indexer_interval_s: float = 2.0
    sender_interval_s: float = 1.0
    sender_bump_after_s: float = 30.0
    sender_max_in_flight: int = 64
    worker_metrics_port: int | None = None
    escrow_approval_above: int = 1_000 * 10**18
    escrow_dispute_extension_s: int = 30 * 86_400
    escrow_fee_bps: int = 250
    escrow_sweep_interval_s: float = 30.0
    bls_verifier: str = "blst"
    points_per_trace: Decimal = Decimal(100)
    points_expiry_interval_s: float = 300.0
    staking_tick_interval_s: float = 60.0
    reconcile_interval_s: float = 300.0
    reconcile_unseen_within_s: float = 3600.0

    @property
    def deployment_path(self) -> Path:
        """Where ``tracechain deploy`` writes the deployment record that every process reads."""
        return self.deployment_file or self.data_dir / "deployment.json"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc
    if not 0 <= value <= maximum:
        raise SettingsError(f"{name} must be between 0 and {maximum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name) or default
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _decimal(env: Mapping[str, str], name: str, default: Decimal, maximum: Decimal) -> Decimal:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    with localcontext() as ctx:
        ctx.prec = 80
        try:
            value = Decimal(raw.strip())
        except InvalidOperation as exc:
            raise SettingsError(f"{name} must be a decimal number, got {raw!r}") from exc
    if not value.is_finite() or not 0 < value <= maximum:
        raise SettingsError(f"{name} must be greater than 0 and at most {maximum}, got {raw!r}")
    return value


def _opt(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return raw if raw else None


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw) if raw else None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (the process environment when omitted)."""
    source: Mapping[str, str] = os.environ if env is None else env
    level = source.get("TRACE_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"TRACE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return Settings(
        database_url=_opt(source, "TRACE_DATABASE_URL"),
        redis_url=_opt(source, "TRACE_REDIS_URL"),
        data_dir=Path(source.get("TRACE_DATA_DIR") or ".tracechain"),
        db_role=source.get("TRACE_DB_ROLE") or "tracechain_app",
        log_level=level,
        log_json=_bool(source, "TRACE_LOG_JSON", True),
        api_host=source.get("TRACE_API_HOST") or "127.0.0.1",
        api_port=_int(source, "TRACE_API_PORT", 8000, 1, 65535),
        api_workers=_int(source, "TRACE_API_WORKERS", 2, 1, 64),
        api_threads=_int(source, "TRACE_API_THREADS", 8, 1, 256),
        engine_batch_max=_int(source, "TRACE_ENGINE_BATCH_MAX", 2000, 1, BATCH_MAX_COMMANDS),
        engine_linger_ms=_float(source, "TRACE_ENGINE_LINGER_MS", 0.0, 1000.0),
        gc_gen0_threshold=_int(source, "TRACE_GC_GEN0_THRESHOLD", 10_000, 100, 10_000_000),
        test_database_url=_opt(source, "TRACE_TEST_DATABASE_URL"),
        test_redis_url=_opt(source, "TRACE_TEST_REDIS_URL"),
        rpc_url=_opt(source, "TRACE_RPC_URL"),
        chain_port=_int(source, "TRACE_CHAIN_PORT", 8545, 1, 65535),
        confirmations=_int(source, "TRACE_CONFIRMATIONS", 6, 0, 1000),
        deployment_file=_path(source, "TRACE_DEPLOYMENT_FILE"),
        signer_key=_opt(source, "TRACE_SIGNER_KEY"),
        signer_keystore=_path(source, "TRACE_SIGNER_KEYSTORE"),
        signer_keystore_password=_opt(source, "TRACE_SIGNER_KEYSTORE_PASSWORD"),
        deployer_key=_opt(source, "TRACE_DEPLOYER_KEY"),
        fee_address=_opt(source, "TRACE_FEE_ADDRESS"),
        indexer_window_blocks=_int(source, "TRACE_INDEXER_WINDOW_BLOCKS", 2000, 1, 100_000),
        indexer_interval_s=_float(source, "TRACE_INDEXER_INTERVAL_S", 2.0, 3600.0),
        sender_interval_s=_float(source, "TRACE_SENDER_INTERVAL_S", 1.0, 3600.0),
        sender_bump_after_s=_float(source, "TRACE_SENDER_BUMP_AFTER_S", 30.0, 86_400.0),
        sender_max_in_flight=_int(source, "TRACE_SENDER_MAX_IN_FLIGHT", 64, 1, 10_000),
        worker_metrics_port=_int(source, "TRACE_WORKER_METRICS_PORT", 0, 0, 65535) or None,
        escrow_approval_above=_int(source, "TRACE_ESCROW_APPROVAL_ABOVE", 1_000 * 10**18, 0, 2**256 - 1),
        escrow_dispute_extension_s=_int(
            source, "TRACE_ESCROW_DISPUTE_EXTENSION_S", 30 * 86_400, 60, 5 * 365 * 86_400
        ),
        escrow_fee_bps=_int(source, "TRACE_ESCROW_FEE_BPS", 250, 0, 10_000),
        escrow_sweep_interval_s=_float(source, "TRACE_ESCROW_SWEEP_INTERVAL_S", 30.0, 86_400.0),
        bls_verifier=_choice(source, "TRACE_BLS_VERIFIER", "blst", ("blst", "milagro", "py_ecc")),
        points_per_trace=_decimal(source, "TRACE_POINTS_PER_TRACE", Decimal(100), Decimal(10**36)),
        points_expiry_interval_s=_float(source, "TRACE_POINTS_EXPIRY_INTERVAL_S", 300.0, 86_400.0),
        staking_tick_interval_s=_float(source, "TRACE_STAKING_TICK_INTERVAL_S", 60.0, 86_400.0),
        reconcile_interval_s=_float(source, "TRACE_RECONCILE_INTERVAL_S", 300.0, 86_400.0),
        reconcile_unseen_within_s=_float(source, "TRACE_RECONCILE_UNSEEN_WITHIN_S", 3600.0, 30 * 86_400.0),
    )
