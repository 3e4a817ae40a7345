"""TraceEscrow on py-evm: funding, partial releases and refunds, the buyer's own refund, deadlines, roles."""

from __future__ import annotations

import pytest

from contracts.bindings import ARBITER_ROLE, DEFAULT_ADMIN_ROLE, deploy
from tests.chain.conftest import GRACE_S, TRACE, Chain

ESCROW_ID = b"\x01" * 32
FUNDED = 100 * TRACE
DAY_S = 24 * 3600


def fund(chain: Chain, escrow_id: bytes = ESCROW_ID, amount: int = FUNDED) -> int:
    """Funds an escrow from the buyer to the seller due in a week; returns its deadline."""
    deadline = chain.next_timestamp() + 7 * DAY_S
    p = chain.parties
    chain.send(chain.escrow.functions.fund(escrow_id, p.seller, amount, deadline), p.buyer)
    return deadline


def remaining(chain: Chain, escrow_id: bytes = ESCROW_ID) -> int:
    return int(chain.escrow.functions.escrows(escrow_id).call()[3])


def test_fund_pulls_the_amount_and_records_the_escrow(chain: Chain) -> None:
    p = chain.parties
    deadline = chain.next_timestamp() + 7 * DAY_S
    receipt = chain.send(chain.escrow.functions.fund(ESCROW_ID, p.seller, FUNDED, deadline), p.buyer)

    assert chain.escrow.functions.escrows(ESCROW_ID).call() == [p.buyer, p.seller, FUNDED, FUNDED, deadline]
    assert chain.escrow.functions.getEscrow(ESCROW_ID).call() == (p.buyer, p.seller, FUNDED, FUNDED, deadline)
    assert chain.balance(chain.escrow.address) == FUNDED
    [funded] = chain.events(receipt, "Funded")
    assert funded.address == chain.escrow.address
    assert funded.args == {
        "id": ESCROW_ID,
        "buyer": p.buyer,
        "seller": p.seller,
        "amount": FUNDED,
        "deadline": deadline,
    }
    [transfer] = chain.events(receipt, "Transfer")
    assert transfer.args == {"from": p.buyer, "to": chain.escrow.address, "value": FUNDED}


def test_views_of_the_configuration(chain: Chain) -> None:
    assert chain.escrow.functions.graceSeconds().call() == GRACE_S
    assert chain.escrow.functions.feeRecipient().call() == chain.parties.fees
    assert chain.escrow.functions.token().call() == chain.token.address
    assert chain.escrow.functions.ARBITER_ROLE().call() == ARBITER_ROLE
    assert chain.escrow.functions.escrows(b"\x09" * 32).call() == ["0x" + "0" * 40, "0x" + "0" * 40, 0, 0, 0]


def test_an_id_is_funded_once_even_after_its_escrow_is_exhausted(chain: Chain) -> None:
    p = chain.parties
    deadline = fund(chain)
    with chain.reverts("EscrowExists", id=ESCROW_ID):
        chain.send(chain.escrow.functions.fund(ESCROW_ID, p.seller, 1, deadline), p.other)
    assert chain.escrow.functions.escrows(ESCROW_ID).call() == [p.buyer, p.seller, FUNDED, FUNDED, deadline]
    chain.send(chain.escrow.functions.release(ESCROW_ID, FUNDED, 0), p.arbiter)
    with chain.reverts("EscrowExists", id=ESCROW_ID):
        chain.send(chain.escrow.functions.fund(ESCROW_ID, p.seller, 1, deadline), p.buyer)
    # The exhausted escrow keeps its record; nothing was pulled from the buyer again.
    assert chain.escrow.functions.escrows(ESCROW_ID).call() == [p.buyer, p.seller, FUNDED, 0, deadline]
    assert chain.balance(chain.escrow.address) == 0


@pytest.mark.parametrize(
    ("seller_is_zero", "amount", "error"),
    [(True, FUNDED, "ZeroAddress"), (False, 0, "ZeroAmount")],
)
def test_fund_refuses_a_zero_seller_or_amount(
    chain: Chain, seller_is_zero: bool, amount: int, error: str
) -> None:
    p = chain.parties
    seller = "0x" + "0" * 40 if seller_is_zero else p.seller
    deadline = chain.next_timestamp() + DAY_S
    with chain.reverts(error):
        chain.send(chain.escrow.functions.fund(ESCROW_ID, seller, amount, deadline), p.buyer)
    assert chain.balance(chain.escrow.address) == 0


def test_fund_refuses_a_deadline_that_is_not_in_the_future(chain: Chain) -> None:
    p = chain.parties
    at = chain.next_timestamp() + 100
    chain.next_block_at(at)
    for deadline in (at - 1, at):
        with chain.reverts("DeadlineNotInFuture", deadline=deadline, blockTimestamp=at):
            chain.send(chain.escrow.functions.fund(ESCROW_ID, p.seller, FUNDED, deadline), p.buyer)
    chain.send(chain.escrow.functions.fund(ESCROW_ID, p.seller, FUNDED, at + 1), p.buyer)
    assert remaining(chain) == FUNDED


def test_fund_needs_the_allowance(chain: Chain) -> None:
    p = chain.parties
    chain.send(chain.token.functions.approve(chain.escrow.address, FUNDED - 1), p.buyer)
    buyer_before = chain.balance(p.buyer)
    with chain.reverts("ERC20InsufficientAllowance", allowance=FUNDED - 1, needed=FUNDED):
        fund(chain)
    assert remaining(chain) == 0
    assert chain.balance(p.buyer) == buyer_before
    assert chain.balance(chain.escrow.address) == 0


def test_partial_releases_up_to_the_funded_amount_and_not_one_unit_more(chain: Chain) -> None:
    p = chain.parties
    fund(chain)
    first = chain.send(chain.escrow.functions.release(ESCROW_ID, 60 * TRACE, 2 * TRACE), p.arbiter)
    [released] = chain.events(first, "Released")
    assert released.args == {
        "id": ESCROW_ID,
        "seller": p.seller,
        "toSeller": 60 * TRACE,
        "fee": 2 * TRACE,
        "remaining": 38 * TRACE,
    }
    transfers = [(e.args["to"], e.args["value"]) for e in chain.events(first, "Transfer")]
    assert transfers == [(p.seller, 60 * TRACE), (p.fees, 2 * TRACE)]

    with chain.reverts(
        "AmountExceedsRemaining", id=ESCROW_ID, requested=38 * TRACE + 1, remaining=38 * TRACE
    ):
        chain.send(chain.escrow.functions.release(ESCROW_ID, 38 * TRACE, 1), p.arbiter)

    last = chain.send(chain.escrow.functions.release(ESCROW_ID, 37 * TRACE, TRACE), p.arbiter)
    assert chain.events(last, "Released")[0].args["remaining"] == 0
    assert remaining(chain) == 0
    assert chain.balance(p.seller) == 97 * TRACE
    assert chain.balance(p.fees) == 3 * TRACE
    assert chain.balance(chain.escrow.address) == 0

    # Exhausted: even a single unit more is refused, to the seller or as a fee.
    for to_seller, fee in ((1, 0), (0, 1)):
        with chain.reverts("AmountExceedsRemaining", requested=1, remaining=0):
            chain.send(chain.escrow.functions.release(ESCROW_ID, to_seller, fee), p.arbiter)


def test_release_beyond_the_funded_amount_is_refused_at_once(chain: Chain) -> None:
    p = chain.parties
    fund(chain)
    with chain.reverts("AmountExceedsRemaining", requested=FUNDED + 1, remaining=FUNDED):
        chain.send(chain.escrow.functions.release(ESCROW_ID, FUNDED, 1), p.arbiter)
    assert remaining(chain) == FUNDED


def test_release_whose_sum_overflows_is_refused(chain: Chain) -> None:
    p = chain.parties
    fund(chain)
    with chain.reverts("Panic", code=0x11):
        chain.send(chain.escrow.functions.release(ESCROW_ID, 2**256 - 1, 1), p.arbiter)
    assert remaining(chain) == FUNDED
    assert chain.balance(p.seller) == 0


def test_release_of_nothing_or_of_an_unknown_escrow_is_refused(chain: Chain) -> None:
    p = chain.parties
    fund(chain)
    with chain.reverts("ZeroAmount"):
        chain.send(chain.escrow.functions.release(ESCROW_ID, 0, 0), p.arbiter)
    with chain.reverts("UnknownEscrow", id=b"\x02" * 32):
        chain.send(chain.escrow.functions.release(b"\x02" * 32, 1, 0), p.arbiter)
    assert remaining(chain) == FUNDED
    assert chain.balance(chain.escrow.address) == FUNDED


def test_release_after_a_full_refund_is_refused(chain: Chain) -> None:
    p = chain.parties
    fund(chain)
    chain.send(chain.escrow.functions.refund(ESCROW_ID, FUNDED), p.arbiter)
    with chain.reverts("AmountExceedsRemaining", requested=1, remaining=0):
        chain.send(chain.escrow.functions.release(ESCROW_ID, 1, 0), p.arbiter)
    assert chain.balance(p.seller) == 0


@pytest.mark.parametrize("who", ["buyer", "seller", "admin", "other"])
def test_only_an_arbiter_releases_or_extends(chain: Chain, who: str) -> None:
    p = chain.parties
    deadline = fund(chain)
    caller = getattr(p, who)
    with chain.reverts("AccessControlUnauthorizedAccount", account=caller, neededRole=ARBITER_ROLE):
        chain.send(chain.escrow.functions.release(ESCROW_ID, 1, 0), caller)
    with chain.reverts("AccessControlUnauthorizedAccount", account=caller, neededRole=ARBITER_ROLE):
        chain.send(chain.escrow.functions.extendDeadline(ESCROW_ID, deadline + 1), caller)
    assert chain.escrow.functions.escrows(ESCROW_ID).call()[3:] == [FUNDED, deadline]


@pytest.mark.parametrize("who", ["seller", "admin", "other"])
def test_nobody_but_an_arbiter_or_the_buyer_refunds_even_after_the_grace(chain: Chain, who: str) -> None:
    p = chain.parties
    deadline = fund(chain)
    chain.next_block_at(deadline + GRACE_S + 1)
    caller = getattr(p, who)
    buyer_before = chain.balance(p.buyer)
    with chain.reverts("AccessControlUnauthorizedAccount", account=caller, neededRole=ARBITER_ROLE):
        chain.send(chain.escrow.functions.refund(ESCROW_ID, 1), caller)
    assert remaining(chain) == FUNDED
    assert chain.balance(p.buyer) == buyer_before


def test_arbiter_refunds_in_parts_at_any_time(chain: Chain) -> None:
    p = chain.parties
    fund(chain)
    before = chain.balance(p.buyer)
    receipt = chain.send(chain.escrow.functions.refund(ESCROW_ID, 30 * TRACE), p.arbiter)
    [refunded] = chain.events(receipt, "Refunded")
    assert refunded.args == {
        "id": ESCROW_ID,
        "buyer": p.buyer,
        "amount": 30 * TRACE,
        "remaining": 70 * TRACE,
        "byBuyer": False,
    }
    chain.send(chain.escrow.functions.release(ESCROW_ID, 50 * TRACE, 0), p.arbiter)
    with chain.reverts("AmountExceedsRemaining", requested=20 * TRACE + 1, remaining=20 * TRACE):
        chain.send(chain.escrow.functions.refund(ESCROW_ID, 20 * TRACE + 1), p.arbiter)
    with chain.reverts("ZeroAmount"):
        chain.send(chain.escrow.functions.refund(ESCROW_ID, 0), p.arbiter)
    chain.send(chain.escrow.functions.refund(ESCROW_ID, 20 * TRACE), p.arbiter)
    assert chain.balance(p.buyer) == before + 50 * TRACE
    assert chain.balance(chain.escrow.address) == 0


def test_buyer_refunds_alone_from_deadline_plus_grace_and_not_one_second_before(chain: Chain) -> None:
    p = chain.parties
    deadline = fund(chain)
    allowed_at = deadline + GRACE_S

    chain.next_block_at(allowed_at - 1)
    with chain.reverts("RefundNotYetAllowed", id=ESCROW_ID, allowedAt=allowed_at):
        chain.send(chain.escrow.functions.refund(ESCROW_ID, FUNDED), p.buyer)

    chain.next_block_at(allowed_at)
    before = chain.balance(p.buyer)
    receipt = chain.send(chain.escrow.functions.refund(ESCROW_ID, 40 * TRACE), p.buyer)
    assert chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == allowed_at
    [refunded] = chain.events(receipt, "Refunded")
    assert refunded.args["byBuyer"] is True
    assert refunded.args["remaining"] == 60 * TRACE
    with chain.reverts("AmountExceedsRemaining", requested=60 * TRACE + 1, remaining=60 * TRACE):
        chain.send(chain.escrow.functions.refund(ESCROW_ID, 60 * TRACE + 1), p.buyer)
    chain.send(chain.escrow.functions.refund(ESCROW_ID, 60 * TRACE), p.buyer)
    assert chain.balance(p.buyer) == before + FUNDED


def test_extending_the_deadline_holds_off_the_buyers_refund(chain: Chain) -> None:
    p = chain.parties
    deadline = fund(chain)
    later = deadline + 10 * DAY_S
    receipt = chain.send(chain.escrow.functions.extendDeadline(ESCROW_ID, later), p.arbiter)
    [extended] = chain.events(receipt, "DeadlineExtended")
    assert extended.args == {"id": ESCROW_ID, "deadline": later}
    assert chain.escrow.functions.escrows(ESCROW_ID).call()[4] == later

    chain.next_block_at(deadline + GRACE_S)
    with chain.reverts("RefundNotYetAllowed", allowedAt=later + GRACE_S):
        chain.send(chain.escrow.functions.refund(ESCROW_ID, FUNDED), p.buyer)
    chain.next_block_at(later + GRACE_S)
    chain.send(chain.escrow.functions.refund(ESCROW_ID, FUNDED), p.buyer)
    assert remaining(chain) == 0


def test_a_deadline_is_never_shortened_nor_set_to_itself(chain: Chain) -> None:
    p = chain.parties
    deadline = fund(chain)
    for requested in (deadline - 1, deadline):
        with chain.reverts(
            "DeadlineNotExtended", id=ESCROW_ID, currentDeadline=deadline, requestedDeadline=requested
        ):
            chain.send(chain.escrow.functions.extendDeadline(ESCROW_ID, requested), p.arbiter)
    with chain.reverts("UnknownEscrow"):
        chain.send(chain.escrow.functions.extendDeadline(b"\x03" * 32, deadline + 1), p.arbiter)
    assert chain.escrow.functions.escrows(ESCROW_ID).call()[4] == deadline


def test_admin_sets_the_fee_recipient(chain: Chain) -> None:
    p = chain.parties
    fund(chain)
    receipt = chain.send(chain.escrow.functions.setFeeRecipient(p.other), p.admin)
    [event] = chain.events(receipt, "FeeRecipientSet")
    assert event.args == {"previousRecipient": p.fees, "newRecipient": p.other}
    assert chain.escrow.functions.feeRecipient().call() == p.other
    before = chain.balance(p.other)
    chain.send(chain.escrow.functions.release(ESCROW_ID, 90 * TRACE, 10 * TRACE), p.arbiter)
    assert chain.balance(p.other) == before + 10 * TRACE
    assert chain.balance(p.fees) == 0

    with chain.reverts("AccessControlUnauthorizedAccount", account=p.arbiter, neededRole=DEFAULT_ADMIN_ROLE):
        chain.send(chain.escrow.functions.setFeeRecipient(p.arbiter), p.arbiter)
    with chain.reverts("ZeroAddress"):
        chain.send(chain.escrow.functions.setFeeRecipient("0x" + "0" * 40), p.admin)


def test_escrows_are_independent(chain: Chain) -> None:
    p = chain.parties
    fund(chain, b"\x0a" * 32, 10 * TRACE)
    fund(chain, b"\x0b" * 32, 20 * TRACE)
    chain.send(chain.escrow.functions.release(b"\x0a" * 32, 10 * TRACE, 0), p.arbiter)
    with chain.reverts("AmountExceedsRemaining", remaining=0):
        chain.send(chain.escrow.functions.release(b"\x0a" * 32, 1, 0), p.arbiter)
    assert remaining(chain, b"\x0b" * 32) == 20 * TRACE
    assert chain.balance(chain.escrow.address) == 20 * TRACE


def test_constructor_refuses_zero_addresses(chain: Chain) -> None:
    p = chain.parties
    zero = "0x" + "0" * 40
    for args in (
        (zero, p.admin, p.fees, GRACE_S),
        (chain.token.address, zero, p.fees, GRACE_S),
        (chain.token.address, p.admin, zero, GRACE_S),
    ):
        nonce = chain.w3.eth.get_transaction_count(p.admin)
        with chain.reverts("ZeroAddress"):
            deploy(chain.w3, "TraceEscrow", *args, sender=p.admin)
        # Refused before anything was sent: no contract, no transaction from the deployer.
        assert chain.w3.eth.get_transaction_count(p.admin) == nonce
