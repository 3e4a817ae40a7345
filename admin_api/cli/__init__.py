"""The ``tracechain`` command line.

Exit codes: 0 success, 1 when something was rejected or does not hold, 2 on bad usage.
Results go to stdout (JSON), logs to stderr (JSON lines). Subcommands are imported when
used, so ``tracechain ledger check`` does not load the web stack.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click
import sqlalchemy as sa

from admin_api.cli.runtime import BadUsage, Failed
from ledger.errors import InvalidInput, LedgerError
from ledger.logs import configure_logging
from ledger.posting import tune_gc
from ledger.settings import SettingsError, load_settings

# name -> "module:attribute"; a missing optional module just leaves its command out.
_SUBCOMMANDS = {
    "db": "admin_api.cli.db:db",
    "ledger": "admin_api.cli.books:ledger",
    "apikey": "admin_api.cli.apikeys:apikey",
    "web": "admin_api.cli.serve:web",
    "dev": "admin_api.cli.serve:dev",
    "bench": "admin_api.bench:bench",
    "chain": "admin_api.cli.chain:chain",
    "index": "admin_api.cli.chainops:index",
    "send": "admin_api.cli.chainops:send",
    "worker": "admin_api.cli.chainops:worker",
    "sender": "admin_api.cli.chainops:sender",
    "beat": "admin_api.cli.chainops:beat",
    "deploy": "admin_api.cli.chainops:deploy",
    "escrow": "admin_api.cli.escrows:escrow",
    "points": "admin_api.cli.points:points",
    "staking": "admin_api.cli.staking:staking",
    "reconcile": "admin_api.cli.reconcile:reconcile",
    "exceptions": "admin_api.cli.exceptions:exceptions",
    "treasury": "admin_api.cli.treasury:treasury_group",
    "demo": "admin_api.cli.demo:demo",
}
_OPTIONAL = frozenset({"bench"})


class _Main(click.Group):
    """Loads subcommands lazily and maps domain errors to exit codes once."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [name for name in _SUBCOMMANDS if name not in _OPTIONAL or self._installed(name)]
        return sorted({*names, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _SUBCOMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if cmd_name not in _OPTIONAL:
                raise
            # An optional command that cannot load must not take the rest of the CLI down.
            click.echo(f"warning: `tracechain {cmd_name}` is unavailable: {exc}", err=True)
            return None
        command = getattr(module, attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command

    @staticmethod
    def _installed(name: str) -> bool:
        module_name = _SUBCOMMANDS[name].partition(":")[0]
        try:
            return importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            return False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            raise BadUsage(f"bad configuration: {exc}") from exc
        except InvalidInput as exc:
            raise BadUsage(exc.message) from exc
        except LedgerError as exc:
            raise Failed(f"{exc.message} ({exc.code})") from exc
        except sa.exc.OperationalError as exc:
            first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise Failed(f"database error: {first}") from exc


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracechain-settlement", prog_name="tracechain")
@click.pass_context
def main(ctx: click.Context) -> None:
    """TraceChain Settlement: the ledger, its database and the admin API.

    Configuration comes from TRACE_* environment variables; without TRACE_DATABASE_URL the
    commands use the embedded PostgreSQL under TRACE_DATA_DIR (default .tracechain/).
    """
    settings = load_settings()
    configure_logging(settings)
    tune_gc(settings.gc_gen0_threshold)  # every process of the cluster starts here
    ctx.obj = settings
