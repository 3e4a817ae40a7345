"""Points (DESIGN §7): participants earn points (asset PTS) for supply-chain events under versioned
rules, and claim them as TRACE minted to their wallet.

``rules`` participants and scoring rules; ``ingest`` set-based, idempotent accrual of event
batches; ``statements`` balances and history; ``claims`` points to TRACE through the outbox;
``expiry`` the sweep that returns expired points to ``points:issued``.
"""
