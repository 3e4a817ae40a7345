"""The staker's signed ClaimRewards request: its EIP-712 struct, bound to one chain and one vault,
and what it refuses when built."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from eth_account import Account

from ledger.errors import InvalidInput
from ledger.escrow import party

STAKER = Account.from_key("0x" + "a7" * 32)
VAULT = "0x" + "7a" * 20
OTHER_VAULT = "0x" + "7b" * 20
NOW = datetime(2030, 1, 1, tzinfo=UTC)
EXPIRY = int(NOW.timestamp()) + 3600


def test_a_claim_signed_for_one_vault_recovers_its_staker_there_only() -> None:
    request = party.ClaimRewardsRequest(3, 10**18, True, 7, EXPIRY)
    signature = party.sign(request, STAKER.key, 31337, VAULT)
    assert party.recover_signer(request, signature, 31337, VAULT, NOW) == STAKER.address.lower()
    assert party.recover_signer(request, signature, 31337, OTHER_VAULT, NOW) != STAKER.address.lower()
    assert party.recover_signer(request, signature, 1, VAULT, NOW) != STAKER.address.lower()
    other_terms = party.ClaimRewardsRequest(3, 10**18, False, 7, EXPIRY)
    assert party.recover_signer(other_terms, signature, 31337, VAULT, NOW) != STAKER.address.lower()
    typed = request.typed_data(31337, VAULT)
    assert typed["primaryType"] == "ClaimRewards"
    assert [f["name"] for f in typed["types"]["ClaimRewards"]] == [
        "poolId",
        "amount",
        "compound",
        "nonce",
        "expiry",
    ]
    assert typed["domain"]["verifyingContract"] == VAULT


@pytest.mark.parametrize(
    "fields",
    [
        {"pool_id": 0},
        {"pool_id": 2**63},
        {"pool_id": True},
        {"amount": -1},
        {"amount": 2**256},
        {"compound": 1},
        {"nonce": -1},
        {"expiry": 0},
        {"expiry": 2**64},
    ],
)
def test_a_malformed_claim_is_refused_when_built(fields: dict[str, object]) -> None:
    values: dict[str, object] = {"pool_id": 1, "amount": 0, "compound": False, "nonce": 1, "expiry": EXPIRY}
    values.update(fields)
    with pytest.raises(InvalidInput):
        party.ClaimRewardsRequest(**values)  # type: ignore[arg-type]
