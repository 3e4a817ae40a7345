"""A Hypothesis state machine over the ledger engine on a real PostgreSQL database.

Random accounts, entries (1-3 transfers, amounts up to uint256), holds with and without
timeouts, full and partial posts, voids, reversals, retried and conflicting keys, and batches
of all of these through one ``Poster.post``. A plain Python model predicts every result
(status, rejection code, entry id of an "exists") and every balance; after each step the
database must agree with the model and ``check_ledger`` must find the books whole.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from ledger import db
from ledger.accounts import create_account, create_asset, set_closed
from ledger.check import check_ledger
from ledger.commands import ACCOUNT_KINDS, Command, EntryResult, Leg, NewEntry, Resolve, Reverse
from ledger.errors import Conflict
from ledger.posting import Poster
from tests.conftest import Databases

APP_ROLE = "tracechain_app"
UINT256_MAX = 2**256 - 1
LIMIT_FLAGS = (None, "debits_must_not_exceed_credits", "credits_must_not_exceed_debits")

SMALL, HUGE = st.integers(1, 1_000), st.integers(2**255 - 10**6, 2**255 + 10**6)
AMOUNTS = st.one_of(SMALL, SMALL, SMALL, st.integers(1, 10**12), HUGE, st.just(UINT256_MAX))
TIMEOUTS = st.sampled_from([None, None, 3600, 86_400])
ACTIONS: tuple[Literal["post", "void", "expire"], ...] = ("post", "post", "void", "expire")


class _Target:
    """The database the machine runs against (one per test, set by the test function)."""

    engine: sa.Engine | None = None
    examples = itertools.count(1)
    # Which outcomes the run reached ("Resolve rejected pending_already_resolved": 3, ...).
    outcomes: Counter[str] = Counter()


# --- the model -------------------------------------------------------------------------


@dataclass
class ModelAccount:
    code: str
    asset: str
    kind: str
    flag: str | None
    closed: bool = False
    # [debits_posted, credits_posted, debits_pending, credits_pending]
    bal: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


@dataclass
class ModelEntry:
    command: Command
    # (kind, debit code, credit code, amount)
    transfers: list[tuple[str, str, str, int]]
    entry_id: int | None = None
    reversed: bool = False


@dataclass
class ModelHold:
    debit: str
    credit: str
    amount: int
    resolved: bool = False


class Rejected(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        engine = _Target.engine
        assert engine is not None, "run through test_the_engine_agrees_with_the_model"
        self.engine = engine
        self.poster = Poster(engine)
        n = next(_Target.examples)
        # Every example books under its own assets and codes on the shared test database.
        self.prefix = f"x{n}"
        self.assets = [f"M{n}A", f"M{n}B"]
        self.accounts: dict[str, ModelAccount] = {}
        self.entries: dict[str, ModelEntry] = {}
        self.holds: dict[str, ModelHold] = {}
        self.created: list[Command] = []
        self.keys = itertools.count(1)
        with engine.begin() as conn:
            for asset in self.assets:
                create_asset(conn, asset, 0)

    # --- setting up ----------------------------------------------------------------------

    @initialize(data=st.data())
    def open_first_accounts(self, data: st.DataObject) -> None:
        for asset in self.assets:
            # A source per asset that may go without limit, so that money can enter.
            self._open(asset, "equity", None)
            for _ in range(2):
                self._open(
                    asset, data.draw(st.sampled_from(ACCOUNT_KINDS)), data.draw(st.sampled_from(LIMIT_FLAGS))
                )

    def _open(self, asset: str, kind: str, flag: str | None) -> None:
        code = f"{self.prefix}:{asset}:{len(self.accounts)}"
        with self.engine.begin() as conn:
            _account, status = create_account(conn, code, asset, kind, [flag] if flag else [])
        assert status == "created"
        self.accounts[code] = ModelAccount(code, asset, kind, flag)

    @rule(asset=st.integers(0, 1), kind=st.sampled_from(ACCOUNT_KINDS), flag=st.sampled_from(LIMIT_FLAGS))
    def open_account(self, asset: int, kind: str, flag: str | None) -> None:
        if len(self.accounts) < 16:
            self._open(self.assets[asset], kind, flag)

    @rule(data=st.data())
    def close_or_reopen(self, data: st.DataObject) -> None:
        closed = sorted(c for c, a in self.accounts.items() if a.closed)
        # Reopen more often than close, so that most accounts stay usable.
        if closed and data.draw(st.integers(0, 2)) > 0:
            account = self.accounts[data.draw(st.sampled_from(closed))]
        else:
            account = self.accounts[data.draw(st.sampled_from(sorted(self.accounts)))]
        closing = not account.closed
        has_holds = account.bal[2] != 0 or account.bal[3] != 0
        with self.engine.begin() as conn:
            if closing and has_holds:
                with pytest.raises(Conflict) as info:
                    set_closed(conn, account.code, True)
                assert info.value.code == "open_holds"
                return
            after = set_closed(conn, account.code, closing)
        assert ("closed" in after.flags) == closing
        account.closed = closing

    # --- drawing commands ----------------------------------------------------------------

    def _key(self) -> str:
        return f"{self.prefix}:k{next(self.keys)}"

    def _draw_leg(self, data: st.DataObject, *, pending: bool) -> Leg:
        asset = data.draw(st.sampled_from(self.assets))
        same_asset = sorted(c for c, a in self.accounts.items() if a.asset == asset)
        debit = data.draw(st.sampled_from(same_asset))
        roll = data.draw(st.integers(0, 49))
        if roll == 0:
            credit = f"{self.prefix}:nobody"
        elif roll == 1:
            credit = data.draw(
                st.sampled_from(sorted(c for c, a in self.accounts.items() if a.asset != asset))
            )
        else:
            credit = data.draw(st.sampled_from([c for c in same_asset if c != debit]))
        other = next(a for a in self.assets if a != asset)
        named = data.draw(st.sampled_from([None] * 14 + [asset] * 4 + ["NOSUCH", other]))
        timeout = data.draw(TIMEOUTS) if pending else None
        return Leg(debit, credit, data.draw(AMOUNTS), asset=named, pending=pending, timeout_s=timeout)

    def _draw_entry(self, data: st.DataObject) -> Command:
        legs = tuple(self._draw_leg(data, pending=False) for _ in range(data.draw(st.integers(1, 3))))
        return NewEntry(self._key(), legs, kind=data.draw(st.sampled_from(["transfer", "fee"])))

    def _draw_hold(self, data: st.DataObject) -> Command:
        return NewEntry(self._key(), (self._draw_leg(data, pending=True),), kind="hold")

    def _draw_resolve(self, data: st.DataObject) -> Command:
        open_holds = sorted(k for k, h in self.holds.items() if not h.resolved)
        if not open_holds and data.draw(st.integers(0, 2)) > 0:
            return self._draw_hold(data)
        others = [*sorted(self.holds), *sorted(self.entries)[:3], f"{self.prefix}:no-hold"]
        if open_holds and data.draw(st.integers(0, 4)) > 0:
            pending_key = data.draw(st.sampled_from(open_holds))
        else:
            pending_key = data.draw(st.sampled_from(others))
        action = data.draw(st.sampled_from(ACTIONS))
        amount = None
        hold = self.holds.get(pending_key)
        if action == "post" and hold is not None and data.draw(st.booleans()):
            # Partial posts, the exact amount, and one unit more than held.
            amount = data.draw(
                st.integers(1, hold.amount)
                | st.sampled_from([hold.amount, min(hold.amount + 1, UINT256_MAX)])
            )
        return Resolve(self._key(), pending_key, action, amount)

    def _draw_reverse(self, data: st.DataObject) -> Command:
        posted = sorted(k for k, e in self.entries.items() if not e.reversed)
        if posted and data.draw(st.integers(0, 3)) > 0:
            return Reverse(self._key(), data.draw(st.sampled_from(posted)))
        return Reverse(
            self._key(), data.draw(st.sampled_from([*sorted(self.entries), f"{self.prefix}:none"]))
        )

    def _draw_again(self, data: st.DataObject) -> Command:
        if not self.created:
            return self._draw_entry(data)
        earlier = data.draw(st.sampled_from(self.created))
        if data.draw(st.booleans()):
            return earlier  # a retry: the same key and content
        return replace(earlier, metadata={"changed": True})  # the same key, other content

    def _draw_command(self, data: st.DataObject) -> Command:
        draw = data.draw(
            st.sampled_from(
                [
                    self._draw_entry,
                    self._draw_entry,
                    self._draw_hold,
                    self._draw_resolve,
                    self._draw_reverse,
                    self._draw_again,
                ]
            )
        )
        return draw(data)

    # --- what the engine must answer -----------------------------------------------------

    def _expect(self, command: Command) -> tuple[str, str | None]:
        """Predict the result of ``command`` and apply it to the model."""
        known = self.entries.get(command.key)
        if known is not None:
            if known.command.content_hash == command.content_hash:
                return "exists", None
            return "rejected", "idempotency_conflict"
        try:
            if isinstance(command, NewEntry):
                transfers = self._plan_new(command)
            elif isinstance(command, Resolve):
                transfers = self._plan_resolve(command)
            else:
                transfers = self._plan_reverse(command)
            self._apply(transfers)
        except Rejected as exc:
            return "rejected", exc.code
        self.entries[command.key] = ModelEntry(command, [(k, d, c, a) for k, d, c, a, _held in transfers])
        if isinstance(command, NewEntry) and command.legs[0].pending:
            leg = command.legs[0]
            self.holds[command.key] = ModelHold(leg.debit, leg.credit, leg.amount)
        elif isinstance(command, Resolve):
            self.holds[command.pending_key].resolved = True
        elif isinstance(command, Reverse):
            self.entries[command.entry_key].reversed = True
        self.created.append(command)
        return "created", None

    def _plan_new(self, command: NewEntry) -> list[tuple[str, str, str, int, int]]:
        out = []
        for leg in command.legs:
            debit, credit = self.accounts.get(leg.debit), self.accounts.get(leg.credit)
            if debit is None or credit is None:
                raise Rejected("unknown_account")
            if debit.asset != credit.asset:
                raise Rejected("asset_mismatch")
            if leg.asset is not None and leg.asset not in self.assets:
                raise Rejected("unknown_asset")
            if leg.asset is not None and leg.asset != debit.asset:
                raise Rejected("asset_mismatch")
            if debit.closed or credit.closed:
                raise Rejected("account_closed")
            out.append(("pending" if leg.pending else "posted", leg.debit, leg.credit, leg.amount, 0))
        return out

    def _plan_resolve(self, command: Resolve) -> list[tuple[str, str, str, int, int]]:
        hold = self.holds.get(command.pending_key)
        if hold is None:
            raise Rejected("not_a_hold" if command.pending_key in self.entries else "unknown_pending")
        if hold.resolved:
            raise Rejected("pending_already_resolved")
        if command.action == "expire":
            raise Rejected("pending_not_expired")  # timeouts here are an hour or more
        amount = hold.amount if command.amount is None else command.amount
        if amount > hold.amount:
            raise Rejected("exceeds_pending_amount")
        return [(command.kind, hold.debit, hold.credit, amount, hold.amount)]

    def _plan_reverse(self, command: Reverse) -> list[tuple[str, str, str, int, int]]:
        target = self.entries.get(command.entry_key)
        if target is None:
            raise Rejected("unknown_entry")
        if target.reversed:
            raise Rejected("already_reversed")
        out = []
        for kind, debit, credit, amount in target.transfers:
            if kind not in ("posted", "post_pending"):
                raise Rejected("not_reversible")
            if self.accounts[debit].closed or self.accounts[credit].closed:
                raise Rejected("account_closed")
            out.append(("posted", credit, debit, amount, 0))
        return out

    def _apply(self, transfers: list[tuple[str, str, str, int, int]]) -> None:
        touched: dict[str, list[int]] = {}
        for kind, debit, credit, amount, held in transfers:
            d = touched.setdefault(debit, list(self.accounts[debit].bal))
            c = touched.setdefault(credit, list(self.accounts[credit].bal))
            if kind in ("posted", "post_pending"):
                d[0] += amount
                c[1] += amount
            if kind == "pending":
                d[2] += amount
                c[3] += amount
            elif kind != "posted":
                d[2] -= held
                c[3] -= held
        for code, bal in touched.items():
            flag = self.accounts[code].flag
            if flag == "debits_must_not_exceed_credits" and bal[0] + bal[2] > bal[1]:
                raise Rejected("exceeds_credits")
            if flag == "credits_must_not_exceed_debits" and bal[1] + bal[3] > bal[0]:
                raise Rejected("exceeds_debits")
        for code, bal in touched.items():
            self.accounts[code].bal = bal

    # --- posting -------------------------------------------------------------------------

    def _post(self, commands: list[Command]) -> None:
        expected = [self._expect(c) for c in commands]
        self._compare(commands, expected, self.poster.post(commands))

    def _compare(
        self, commands: list[Command], expected: list[tuple[str, str | None]], results: list[EntryResult]
    ) -> None:
        assert [(r.key, r.status, r.code) for r in results] == [
            (c.key, status, code) for c, (status, code) in zip(commands, expected, strict=True)
        ], [r.reason for r in results]
        for command, result in zip(commands, results, strict=True):
            self._check_id(command, result)
            outcome = f"{type(command).__name__} {result.status} {result.code or ''}".strip()
            event(outcome)
            _Target.outcomes[outcome] += 1

    def _check_id(self, command: Command, result: EntryResult) -> None:
        entry = self.entries.get(command.key)
        if result.status == "rejected":
            assert result.entry_id is None
            return
        assert entry is not None and result.entry_id is not None
        if entry.entry_id is None:
            assert result.status == "created"
            entry.entry_id = result.entry_id
        else:
            assert result.entry_id == entry.entry_id, "exists must name the original entry"

    @rule(data=st.data())
    def post_an_entry(self, data: st.DataObject) -> None:
        self._post([self._draw_entry(data)])

    @rule(data=st.data())
    def place_a_hold(self, data: st.DataObject) -> None:
        self._post([self._draw_hold(data)])

    @rule(data=st.data())
    def resolve_a_hold(self, data: st.DataObject) -> None:
        self._post([self._draw_resolve(data)])

    @rule(data=st.data())
    def reverse_an_entry(self, data: st.DataObject) -> None:
        self._post([self._draw_reverse(data)])

    @rule(data=st.data())
    def send_a_key_again(self, data: st.DataObject) -> None:
        self._post([self._draw_again(data)])

    @rule(data=st.data(), size=st.integers(2, 6))
    def post_a_batch(self, data: st.DataObject, size: int) -> None:
        commands = [self._draw_command(data) for _ in range(size)]
        # Resolve and reverse what this very batch books, too.
        if data.draw(st.booleans()):
            fresh = [c for c in commands if isinstance(c, NewEntry) and c.key not in self.entries]
            if fresh:
                target = data.draw(st.sampled_from(fresh))
                if target.legs[0].pending:
                    commands.append(Resolve(self._key(), target.key, "post", None))
                else:
                    commands.append(Reverse(self._key(), target.key))
        self._post(commands)

    def _asset_of(self, command: Command) -> str | None:
        """The one asset whose accounts ``command`` can touch (None: it may touch both)."""
        codes: set[str] = set()
        if isinstance(command, NewEntry):
            codes = {code for leg in command.legs for code in (leg.debit, leg.credit)}
        else:
            ref = command.pending_key if isinstance(command, Resolve) else command.entry_key
            entry = self.entries.get(ref)
            if entry is not None:
                codes = {code for _kind, d, c, _amount in entry.transfers for code in (d, c)}
        assets = {self.accounts[c].asset for c in codes if c in self.accounts}
        return assets.pop() if len(assets) == 1 else (self.assets[0] if not assets else None)

    @rule(data=st.data(), size=st.integers(2, 8))
    def post_two_batches_at_once(self, data: st.DataObject, size: int) -> None:
        """One batch per asset from two threads: they share no account, so order cannot matter."""
        drawn = [self._draw_command(data) for _ in range(size)]
        keys = [c.key for c in drawn]
        groups: dict[str, list[Command]] = {asset: [] for asset in self.assets}
        for command in drawn:
            asset = self._asset_of(command)
            if asset is not None and keys.count(command.key) == 1:
                groups[asset].append(command)
        batches = [g for g in groups.values() if g]
        expected = [[self._expect(c) for c in batch] for batch in batches]
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(self.poster.post, batches))
        for batch, expect, got in zip(batches, expected, results, strict=True):
            self._compare(batch, expect, got)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def the_database_agrees_with_the_model(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT a.code, s.code, a.kind, a.debits_must_not_exceed_credits,"
                    " a.credits_must_not_exceed_debits, a.closed, a.debits_posted::text,"
                    " a.credits_posted::text, a.debits_pending::text, a.credits_pending::text"
                    " FROM ledger_accounts a JOIN ledger_assets s ON s.id = a.asset_id"
                    " WHERE starts_with(a.code, :prefix)"
                ),
                {"prefix": f"{self.prefix}:"},
            ).all()
            report = check_ledger(conn)
        stored: dict[str, Any] = {r[0]: r for r in rows}
        assert set(stored) == set(self.accounts)
        for code, account in self.accounts.items():
            row = stored[code]
            assert (row[1], row[2], row[5]) == (account.asset, account.kind, account.closed)
            assert (row[3], row[4]) == (
                account.flag == "debits_must_not_exceed_credits",
                account.flag == "credits_must_not_exceed_debits",
            )
            assert [int(v) for v in row[6:10]] == account.bal, code
            dp, cp, dq, cq = account.bal
            if account.flag == "debits_must_not_exceed_credits":
                assert dp + dq <= cp
            if account.flag == "credits_must_not_exceed_debits":
                assert cp + cq <= dp
            assert min(account.bal) >= 0
        for asset in self.assets:
            totals = [a.bal for a in self.accounts.values() if a.asset == asset]
            assert sum(b[0] for b in totals) == sum(b[1] for b in totals), "posted trial balance"
            assert sum(b[2] for b in totals) == sum(b[3] for b in totals), "pending trial balance"
            assert report["trial_balance"][asset]["balanced"]
        assert report["ok"], report["breaks"]
        open_holds = [h for k, h in self.holds.items() if not h.resolved]
        assert sum(h.amount for h in open_holds) == sum(a.bal[2] for a in self.accounts.values())


@pytest.fixture
def machine_db(databases: Databases, template_db: str) -> Iterator[sa.Engine]:
    """A database of the test's own for the machine, and an app-role engine on it."""
    name = databases.create(template=template_db)
    engine = db.make_engine(databases.url(name), role=APP_ROLE, pool_size=2)
    _Target.engine = engine
    _Target.outcomes.clear()
    try:
        yield engine
    finally:
        _Target.engine = None
        engine.dispose()
        databases.drop(name)


def test_the_engine_agrees_with_the_model(machine_db: sa.Engine) -> None:
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    with machine_db.connect() as conn:
        entries = conn.execute(sa.text("SELECT count(*) FROM ledger_entries")).scalar_one()
        report = check_ledger(conn)
    assert entries > 0, "the machine never booked anything"
    # The run must have reached the interesting paths, not only rejections of random input.
    reached = {outcome for outcome, count in _Target.outcomes.items() if count > 0}
    assert reached >= {
        "NewEntry created",
        "NewEntry exists",
        "NewEntry rejected idempotency_conflict",
        "NewEntry rejected exceeds_credits",
        "Resolve created",
        "Resolve rejected pending_already_resolved",
        "Reverse created",
    }, sorted(_Target.outcomes.items())
    assert report["ok"], report["breaks"]
