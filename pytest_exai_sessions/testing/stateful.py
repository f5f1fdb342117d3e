"""Crashes as a property: a Hypothesis state machine that crashes managers at random points.

``SessionCrashMachine`` drives several ``SessionManager`` replicas on one database (three by
default, ``replicas``) with random sequences of create, get, update, compare-and-set
update, merge_data, update_activity, request, remove and cleanup, each through a replica
Hypothesis picks, interleaved with crashes of one replica (``crash_and_restart``), of the
database (SIGKILL or immediate shutdown of the postmaster, then a restart) and, when the
machine's clock can be moved, time passing beyond the session timeout. A plain-Python
``SessionModel`` keeps what the managers acknowledged; every returned session is checked
against it, field for field and ``version`` exactly. After every step the rows of
``public.sessions`` must equal it, and so must what every replica serves (``get`` of each
id, ``list_ids``); after every crash, the recovered sessions too. When a sequence fails,
Hypothesis shrinks it to a short one and prints it.

Run it from a synchronous pytest test (the machine owns its event loop)::

    from pytest_exai_sessions.testing.stateful import SessionCrashMachine, run_crash_machine

    class MyCrashMachine(SessionCrashMachine):
        manager_class = MyManager                      # your SessionManager subclass
        manager_options = {"max_concurrent_sessions": 3}

    def test_my_manager_survives_crashes(exai_dsn, exai_pg_server, exai_db_clock):
        run_crash_machine(MyCrashMachine, exai_dsn, exai_pg_server, clock=exai_db_clock)

This module needs Hypothesis (``pip install "pytest-exai-sessions[stateful]"``); the rest
of the package does not import it.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar, cast

import hypothesis
import psycopg
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ..clock import SYSTEM_CLOCK, Clock, ManualClock
from ..errors import PersistenceError, SessionConflict, SessionLimitExceeded, SessionNotFound
from ..manager import SessionManager
from ..models import MAX_DURATION_MS, Session, SessionState, UserType, check_ip_address
from ..server.cluster import TemporaryPostgres
from ..server.connection import PostgresServer
from ..server.power_loss import PowerLossPostgres
from ..store import SessionStore
from .crash import CrashHarness
from .recovery import compare_snapshots

T = TypeVar("T")

# The fields the model predicts exactly. created_at and last_activity are the managers'
# clock: the model takes them from each acknowledgement and checks they move sensibly.
PREDICTED_FIELDS = (
    "state",
    "user_id",
    "user_type",
    "ip_address",
    "user_agent",
    "data",
    "metadata",
    "request_count",
    "total_duration_ms",
    "expires_at",
    "version",
)
_SETTABLE_FIELDS = frozenset(PREDICTED_FIELDS) - {"request_count", "total_duration_ms", "version"}
# The model assumes nothing times out unless the machine moves the clock past the timeout;
# with the real time, a shorter timeout could end sessions in the middle of a run.
MIN_SESSION_TIMEOUT_SECS = 600


# The reference model


@dataclass
class ModelSession:
    """One row of ``public.sessions`` as the model expects it."""

    session_id: str
    state: SessionState = SessionState.ACTIVE
    user_id: str | None = None
    user_type: UserType = UserType.HUMAN
    ip_address: str | None = None
    user_agent: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    request_count: int = 0
    total_duration_ms: int = 0
    expires_at: datetime | None = None
    version: int = 1
    # Still marked active in the table, but idle past the timeout: no longer live, until
    # cleanup marks it expired or ensure() restarts the id.
    timed_out: bool = False
    # Not predicted: taken from the acknowledgement (the Session the manager returned).
    created_at: datetime | None = None
    last_activity: datetime | None = None

    @property
    def live(self) -> bool:
        return self.state is SessionState.ACTIVE and not self.timed_out

    def to_session(self) -> Session:
        """The ``Session`` a manager should hold for this row (it must have been acknowledged)."""
        if self.created_at is None or self.last_activity is None:
            raise ValueError(f"session {self.session_id!r} was never acknowledged: its timestamps are unknown")
        values = {name: getattr(self, name) for name in PREDICTED_FIELDS}
        return Session(
            session_id=self.session_id, created_at=self.created_at, last_activity=self.last_activity, **values
        )


def _normalise(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The given fields as a stored row holds them; None means "not given"."""
    unknown = set(attrs) - _SETTABLE_FIELDS
    if unknown:
        raise TypeError(f"the model cannot set {sorted(unknown)}; settable: {sorted(_SETTABLE_FIELDS)}")
    given = {name: value for name, value in attrs.items() if value is not None}
    for name in ("data", "metadata"):
        if name in given:
            given[name] = copy.deepcopy(given[name])  # the caller's dict may change later; the row does not
    if "user_type" in given:
        given["user_type"] = UserType(given["user_type"])
    if "state" in given:
        given["state"] = SessionState(given["state"])
    if "ip_address" in given:
        given["ip_address"] = check_ip_address(given["ip_address"])  # "2001:DB8::1" is stored as "2001:db8::1"
    if "expires_at" in given:
        given["expires_at"] = given["expires_at"].astimezone(UTC)
    return given


class SessionModel:
    """What a manager acknowledged, in plain Python: the contract a crash must not break.

    ``rows`` holds every row ``public.sessions`` should have, by id, also those no longer
    live (updated to state inactive or expired, or timed out). The contract of
    ``SessionManager``, the same through every replica on the database: ``ensure`` creates
    a session or returns the live one unchanged (over ``max_concurrent_sessions`` live
    sessions in the whole database it raises ``SessionLimitExceeded``); ``update`` replaces
    the given fields, and with ``expected_version`` only at that version (else
    ``SessionConflict``, nothing written); ``merge_data`` merges top-level keys into
    ``data``; ``update_activity`` and a request count one request and add its duration;
    ``remove`` deletes; calls on an id with no live session raise ``SessionNotFound``.
    Every write adds 1 to ``version`` (1 at creation; restarting a dead row goes on from
    its version). Sessions time out only when the machine says so (``time_passes``: every
    live one, since the clock moves past the timeout); ``cleanup`` then marks them expired.
    ``expires_at`` is far ahead, so it never ends a session.

    Subclass it when your manager adds behaviour (see ``examples/test_stateful_crashes.py``).
    """

    def __init__(self, *, max_concurrent_sessions: int | None = None) -> None:
        self.max_concurrent_sessions = max_concurrent_sessions
        self.rows: dict[str, ModelSession] = {}

    # queries

    def live(self) -> dict[str, ModelSession]:
        return {sid: row for sid, row in self.rows.items() if row.live}

    def is_live(self, session_id: str) -> bool:
        row = self.rows.get(session_id)
        return row is not None and row.live

    def _require_live(self, session_id: str) -> ModelSession:
        row = self.rows.get(session_id)
        if row is None or not row.live:
            raise SessionNotFound(session_id)
        return row

    # operations, predicted

    def ensure(self, session_id: str, **attrs: Any) -> ModelSession:
        """The live session, unchanged; else a new one with ``attrs`` (replacing a dead row)."""
        previous = self.rows.get(session_id)
        if previous is not None and previous.live:
            return previous
        limit = self.max_concurrent_sessions
        if limit is not None and len(self.live()) >= limit:
            raise SessionLimitExceeded(limit)
        row = ModelSession(session_id, **_normalise(attrs))
        if previous is not None:
            # A restarted id goes on from the old row's version, so a stale compare-and-set misses it.
            row.version = previous.version + 1
        self.rows[session_id] = row
        return row

    def get(self, session_id: str) -> ModelSession | None:
        row = self.rows.get(session_id)
        return row if row is not None and row.live else None

    def update(self, session_id: str, *, expected_version: int | None = None, **changes: Any) -> ModelSession:
        row = self._require_live(session_id)
        if expected_version is not None and expected_version != row.version:
            raise SessionConflict(session_id, expected_version=expected_version, current_version=row.version)
        for name, value in _normalise(changes).items():
            setattr(row, name, value)
        row.version += 1  # also with no field given: last_activity is still written
        return row

    def merge_data(self, session_id: str, patch: Mapping[str, Any]) -> ModelSession:
        row = self._require_live(session_id)
        row.data = {**row.data, **copy.deepcopy(dict(patch))}
        row.version += 1
        return row

    def update_activity(self, session_id: str, duration_ms: int | None = None) -> ModelSession:
        row = self._require_live(session_id)
        row.request_count += 1
        row.total_duration_ms += duration_ms or 0
        row.version += 1
        return row

    def request(self, session_id: str, duration_ms: int) -> ModelSession:
        """A request counts as ``update_activity`` with the duration the manager measured."""
        return self.update_activity(session_id, duration_ms)

    def remove(self, session_id: str) -> None:
        self.rows.pop(session_id, None)

    def time_passes(self) -> None:
        """The clock moved past the timeout: every live session is now timed out."""
        for row in self.live().values():
            row.timed_out = True

    def cleanup(self) -> int:
        """Mark every timed-out session still marked active expired; return how many."""
        stale = [row for row in self.rows.values() if row.state is SessionState.ACTIVE and row.timed_out]
        for row in stale:
            row.state = SessionState.EXPIRED
            row.version += 1
        return len(stale)

    # checks

    def acknowledge(self, session: Session, *, touched: bool = True) -> None:
        """Check a session the manager returned against the prediction; then take its timestamps.

        ``touched=False`` for a call that wrote nothing (``ensure`` of a live session,
        ``get``): its timestamps must not have moved at all.
        """
        session_id = session.session_id
        row = self.rows.get(session_id)
        if row is None:
            raise AssertionError(f"session {session_id!r}: the manager returned it, the model has no such session")
        problems = [
            f"{name}: model={getattr(row, name)!r} manager={getattr(session, name)!r}"
            for name in PREDICTED_FIELDS
            if getattr(row, name) != getattr(session, name)
        ]
        if session.created_at > session.last_activity:
            problems.append(f"created_at {session.created_at} is after last_activity {session.last_activity}")
        if row.created_at is not None and row.last_activity is not None:
            # The same session as acknowledged before: created_at stays, last_activity never goes back.
            if session.created_at != row.created_at:
                problems.append(f"created_at moved from {row.created_at} to {session.created_at}")
            if touched and session.last_activity < row.last_activity:
                problems.append(f"last_activity went back from {row.last_activity} to {session.last_activity}")
            if not touched and session.last_activity != row.last_activity:
                problems.append(
                    f"last_activity moved from {row.last_activity} to {session.last_activity} "
                    "though nothing was written"
                )
        if problems:
            raise AssertionError(
                f"session {session_id!r} as acknowledged differs from the model: " + "; ".join(problems)
            )
        row.created_at = session.created_at
        row.last_activity = session.last_activity

    def expected_sessions(self) -> dict[str, Session]:
        """The live sessions every manager should serve (also after a recovery)."""
        return {sid: row.to_session() for sid, row in self.live().items()}

    def expected_rows(self) -> dict[str, Session]:
        """Every row ``public.sessions`` should hold, live or not."""
        return {sid: row.to_session() for sid, row in self.rows.items()}

    def assert_sessions(self, actual: Mapping[str, Session], what: str) -> None:
        """``actual`` (e.g. a manager's ``live_sessions()``) must equal the model's live sessions, field for field."""
        _assert_same(self.expected_sessions(), actual, what)

    def assert_rows(self, actual: Mapping[str, Session], what: str) -> None:
        """``actual`` (every row of ``public.sessions``, by id) must equal the model's rows, field for field."""
        _assert_same(self.expected_rows(), actual, what)


def _assert_same(expected: Mapping[str, Session], actual: Mapping[str, Session], what: str) -> None:
    diff = compare_snapshots(expected, actual)
    if diff:
        raise AssertionError(f"{what} differs from the model: {diff.summary()}\n" + "\n".join(diff.lines()))


# Strategies: small, valid, and quick to shrink.

# Few ids, so that operations meet existing, removed and missing sessions alike.
SESSION_IDS = ("s1", "s2", "ümlaut-ß", "x'); DROP TABLE sessions;--")
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)

_text_chars = st.characters(codec="utf-8", exclude_characters="\x00")
session_ids = st.sampled_from(SESSION_IDS)
# What jsonb stores and gives back unchanged: no NUL, str keys, finite floats written
# without an exponent (below 1e16), ints within the exact range of a double.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_infinity=False)
    | st.text(_text_chars, max_size=12)
)
json_keys = st.text(_text_chars, max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(json_keys, children, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(json_keys, json_values, max_size=4)
user_ids = st.sampled_from(["u1", "u2", "'; DELETE FROM sessions; --"])
user_types = st.sampled_from([t.value for t in UserType])
ip_addresses = st.sampled_from(["203.0.113.7", "2001:DB8::1", "::ffff:192.0.2.1", "0.0.0.0"])
user_agents = st.text(_text_chars, max_size=20)
states = st.sampled_from([s.value for s in SessionState])
durations = st.integers(min_value=0, max_value=10_000) | st.just(MAX_DURATION_MS)


def _maybe(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.none() | strategy


# What create (ensure) and update are called with; None means "not given".
maybe_data = _maybe(json_objects)
maybe_user_id = _maybe(user_ids)
maybe_user_type = _maybe(user_types)
maybe_ip_address = _maybe(ip_addresses)
maybe_user_agent = _maybe(user_agents)
maybe_expires_at = _maybe(st.just(FAR_FUTURE))


def _live_or_any_session_id(machine: SessionCrashMachine) -> st.SearchStrategy[str]:
    live = sorted(machine.model.live())
    return st.sampled_from(live) | session_ids if live else session_ids


# For the rules that act on a session: half of the time one that is live now, since with
# the ids drawn alike most calls would meet none and only raise SessionNotFound.
live_or_any_session_ids = st.runner().flatmap(_live_or_any_session_id)

# Which replica acts: an index into the machine's managers. Drawn from the running machine,
# so that a subclass's ``replicas`` applies; it shrinks towards the first replica.
replica_indexes = st.runner().flatmap(lambda machine: st.integers(min_value=0, max_value=machine.replicas - 1))


async def _handle_request(manager: SessionManager, session_id: str) -> Session:
    async with manager.request(session_id):
        pass
    session = await manager.get(session_id)
    assert session is not None, f"session {session_id!r} vanished after its request"
    return session


async def _wait_for_all(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


# The state machine


class SessionCrashMachine(RuleBasedStateMachine):
    """Random operations and crashes against several managers on one database, checked against ``SessionModel``.

    Configure a subclass with the class attributes below, or override the hooks
    ``make_manager``, ``restart_manager``, ``make_model`` and ``reset_database``; run it
    with ``run_crash_machine``. Each example starts from an empty ``public.sessions``.
    Every rule acts through one of ``replicas`` managers (``replica``, an index Hypothesis
    draws), all built by ``make_manager`` with the same class and options, so that the
    model is one for them all. Rules and hooks run on the main thread, in an event loop the
    machine owns, so the database crash helpers (which block) can run there too. A subclass
    may add rules of its own (``@rule()``); overriding a rule method without the decorator
    removes that rule.
    """

    # The manager under test: its class and options (defaults for the rest).
    manager_class: ClassVar[type[SessionManager]] = SessionManager
    manager_options: ClassVar[Mapping[str, Any]] = {}
    model_class: ClassVar[type[SessionModel]] = SessionModel
    # How many managers share the database, as replicas of one service would. Each rule
    # acts through one of them; 1 tests a single manager, as before replicas existed.
    replicas: ClassVar[int] = 3
    # Also kill the database (needs the plugin's temporary server; skipped otherwise), at most
    # this many times per example: each costs a server restart, and shrinking replays many.
    database_crashes: ClassVar[bool] = True
    max_database_crashes: ClassVar[int] = 2
    # On a server whose disk can lose power (the power_loss_harness fixture's), also cut its
    # power: all that was not durable is gone. At most this many times per example.
    power_cuts: ClassVar[bool] = True
    max_power_cuts: ClassVar[int] = 2
    # Move the clock past the session timeout (when it is a ManualClock, e.g. exai_db_clock),
    # so that sessions time out and cleanup has something to expire; at most this many times
    # per example, since each ends every live session and most rules want one.
    time_jumps: ClassVar[bool] = True
    max_time_jumps: ClassVar[int] = 1
    # A run of modest size: well under a minute against the temporary server. Sequences of
    # 20 steps, since a write through one replica and a stale read through another take more
    # steps to meet than calls on one manager did.
    max_examples: ClassVar[int] = 15
    stateful_step_count: ClassVar[int] = 20
    # Set by run_crash_machine; or set them on a subclass and use its TestCase.
    dsn: ClassVar[str | None] = None
    server: ClassVar[PostgresServer | None] = None
    clock: ClassVar[Clock] = SYSTEM_CLOCK  # the managers' (e.g. the exai_db_clock fixture)

    def __init__(self) -> None:
        super().__init__()
        if self.dsn is None:
            raise TypeError(f"{type(self).__name__}.dsn is not set: run it with run_crash_machine(cls, dsn, server)")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"{type(self).__name__}.replicas must be a whole number >= 1, got {self.replicas!r}")
        self.loop = asyncio.new_event_loop()
        self.harness: CrashHarness | None = None
        self._admin_conn: psycopg.Connection[Any] | None = None
        self._rows_store: SessionStore | None = None
        self.database_crash_count = 0
        self.power_cut_count = 0
        self.time_jump_count = 0
        self.managers: list[SessionManager] = []
        try:
            self._rows_store = self.run(SessionStore.open(self.dsn))
            self.reset_database(self.admin())
            self.harness = CrashHarness(self.dsn, self.server, clock=self.clock)
            for _ in range(self.replicas):
                self.managers.append(self.run(self.make_manager()))
            self.model = self.make_model(self.managers[0])
        except BaseException:
            self._shut_down()
            raise

    @property
    def manager(self) -> SessionManager:
        """The first replica (what a machine with one manager used)."""
        return self.managers[0]

    @classmethod
    def hypothesis_settings(cls) -> hypothesis.settings:
        """The settings ``run_crash_machine`` uses unless given others (built from the active profile)."""
        return hypothesis.settings(
            max_examples=cls.max_examples,
            stateful_step_count=cls.stateful_step_count,
            deadline=None,
            # One bug often fails in several places; shrink one failure, to the shortest sequence.
            report_multiple_bugs=False,
            # The explain phase reruns the shrunk example hundreds of times, each with its own
            # database work, to say which lines only failing runs reached: not worth minutes here.
            phases=[phase for phase in hypothesis.settings().phases if phase is not hypothesis.Phase.explain],
        )

    # hooks

    def reset_database(self, conn: psycopg.Connection[Any]) -> None:
        """Make each example start from nothing (extend it, on ``conn``, if your app keeps more tables)."""
        assert self._rows_store is not None
        self.run(self._rows_store.delete_all())

    async def make_manager(self) -> SessionManager:
        """A started manager on the machine's database: each replica, and fresh views after a crash."""
        assert self.harness is not None
        return await self.harness.new_manager(self.manager_class, **self.manager_options)

    async def restart_manager(self, manager: SessionManager) -> SessionManager:
        """Crash ``manager`` as a killed process would and recover in a new one."""
        assert self.harness is not None
        return await self.harness.crash_and_restart(manager)

    def make_model(self, manager: SessionManager) -> SessionModel:
        """The model of every replica (all have ``manager``'s options)."""
        if manager.session_timeout_secs < MIN_SESSION_TIMEOUT_SECS:
            raise ValueError(
                f"session_timeout_secs={manager.session_timeout_secs} is too short for the model, which assumes "
                f"nothing times out unless the machine moves the clock; use at least {MIN_SESSION_TIMEOUT_SECS}"
            )
        return self.model_class(max_concurrent_sessions=manager.max_concurrent_sessions)

    # plumbing

    def admin(self) -> psycopg.Connection[Any]:
        """The machine's own autocommit connection (resets, checks), reopened after a database crash."""
        conn = self._admin_conn
        if conn is None or conn.closed or conn.broken:
            conn = self._admin_conn = psycopg.connect(self.dsn or "", autocommit=True)
        return conn

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run a coroutine of the manager to completion in the machine's event loop."""

        async def wrapped() -> T:
            return await awaitable

        return self.loop.run_until_complete(wrapped())

    def _expect_error(self, error: Exception, awaitable: Awaitable[Any], call: str) -> Exception:
        """The model predicted ``error``: the manager must raise the same kind; return what it raised.

        That the failed call wrote nothing, the invariants check after the step.
        """
        try:
            result = self.run(awaitable)
        except type(error) as raised:
            return raised
        raise AssertionError(f"{call}: the model predicted {type(error).__name__}, the manager returned {result!r}")

    def teardown(self) -> None:
        self._shut_down()

    def _shut_down(self) -> None:
        loop = self.loop
        if self._admin_conn is not None:
            self._admin_conn.close()
        try:
            if self._rows_store is not None:
                loop.run_until_complete(self._rows_store.close())
            if self.harness is not None:
                loop.run_until_complete(self.harness.aclose())
        finally:
            # What a crash abandoned (pool workers, cancelled tasks) finishes here, not in a closed loop.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(_wait_for_all(pending))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def check_database(self, what: str) -> None:
        self.model.assert_rows(self.run(self._stored_rows()), f"public.sessions {what}")

    async def _stored_rows(self) -> dict[str, Session]:
        """Every row of ``public.sessions`` by id, read through the store: a row that is no valid session fails."""
        assert self._rows_store is not None
        try:
            return {session.session_id: session async for session in self._rows_store.iter_all()}
        except PersistenceError as error:
            raise AssertionError(f"public.sessions holds a corrupt row: {error}") from error

    async def _served(self, manager: SessionManager) -> tuple[dict[str, Session], list[str]]:
        """What ``manager`` serves: ``get`` of every id the machine uses, and ``list_ids``."""
        served: dict[str, Session] = {}
        for session_id in SESSION_IDS:
            session = await manager.get(session_id)
            if session is not None:
                served[session_id] = session
        return served, await manager.list_ids()

    async def _served_by_every_replica(self) -> list[tuple[dict[str, Session], list[str]]]:
        return await asyncio.gather(*(self._served(manager) for manager in self.managers))

    async def _first_reads_after_a_restart(
        self,
    ) -> tuple[dict[str, Session], list[tuple[dict[str, Session], list[str]]]]:
        return await asyncio.gather(self._stored_rows(), self._served_by_every_replica())

    # operations

    @initialize(
        replica=replica_indexes,
        session_id=session_ids,
        data=maybe_data,
        metadata=maybe_data,
        user_id=maybe_user_id,
        user_type=maybe_user_type,
        ip_address=maybe_ip_address,
        user_agent=maybe_user_agent,
        expires_at=maybe_expires_at,
    )
    def first_session(self, replica: int, session_id: str, **attrs: Any) -> None:
        """Every example starts with a session, so that most operations find one."""
        self.create(replica, session_id, **attrs)

    @rule(
        replica=replica_indexes,
        session_id=session_ids,
        data=maybe_data,
        metadata=maybe_data,
        user_id=maybe_user_id,
        user_type=maybe_user_type,
        ip_address=maybe_ip_address,
        user_agent=maybe_user_agent,
        expires_at=maybe_expires_at,
    )
    def create(self, replica: int, session_id: str, **attrs: Any) -> None:
        manager = self.managers[replica]
        attrs = {name: value for name, value in attrs.items() if value is not None}
        existed = self.model.is_live(session_id)
        try:
            self.model.ensure(session_id, **attrs)
        except SessionLimitExceeded as error:
            self._expect_error(error, manager.ensure(session_id, **attrs), f"ensure({session_id!r})")
            return
        self.model.acknowledge(self.run(manager.ensure(session_id, **attrs)), touched=not existed)

    @rule(replica=replica_indexes, session_id=live_or_any_session_ids)
    def get(self, replica: int, session_id: str) -> None:
        session = self.run(self.managers[replica].get(session_id))
        if self.model.get(session_id) is None:
            assert session is None, (
                f"get({session_id!r}) through replica {replica}: the model has no live session, "
                f"the manager returned {session!r}"
            )
            return
        assert session is not None, f"get({session_id!r}) through replica {replica}: the manager lost the live session"
        self.model.acknowledge(session, touched=False)

    @rule(replica=replica_indexes, session_id=live_or_any_session_ids, duration_ms=_maybe(durations))
    def update_activity(self, replica: int, session_id: str, duration_ms: int | None) -> None:
        manager = self.managers[replica]
        try:
            self.model.update_activity(session_id, duration_ms)
        except SessionNotFound as error:
            call = manager.update_activity(session_id, request_duration_ms=duration_ms)
            self._expect_error(error, call, f"update_activity({session_id!r})")
            return
        self.model.acknowledge(self.run(manager.update_activity(session_id, request_duration_ms=duration_ms)))

    @rule(
        replica=replica_indexes,
        session_id=live_or_any_session_ids,
        data=maybe_data,
        metadata=maybe_data,
        user_id=maybe_user_id,
        user_type=maybe_user_type,
        ip_address=maybe_ip_address,
        user_agent=maybe_user_agent,
        expires_at=maybe_expires_at,
        state=_maybe(states),
    )
    def update(self, replica: int, session_id: str, **changes: Any) -> None:
        manager = self.managers[replica]
        try:
            self.model.update(session_id, **changes)
        except SessionNotFound as error:
            self._expect_error(error, manager.update(session_id, **changes), f"update({session_id!r})")
            return
        self.model.acknowledge(self.run(manager.update(session_id, **changes)))

    @rule(
        replica=replica_indexes,
        session_id=live_or_any_session_ids,
        data=maybe_data,
        state=_maybe(states),
        stale=st.booleans(),
    )
    def compare_and_set(
        self, replica: int, session_id: str, data: dict[str, Any] | None, state: str | None, stale: bool
    ) -> None:
        """``update(expected_version=...)``: the current version writes, a stale one raises and writes nothing."""
        manager = self.managers[replica]
        row = self.model.get(session_id)
        if row is None:
            call = manager.update(session_id, data=data, state=state, expected_version=1)
            self._expect_error(SessionNotFound(session_id), call, f"update({session_id!r}, expected_version=1)")
            return
        # A stale read is usually older; at version 1 there is none, so a version not reached yet.
        expected = (row.version - 1 if row.version > 1 else row.version + 1) if stale else row.version
        call_text = f"update({session_id!r}, expected_version={expected})"
        try:
            self.model.update(session_id, data=data, state=state, expected_version=expected)
        except SessionConflict as predicted:
            raised = self._expect_error(
                predicted, manager.update(session_id, data=data, state=state, expected_version=expected), call_text
            )
            assert isinstance(raised, SessionConflict)
            got = (raised.expected_version, raised.current_version)
            want = (predicted.expected_version, predicted.current_version)
            assert got == want, f"{call_text}: SessionConflict(expected, current) is {got}, the model says {want}"
            return
        self.model.acknowledge(self.run(manager.update(session_id, data=data, state=state, expected_version=expected)))

    @rule(replica=replica_indexes, session_id=live_or_any_session_ids, patch=json_objects)
    def merge_data(self, replica: int, session_id: str, patch: dict[str, Any]) -> None:
        manager = self.managers[replica]
        try:
            self.model.merge_data(session_id, patch)
        except SessionNotFound as error:
            self._expect_error(error, manager.merge_data(session_id, patch), f"merge_data({session_id!r})")
            return
        self.model.acknowledge(self.run(manager.merge_data(session_id, patch)))

    @rule(replica=replica_indexes, session_id=live_or_any_session_ids)
    def remove(self, replica: int, session_id: str) -> None:
        self.run(self.managers[replica].remove(session_id))
        self.model.remove(session_id)

    @rule(replica=replica_indexes, session_id=live_or_any_session_ids)
    def request(self, replica: int, session_id: str) -> None:
        manager = self.managers[replica]
        before = self.model.get(session_id)
        if before is None:
            call = _handle_request(manager, session_id)
            self._expect_error(SessionNotFound(session_id), call, f"request({session_id!r})")
            return
        counted_before = before.total_duration_ms
        started = time.monotonic()
        session = self.run(_handle_request(manager, session_id))
        elapsed_ms = (time.monotonic() - started) * 1000
        # The manager measures the duration itself: take it from the acknowledgement, within reason.
        duration = session.total_duration_ms - counted_before
        assert 0 <= duration <= elapsed_ms + 1, (
            f"request({session_id!r}) added {duration} ms to total_duration_ms, but took {elapsed_ms:.1f} ms"
        )
        self.model.request(session_id, duration)
        self.model.acknowledge(session)

    @rule(replica=replica_indexes)
    def cleanup(self, replica: int) -> None:
        expired = self.run(self.managers[replica].cleanup_stale_sessions())
        predicted = self.model.cleanup()
        assert expired == predicted, (
            f"cleanup through replica {replica} expired {expired} sessions; the model {predicted}"
        )

    def _clock_can_move(self) -> bool:
        return self.time_jumps and isinstance(self.clock, ManualClock) and self.time_jump_count < self.max_time_jumps

    @precondition(_clock_can_move)
    @rule()
    def time_passes_beyond_the_timeout(self) -> None:
        """Move the managers' clock (and the database's, for a DbClock) past the session timeout."""
        assert isinstance(self.clock, ManualClock)
        self.time_jump_count += 1
        # Every replica has the same options, so one timeout ends every live session at once.
        self.clock.advance(seconds=self.manager.session_timeout_secs + 1)
        self.model.time_passes()

    # crashes

    @rule(replica=replica_indexes)
    def crash_and_restart(self, replica: int) -> None:
        # restart_manager ends the old manager's backends on the server (CrashHarness.abandon).
        self.managers[replica] = restarted = self.run(self.restart_manager(self.managers[replica]))
        self.model.assert_sessions(restarted.live_sessions(), f"replica {replica} recovered after crash_and_restart")
        self.check_database(f"after crash_and_restart of replica {replica}")

    def _can_crash_database(self) -> bool:
        return (
            self.database_crashes
            and isinstance(self.server, TemporaryPostgres)
            and self.database_crash_count < self.max_database_crashes
        )

    @precondition(_can_crash_database)
    @rule(mode=st.sampled_from(["kill", "immediate"]))
    def crash_database(self, mode: Literal["kill", "immediate"]) -> None:
        assert self.harness is not None
        self.database_crash_count += 1
        self.harness.crash_database(mode)
        self._check_after_the_server_came_back(f"after a database crash ({mode}) and restart")

    def _can_cut_power(self) -> bool:
        return (
            self.power_cuts
            and isinstance(self.server, PowerLossPostgres)
            and self.power_cut_count < self.max_power_cuts
        )

    @precondition(_can_cut_power)
    @rule()
    def cut_power(self) -> None:
        """Every write the replicas had acknowledged must survive the cut; nothing else may appear."""
        assert self.harness is not None
        self.power_cut_count += 1
        self.harness.cut_power()
        self._check_after_the_server_came_back("after a power cut")

    def _check_after_the_server_came_back(self, what: str) -> None:
        if self._admin_conn is not None:
            self._admin_conn.close()  # it died with the server
        # The first call through each pool after a restart may wait for it to reconnect:
        # wait for all of them at once. The running replicas keep what was committed.
        rows, everything_served = self.run(self._first_reads_after_a_restart())
        self.model.assert_rows(rows, f"public.sessions {what}")
        self._assert_served(everything_served, what)
        fresh = self.run(self.make_manager())
        try:
            self.model.assert_sessions(fresh.live_sessions(), f"a new manager's recovery {what}")
        finally:
            self.run(fresh.aclose())

    # invariants

    @invariant()
    def every_replica_serves_the_model(self) -> None:
        self._assert_served(self.run(self._served_by_every_replica()), "after the step")

    def _assert_served(self, everything_served: list[tuple[dict[str, Session], list[str]]], when: str) -> None:
        expected_ids = sorted(self.model.live())
        for replica, (served, listed) in enumerate(everything_served):
            self.model.assert_sessions(served, f"get() of every id through replica {replica} {when}")
            assert listed == expected_ids, (
                f"list_ids() through replica {replica} {when} is {listed}, the model {expected_ids}"
            )


def run_crash_machine(
    machine_class: type[SessionCrashMachine],
    dsn: str,
    server: PostgresServer | None = None,
    *,
    settings: hypothesis.settings | None = None,
    clock: Clock | None = None,
) -> None:
    """Run ``machine_class`` on the database ``dsn`` (e.g. the ``exai_dsn`` fixture).

    ``server`` (the ``exai_pg_server`` fixture) enables the database crashes when it is the
    plugin's temporary server. ``settings`` default to ``machine_class.hypothesis_settings()``.
    ``clock``: the managers' clock (pass the ``exai_db_clock`` fixture, so that they and the
    database read one time); default: the machine class's, the real time.
    Call it from a synchronous test: the machine runs its own event loop. A failure raises
    the error with the shrunk sequence of steps that caused it.
    """
    # A subclass bound to the database, under the same name, so that Hypothesis prints
    # "state = MyCrashMachine()" and keeps its examples apart from other machines'.
    bound = type(
        machine_class.__name__,
        (machine_class,),
        {
            "__module__": machine_class.__module__,
            "__qualname__": machine_class.__qualname__,
            "__doc__": machine_class.__doc__,
            "dsn": dsn,
            "server": server,
            "clock": clock or machine_class.clock,
        },
    )
    run_state_machine_as_test(
        cast("type[SessionCrashMachine]", bound), settings=settings or machine_class.hypothesis_settings()
    )
