"""A TRACE token and a deployment record around it, for the tests of the chain side that need
only the token (custody addresses are plain accounts)."""

from __future__ import annotations

from collections.abc import Sequence

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract

from contracts.bindings import MINTER_ROLE, deploy, transact
from contracts.deployment import Deployment


def token_deployment(
    w3: Web3, accounts: Sequence[LocalAccount], user_balance: int
) -> tuple[Contract, Deployment]:
    """Deploy TraceToken from ``accounts[0]`` and mint ``user_balance`` to ``accounts[1]``; accounts
    2 to 5 are the escrow, vault, treasury and fee wallet of the returned deployment record."""
    admin, user, escrow, vault, treasury, fees = accounts[:6]
    start_block = int(w3.eth.block_number) + 1
    token = deploy(w3, "TraceToken", "Trace", "TRACE", admin.address, sender=admin)
    transact(w3, token.functions.grantRole(MINTER_ROLE, admin.address), admin)
    transact(w3, token.functions.mint(user.address, user_balance), admin)
    deployment = Deployment(
        chain_id=int(w3.eth.chain_id),
        start_block=start_block,
        token=token.address,
        escrow=escrow.address,
        vault=vault.address,
        treasury=treasury.address,
        fee_wallet=fees.address,
    )
    return token, deployment
