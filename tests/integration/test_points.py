"""Points on real PostgreSQL: rules, set-based idempotent accrual, caps, balances, history, expiry."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from ledger.errors import Conflict, InvalidInput, LedgerError
from ledger.points import expiry, ingest, rules, statements
from tests.points_kit import PointsWorld, make_world, points_of, points_tables


@pytest.fixture
def world(app_engine: sa.Engine, unique: str) -> PointsWorld:
    return make_world(app_engine, unique)


def _ingest(engine: sa.Engine, events: Any) -> ingest.IngestReport:
    with engine.begin() as conn:
        return ingest.ingest(conn, events)


def test_a_batch_accrues_by_rule_and_tier_with_one_transfer_per_participant(
    app_engine: sa.Engine, world: PointsWorld
) -> None:
    events = [world.event(f"e{i}", world.alice if i % 3 else world.bob, world.checkpoint) for i in range(30)]
    report = _ingest(app_engine, events)
    assert (report.created, report.exists, report.conflicts, report.rejected) == (30, 0, 0, 0)
    # alice (gold, x1.5): 20 events x 15; bob (silver, x1): 10 events x 10
    assert points_of(app_engine, world.alice) == (300, 0, 0)
    assert points_of(app_engine, world.bob) == (100, 0, 0)
    assert report.points == 400 and report.participants == 2
    with app_engine.connect() as conn:
        transfers = conn.execute(
            sa.text(
                "SELECT e.idempotency_key, count(t.id) FROM ledger_entries e JOIN ledger_transfers t"
                " ON t.entry_id = e.id WHERE e.idempotency_key LIKE :k GROUP BY 1"
            ),
            {"k": f"points:accrual:{report.batch_id}:%"},
        ).all()
        assert [tuple(r) for r in transfers] == [(f"points:accrual:{report.batch_id}:0", 2)]
        accrual = statements.history(conn, world.alice, limit=1)[0]
        assert accrual.points == 15 and accrual.multiplier_bps == 15_000 and accrual.tier == "gold"
        assert "x 150% (gold) = 15" in accrual.reason
        assert statements.lots_consistent(conn, world.alice)
        balance = statements.balance(conn, world.alice)
    assert (balance.posted, balance.held, balance.available, balance.claimable) == (300, 0, 300, 300)


def test_a_multiplier_rounds_down(app_engine: sa.Engine, unique: str) -> None:
    with app_engine.begin() as conn:
        rules.add_rule_version(conn, rules.NewRule(f"{unique}.odd", 7, {"gold": 15_000}), "tests")
        rules.set_participant(conn, f"{unique}-g", "gold", None, "tests")
        since = rules.rule_in_force(conn, f"{unique}.odd")
    assert since is not None
    event = {"source": "s", "event_id": f"{unique}-1", "participant": f"{unique}-g", "type": f"{unique}.odd",
             "occurred_at": since.effective_at.isoformat()}  # fmt: skip
    _ingest(app_engine, [event])
    assert points_of(app_engine, f"{unique}-g") == (10, 0, 0)  # 7 x 1.5 = 10.5 -> 10


def test_the_same_batch_again_changes_nothing(app_engine: sa.Engine, world: PointsWorld) -> None:
    events = [world.event(f"e{i}", world.alice, world.on_time) for i in range(2)]
    first = _ingest(app_engine, events)
    before = points_tables(app_engine, world.alice)
    again = _ingest(app_engine, events)
    assert (first.created, again.created, again.exists) == (2, 0, 2)
    assert [s.status for s in again.skipped] == ["exists", "exists"]
    assert points_tables(app_engine, world.alice) == before


def test_the_same_event_id_with_other_content_is_a_conflict_that_writes_nothing(
    app_engine: sa.Engine, world: PointsWorld
) -> None:
    _ingest(app_engine, [world.event("e1", world.alice, world.checkpoint)])
    before = points_tables(app_engine, world.alice)
    report = _ingest(app_engine, [world.event("e1", world.alice, world.on_time)])
    assert (report.created, report.conflicts) == (0, 1)
    assert report.skipped[0].status == "conflict"
    assert points_tables(app_engine, world.alice) == before


def test_repeats_inside_one_batch_count_once(app_engine: sa.Engine, world: PointsWorld) -> None:
    same = world.event("e1", world.alice, world.checkpoint)
    other = world.event("e1", world.alice, world.checkpoint, details={"note": "different"})
    report = _ingest(app_engine, [same, same, other])
    assert (report.created, report.exists, report.conflicts) == (1, 1, 1)
    assert points_of(app_engine, world.alice) == (15, 0, 0)


def test_the_daily_cap_holds_within_a_batch_across_batches_and_per_utc_day(
    app_engine: sa.Engine, world: PointsWorld
) -> None:
    day = world.since
    first = _ingest(app_engine, [world.event(f"a{i}", world.bob, world.on_time, day) for i in range(2)])
    assert first.points == 14
    second = _ingest(app_engine, [world.event(f"b{i}", world.bob, world.on_time, day) for i in range(3)])
    assert second.points == 6  # 20 - 14: the first takes 6 of its 7, the others nothing
    assert points_of(app_engine, world.bob) == (20, 0, 0)
    with app_engine.connect() as conn:
        capped = [a for a in statements.history(conn, world.bob) if a.capped]
        assert len(capped) == 3 and sorted(a.points for a in capped) == [0, 0, 6]
        assert all("daily cap reached" in a.reason for a in capped)
        total = conn.execute(
            sa.text("SELECT points FROM points_daily_totals WHERE participant_id = :p AND event_type = :t"),
            {"p": world.bob, "t": world.on_time},
        ).scalar_one()
    assert total == 20


def test_a_cap_holds_under_concurrent_batches(app_engine: sa.Engine, world: PointsWorld) -> None:
    batches = [[world.event(f"c{n}-{i}", world.bob, world.on_time) for i in range(5)] for n in range(4)]
    # Overlapping ids too: batch n repeats an event of batch n-1.
    for n in range(1, 4):
        batches[n].append(batches[n - 1][0])
    errors: list[BaseException] = []

    def run(events: list[dict[str, Any]]) -> None:
        try:
            _ingest(app_engine, events)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert points_of(app_engine, world.bob) == (20, 0, 0)
    with app_engine.connect() as conn:
        count = conn.execute(
            sa.text("SELECT count(*) FROM points_events WHERE participant_id = :p"), {"p": world.bob}
        ).scalar_one()
        assert count == 20
        assert statements.lots_consistent(conn, world.bob)


def test_a_rule_change_applies_only_to_events_after_it(app_engine: sa.Engine, world: PointsWorld) -> None:
    before_change = world.since
    with app_engine.begin() as conn:
        second = rules.add_rule_version(conn, rules.NewRule(world.checkpoint, 100), "tests")
    assert second.version == 2 and second.effective_at > before_change
    report = _ingest(
        app_engine,
        [
            world.event("old", world.bob, world.checkpoint, before_change),
            world.event("new", world.bob, world.checkpoint, second.effective_at),
        ],
    )
    assert report.points == 110  # 10 under version 1, 100 under version 2
    with app_engine.connect() as conn:
        by_id = {a.event_id: a for a in statements.history(conn, world.bob)}
    assert (by_id["old"].rule_version, by_id["new"].rule_version) == (1, 2)


def test_a_rule_change_cannot_take_effect_in_the_past(app_engine: sa.Engine, world: PointsWorld) -> None:
    with app_engine.begin() as conn, pytest.raises(InvalidInput, match="past"):
        rules.add_rule_version(
            conn,
            rules.NewRule(world.checkpoint, 1, effective_at=datetime.now(UTC) - timedelta(seconds=5)),
            "t",
        )
    later = datetime.now(UTC) + timedelta(hours=1)
    with app_engine.begin() as conn:
        rules.add_rule_version(conn, rules.NewRule(world.checkpoint, 2, effective_at=later), "tests")
    with app_engine.begin() as conn, pytest.raises(Conflict, match="later"):
        rules.add_rule_version(conn, rules.NewRule(world.checkpoint, 3, effective_at=later), "tests")


def test_events_nobody_can_score_are_refused_and_write_nothing(
    app_engine: sa.Engine, world: PointsWorld
) -> None:
    before = points_tables(app_engine, world.alice)
    report = _ingest(
        app_engine,
        [
            world.event("u1", "nobody-at-all", world.checkpoint),
            world.event("u2", world.alice, f"{world.prefix}.unknown"),
            world.event("u3", world.alice, world.checkpoint, world.since - timedelta(days=1)),
            world.event("u4", world.alice, world.checkpoint, datetime.now(UTC) + timedelta(hours=1)),
        ],
    )
    assert [s.status for s in report.skipped] == [
        "unknown_participant",
        "no_rule",
        "no_rule",
        "occurred_in_future",
    ]
    assert report.rejected == 4 and report.created == 0
    assert points_tables(app_engine, world.alice) == before


_RAW = {
    "source": "s",
    "event_id": "e",
    "participant": "p",
    "type": "t",
    "occurred_at": "2026-01-01T00:00:00Z",
}


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ("not a list", "must be a list"),
        ([], "1 to 10000"),
        ([{}] * 10_001, "1 to 10000"),
        ([{"source": "s"}], "missing"),
        ([{**_RAW, "occurred_at": "2026-01-01T00:00:00"}], "time zone"),
        ([{**_RAW, "occurred_at": "yesterday"}], "ISO"),
        ([{**_RAW, "occurred_at": "1999-12-31T00:00:00Z"}], "before 2000"),
        ([{**_RAW, "type": "T!"}], "event type"),
        ([{**_RAW, "participant": "no spaces allowed"}], "participant id"),
        ([{**_RAW, "details": {"x": 1.5}}], "floating"),
        ([{**_RAW, "details": "text"}], "JSON object"),
        ([{**_RAW, "source": ""}], "source"),
        ([{**_RAW, "event_id": 7}], "event_id"),
        ([{**_RAW, "points": "5"}], "unknown"),
        (["an event"], "must be an object"),
    ],
)  # fmt: skip
def test_a_malformed_batch_is_refused_whole(
    app_engine: sa.Engine, world: PointsWorld, events: Any, message: str
) -> None:
    good = world.event("fine", world.alice, world.checkpoint)
    before = points_tables(app_engine, world.alice)
    batch = [good, *events] if isinstance(events, list) and 0 < len(events) < 10 else events
    with pytest.raises(InvalidInput, match=message):
        _ingest(app_engine, batch)
    assert points_tables(app_engine, world.alice) == before


def test_expired_points_go_back_to_issued_once(app_engine: sa.Engine, world: PointsWorld) -> None:
    report = _ingest(
        app_engine,
        [world.event(f"x{i}", world.alice, world.expiring) for i in range(3)]
        + [world.event("keep", world.alice, world.checkpoint)],
    )
    assert report.points == 15 + 15
    with app_engine.connect() as conn:
        lot_expiry = conn.execute(
            sa.text("SELECT max(expires_at) FROM points_lots WHERE participant_id = :p"), {"p": world.alice}
        ).scalar_one()
    time.sleep(max(0.0, (lot_expiry - datetime.now(UTC)).total_seconds()) + 0.05)
    with app_engine.begin() as conn:
        swept = expiry.expire_points(conn)
    assert swept.points >= 15  # this test's lot; other tests' expired lots may be swept too
    with app_engine.begin() as conn:
        expiry.expire_points(conn)  # a second sweep finds nothing more of this lot
        keys = (
            conn.execute(
                sa.text(
                    "SELECT x.entry_key FROM points_expiries x JOIN points_lots l ON l.id = x.lot_id"
                    " WHERE l.participant_id = :p"
                ),
                {"p": world.alice},
            )
            .scalars()
            .all()
        )
        assert statements.lots_consistent(conn, world.alice)
        balance = statements.balance(conn, world.alice)
    assert len(keys) == 1 and keys[0].startswith("points:expire:")
    assert points_of(app_engine, world.alice) == (30, 15, 0)
    assert (balance.available, balance.claimable) == (15, 15)


def test_participants_register_once_and_change_tier(app_engine: sa.Engine, unique: str) -> None:
    with app_engine.begin() as conn:
        before, after, status = rules.set_participant(conn, f"{unique}-p", "silver", None, "tests")
        assert (before, status, after.tier) == (None, "created", "silver")
        before, after, status = rules.set_participant(conn, f"{unique}-p", "gold", "0x" + "AB" * 20, "tests")
        assert before is not None and (before.tier, after.tier, status) == ("silver", "gold", "exists")
        assert after.wallet == "0x" + "ab" * 20
        for bad in ({"participant_id": "bad id!"}, {"tier": "Gold"}, {"wallet": "0x12"}):
            args = {"participant_id": f"{unique}-q", "tier": "gold", "wallet": None, **bad}
            with pytest.raises(InvalidInput):
                rules.set_participant(conn, args["participant_id"], args["tier"], args["wallet"], "tests")


def test_points_beyond_uint256_refuse_the_batch_and_write_nothing(app_engine: sa.Engine, unique: str) -> None:
    with app_engine.begin() as conn:
        rule = rules.add_rule_version(
            conn, rules.NewRule(f"{unique}.huge", 2**255, {"gold": 20_000}), "tests"
        )
        rules.set_participant(conn, f"{unique}-g", "gold", None, "tests")
        rules.set_participant(conn, f"{unique}-s", "silver", None, "tests")
    base = {"source": "s", "type": f"{unique}.huge", "occurred_at": rule.effective_at.isoformat()}
    before = points_tables(app_engine, f"{unique}-s")
    with pytest.raises(LedgerError) as info:
        _ingest(
            app_engine,
            [{**base, "event_id": f"{unique}-1", "participant": f"{unique}-s"},
             {**base, "event_id": f"{unique}-2", "participant": f"{unique}-g"}],  # 2^255 x 2 = 2^256
        )  # fmt: skip
    assert info.value.code == "points_overflow"
    assert points_tables(app_engine, f"{unique}-s") == before
