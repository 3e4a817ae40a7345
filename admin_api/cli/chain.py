"""``tracechain chain``: the embedded development chain (py-evm behind EVM JSON-RPC over HTTP)."""

from __future__ import annotations

import click

from admin_api.cli.runtime import Failed
from contracts.devchain import (
    DEFAULT_ACCOUNTS,
    DEFAULT_BALANCE_WEI,
    DEFAULT_CHAIN_ID,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEV_HD_PATH,
    DEV_MNEMONIC,
    MAX_ACCOUNTS,
    DevChainServer,
    serve,
)

WEI_PER_ETHER = 10**18


def _banner(server: DevChainServer) -> list[str]:
    """What a developer needs to connect: the URL, the chain id, and the funded accounts."""
    if server.block_time_s:
        mining = f"each transaction at once, and a block every {server.block_time_s} s"
    else:
        mining = "each transaction at once (a block per transaction)"
    lines = [
        "TraceChain dev chain (py-evm); state is in memory only and is lost when it stops. Ctrl-C stops it.",
        f"  RPC URL:     {server.url}",
        f"  Chain id:    {server.chain.chain_id}",
        f"  Mining:      {mining}",
        f"  Mnemonic:    {DEV_MNEMONIC}  (HD path {DEV_HD_PATH}/<index>)",
        "",
        f"Development accounts, {DEFAULT_BALANCE_WEI // WEI_PER_ETHER:,} ETH each.",
        "DEVELOPMENT ONLY: these private keys are publicly known; never send real funds to them.",
    ]
    width = len(str(len(server.chain.accounts) - 1))
    for index, account in enumerate(server.chain.accounts):
        lines.append(f"  ({index:>{width}}) {account.address}  private key {account.private_key}")
    return lines


@click.command("chain")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on (0: any free port; the URL printed says which).",
)
@click.option(
    "--block-time",
    "block_time_s",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also mine a block every this many seconds (0: only a block per transaction).",
)
@click.option(
    "--accounts",
    type=click.IntRange(1, MAX_ACCOUNTS),
    default=DEFAULT_ACCOUNTS,
    show_default=True,
    help="How many funded development accounts to create.",
)
@click.option(
    "--chain-id",
    type=click.IntRange(1, 2**63 - 1),
    default=DEFAULT_CHAIN_ID,
    show_default=True,
    help="The chain id (EIP-155) the chain reports and accepts signatures for.",
)
def chain(host: str, port: int, block_time_s: int, accounts: int, chain_id: int) -> None:
    """Run a development chain: EVM JSON-RPC over HTTP, backed by py-evm, state in memory.

    Every transaction is mined at once in its own block; with --block-time N a block is also
    mined every N seconds, so confirmations accrue while nothing is sent. The funded accounts
    derive from the well-known development mnemonic (the addresses anvil and hardhat use).
    Ctrl-C or SIGTERM stops it; nothing is kept.
    """

    def announce(server: DevChainServer) -> None:
        for line in _banner(server):
            click.echo(line)

    try:
        serve(
            host,
            port,
            chain_id=chain_id,
            accounts=accounts,
            block_time_s=block_time_s,
            on_ready=announce,
        )
    except OSError as exc:
        raise Failed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
