"""The escrow state machine is one table: every listed move is allowed, every other refused."""

from __future__ import annotations

import itertools

import pytest

from ledger.escrow.states import FINAL, MOVES, STATUSES, TransitionRefused, check_move


def test_every_target_is_a_known_status_and_every_status_is_reachable() -> None:
    targets = {t for moves in MOVES.values() for t in moves}
    assert targets <= set(STATUSES)
    assert targets == set(STATUSES)
    # Only a reorg that takes the funding away leads back to the first status.
    assert {s for s, moves in MOVES.items() if "awaiting_funding" in moves} == {
        "funded",
        "delivery_confirmed",
        "funding_exception",
    }
    assert set(FINAL) == {"released", "refunded", "resolved"}


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(STATUSES, STATUSES)))
def test_only_the_table_s_moves_are_allowed(current: str, wanted: str) -> None:
    if wanted in MOVES[current]:
        assert check_move("0xabc", current, wanted) == MOVES[current][wanted]
    else:
        with pytest.raises(TransitionRefused) as refused:
            check_move("0xabc", current, wanted)
        assert refused.value.code == "escrow_transition_refused"
        assert current in str(refused.value) and wanted in str(refused.value)


def test_a_final_state_allows_nothing() -> None:
    with pytest.raises(TransitionRefused, match="none \\(final\\)"):
        check_move("0xabc", "released", "funded")
