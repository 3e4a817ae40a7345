"""Deploying the platform: the three contracts, the roles of the platform key, the record."""

from __future__ import annotations

from eth_utils.crypto import keccak
from web3 import Web3

from contracts.bindings import ARBITER_ROLE, MINTER_ROLE, Sender, deploy, transact
from contracts.deployment import Deployment

TOKEN_NAME = "Trace"  # noqa: S105 - a token name, not a secret
TOKEN_SYMBOL = "TRACE"  # noqa: S105
GRACE_SECONDS_DEFAULT = 3 * 86_400
# The staking vault's roles: the platform mirrors pool settings and compounds rewards with them.
POOL_MANAGER_ROLE = keccak(text="POOL_MANAGER_ROLE")
COMPOUNDER_ROLE = keccak(text="COMPOUNDER_ROLE")


def deploy_platform(
    w3: Web3,
    deployer: Sender,
    *,
    signer: str,
    fee_wallet: str,
    grace_seconds: int = GRACE_SECONDS_DEFAULT,
) -> Deployment:
    """Deploy TraceToken, TraceEscrow and TraceStakingVault from ``deployer`` (their admin) and grant
    the platform's signing key ``signer`` the minter and arbiter roles and the vault's pool manager
    and compounder roles. The signer's address is the treasury wallet; ``fee_wallet`` receives
    escrow fees. Returns the deployment record."""
    deployer_address = deployer if isinstance(deployer, str) else deployer.address
    admin = Web3.to_checksum_address(deployer_address)
    platform = Web3.to_checksum_address(signer)
    fees = Web3.to_checksum_address(fee_wallet)
    start_block = int(w3.eth.block_number) + 1
    token = deploy(w3, "TraceToken", TOKEN_NAME, TOKEN_SYMBOL, admin, sender=deployer)
    escrow = deploy(w3, "TraceEscrow", token.address, admin, fees, grace_seconds, sender=deployer)
    vault = deploy(w3, "TraceStakingVault", token.address, admin, sender=deployer)
    transact(w3, token.functions.grantRole(MINTER_ROLE, platform), deployer)
    transact(w3, escrow.functions.grantRole(ARBITER_ROLE, platform), deployer)
    transact(w3, vault.functions.grantRole(POOL_MANAGER_ROLE, platform), deployer)
    transact(w3, vault.functions.grantRole(COMPOUNDER_ROLE, platform), deployer)
    return Deployment(
        chain_id=int(w3.eth.chain_id),
        start_block=start_block,
        token=str(token.address),
        escrow=str(escrow.address),
        vault=str(vault.address),
        treasury=platform,
        fee_wallet=fees,
    )


def is_live(w3: Web3, deployment: Deployment) -> bool:
    """Whether ``deployment`` is on the chain ``w3`` serves (same chain id, contract code present)."""
    if int(w3.eth.chain_id) != deployment.chain_id:
        return False
    return all(w3.eth.get_code(Web3.to_checksum_address(a)) for a in deployment.contracts)
