"""The demo's report for people: amounts in TRACE, and a day that does not reconcile says which
check failed."""

from __future__ import annotations

from typing import Any

from admin_api.demo import report_lines, trace


def test_amounts_read_as_trace() -> None:
    assert trace(0) == "0 TRACE"
    assert trace(10**18) == "1 TRACE"
    assert trace("1234500000000000000000") == "1,234.5 TRACE"
    assert trace(1) == "0.000000000000000001 TRACE"
    assert trace(-25 * 10**17) == "-2.5 TRACE"


def _summary(**checks: bool) -> dict[str, Any]:
    address = "0x" + "e5" * 20
    return {
        "reconciliation": {
            "run_id": 7,
            "from_block": 1,
            "to_block": 9,
            "transfers_checked": 3,
            "counts": {"matched": 2, "chain_only": 1},
            "balance_breaks": 0,
            "balances": {address: {"ledger": "5", "chain": "5", "drift": "0"}},
            "minted": {"ledger": "0", "chain": "0", "drift": "0"},
        },
        "exceptions": [
            {
                "id": 3,
                "kind": "unexplained_transfer",
                "tx_hash": "0xab",
                "age_s": 4,
                "details": {"amount": str(10**18), "from": "0x01", "to": address},
            }
        ],
        "earlier_open_exceptions": 2,
        "reserves": {
            "block": 9,
            "solvent": True,
            "addresses": {
                address: {
                    "role": "escrow",
                    "liabilities": "0",
                    "on_chain": "5",
                    "ledger_mirror": "5",
                    "cover": "5",
                }
            },
        },
        "checks": checks,
    }


def test_the_report_names_the_run_the_exception_and_the_reserves() -> None:
    text = "\n".join(report_lines(_summary(no_breaks=True)))
    assert "Reconciliation run 7: blocks 1-9, 3 transfers checked" in text
    assert "matched 2, chain-only 1, ledger-only 0, mismatched 0" in text
    assert "Open exceptions raised during the day: 1 (2 from before the day are still open)" in text
    assert "#3 unexplained_transfer: 1 TRACE from 0x01" in text
    assert "Proof of reserves at block 9: solvent" in text
    assert text.endswith("The day reconciles: every check holds.")


def test_a_day_that_does_not_reconcile_names_the_failed_checks() -> None:
    lines = report_lines(
        _summary(no_breaks=False, reserves_cover_liabilities=True, mirrors_match_the_chain=False)
    )
    assert lines[-1] == "Checks that do not hold: no_breaks, mirrors_match_the_chain"
