"""Database: the connection layer both stores use.

One pool per database, and what every call needs from it: a bounded wait for a
connection and for each answer, connections the server closed replaced before use, a
fresh pool once the server is back after an outage (or, behind a DSN that names several
hosts, once another one is the primary), and every driver or pool failure turned into
``PersistenceError`` naming what was attempted. It knows no table: the SQL lives in the stores.

What a failure says of a write:

- refused before anything was sent (no connection, the pool timed out, the server is down),
  or rejected by the server with an error (a constraint, a read-only server, a cancelled
  statement, a serialization failure): the statement or its transaction was rolled back, so
  ``PersistenceError``, and nothing was written;
- the answer lost after it was sent (the connection broke, the backend was terminated or the
  server crashed, the deadline cut the connection off): ``CommitUncertain``, as it is when
  the statement succeeded but its COMMIT's wait for a synchronous standby was cancelled (the
  server then warns, and answers with success): committed here, maybe on no standby.

A read has no effect to be unsure of: its failures are all ``PersistenceError``
(``writes=False``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import select
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Self, TypedDict, TypeVar, Unpack

import psycopg
from psycopg import sql
from psycopg.rows import RowFactory, TupleRow, tuple_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .deadline import CANCEL_TIMEOUT, Deadline
from .errors import CommitUncertain, PersistenceError

# The one environment variable that names the database, for the CLI, compat and the plugin.
DSN_ENV = "EXAI_SESSIONS_DSN"

logger = logging.getLogger(__name__)

# InvalidSqlStatementName, DuplicatePreparedStatement: what psycopg's prepared statements
# raise when consecutive transactions of one connection run on different server connections.
_PREPARED_STATEMENT_ERRORS = frozenset({"26000", "42P05"})
# ProtocolViolation, when the other server connection has a statement of that name with
# another number of parameters: 'bind message supplies 4 parameters, but prepared statement
# "_pg3_0" requires 3'. Other protocol violations are not about prepared statements.
_PROTOCOL_VIOLATION = "08P01"
# AdminShutdown, CrashShutdown, CannotConnectNow: the backend was ended (or the server is
# stopping) while the statement ran, maybe during its COMMIT: its outcome is unknown.
_BACKEND_ENDED = frozenset({"57P01", "57P02", "57P03"})
# Classes whose errors leave the outcome unknown: a connection exception, an internal error.
_UNKNOWN_OUTCOME_CLASSES = ("08", "XX")
# ReadOnlySqlTransaction: the server is a standby now (or a demoted primary); as when the
# backend was ended, the next call looks for the primary again.
_NOT_THE_PRIMARY = frozenset({"25006"}) | _BACKEND_ENDED

# How often a call whose server went away tries to connect again, while it may wait.
_PROBE_INTERVAL = 0.01

# The WARNING a backend sends when the wait of a COMMIT for a synchronous standby is
# cancelled (pg_cancel_backend, or the cancel request of our deadline) or ended: the
# transaction has committed here, and the statement answers success. Told by the server
# function that raises it, which is never translated (its SQLSTATE is the generic 01000);
# the English text only for a server that does not send the function's name.
_STANDBY_WAIT_FUNCTION = "SyncRepWaitForLSN"
_STANDBY_WAIT_TEXT = "canceling wait for synchronous replication"
_UNREPLICATED = (
    "it committed on this server, but its wait for the synchronous standby was cancelled, "
    "so a failover to a standby may lose it"
)


class PoolOptions(TypedDict, total=False):
    """What ``Database.open`` (and so ``SessionStore.open``, ``EventStore.open``) takes besides the DSN."""

    min_size: int  # connections kept open (default 1)
    max_size: int  # at most (default 10)
    timeout: float  # seconds a call waits for a connection; twice that for an answer (default 5)
    connect_timeout: int  # seconds to connect (default 5)
    application_name: str | None  # default: exai-sessions-<random>, so a crash helper finds its backends
    # Server-side prepared statements (psycopg prepares a statement on its 6th execution on a
    # connection). None (default): on, unless a pooler is in between; True: on; False: never.
    prepared_statements: bool | None


# A statement as psycopg takes it. The hot ones are composed once and kept as bytes:
# composing psycopg.sql objects on every call cost more than the round trip itself.
Query = bytes | sql.Composed


def _json_from_utf8(data: str | bytes) -> Any:
    # json.loads() given bytes first works out their encoding, which took as long as parsing
    # a small object. jsonb's text never starts with a BOM or a NUL, so it always settles on
    # UTF-8: decode it as json.loads() would.
    return json.loads(data if isinstance(data, str) else data.decode("utf-8", "surrogatepass"))


_Cursor = TypeVar("_Cursor", bound=psycopg.AsyncCursor[Any])


def tuple_cursor(cursor: _Cursor) -> _Cursor:
    """``cursor``, set up to read tuple rows with fast JSON decoding."""
    set_json_loads(_json_from_utf8, cursor)
    return cursor


class _PooledConnection(psycopg.AsyncConnection[Any]):
    """A connection of the pool, with one cursor kept for its single-row statements.

    A new cursor looks up the adapters of every parameter and result column again on its
    first statement, which cost more than the rest of a call's client-side work. A pooled
    connection runs one statement at a time, so its cursor can serve each of them.
    """

    _row_cursor: psycopg.AsyncCursor[TupleRow] | None = None
    # Whether the statement in progress (or the COMMIT of its transaction) committed here
    # without waiting for the synchronous standby to the end; reset before each use.
    unreplicated = False

    def note_notice(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        """The notice handler of every pooled connection: notes a cancelled wait for the standby."""
        if diagnostic.severity_nonlocalized != "WARNING":
            return
        function = diagnostic.source_function
        if function == _STANDBY_WAIT_FUNCTION or (
            function is None and (diagnostic.message_primary or "").startswith(_STANDBY_WAIT_TEXT)
        ):
            self.unreplicated = True

    def row_cursor(self) -> psycopg.AsyncCursor[TupleRow]:
        if self._row_cursor is None:
            self._row_cursor = tuple_cursor(self.cursor(row_factory=tuple_row))
        return self._row_cursor


class _ConnectFailures:
    """The last failed connection attempt of one pool.

    A pool that cannot connect only reports ``PoolTimeout: pool initialization incomplete``;
    the reason (no such database, authentication failed, no server) goes to a log. This
    keeps it, so that PersistenceError can say why.
    """

    def __init__(self) -> None:
        self.last: psycopg.Error | None = None

    def connection_class(self) -> type[_PooledConnection]:
        failures = self

        class RecordingConnection(_PooledConnection):
            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                try:
                    connection = await super().connect(conninfo, **kwargs)
                except psycopg.Error as error:
                    failures.last = error
                    raise
                failures.last = None
                return connection

        return RecordingConnection


@contextmanager
def database_errors(action: str, failures: _ConnectFailures | None = None) -> Iterator[None]:
    """Turn every driver or pool failure into PersistenceError naming what was attempted."""
    try:
        yield
    except psycopg.Error as error:
        raise _persistence_error(action, error, failures) from error


def _persistence_error(
    action: str, error: psycopg.Error, failures: _ConnectFailures | None, *, sent: bool = False
) -> PersistenceError:
    """``error`` as the caller should see it; ``sent``: the write may have reached the server.

    Sent, a lost answer is ``CommitUncertain``; an error the server answered with means that
    the statement (or its transaction) was rolled back, and so does anything before sending.
    """
    reason = f"{type(error).__name__}: {error}".rstrip()
    if sent and _outcome_unknown(error):
        return CommitUncertain(action, reason)
    if isinstance(error, PoolTimeout) and failures is not None and failures.last is not None:
        reason += f"; last connection attempt: {type(failures.last).__name__}: {failures.last}".rstrip()
    return PersistenceError(f"{action} failed: {reason}")


def _outcome_unknown(error: psycopg.Error) -> bool:
    """Whether ``error``, raised after a write was sent, leaves unknown whether it committed."""
    if _prepared_statement_failed(error):
        return False  # its Parse or Bind was refused: nothing ran
    sqlstate = error.sqlstate
    if sqlstate is None:
        # No answer from the server: the connection broke (or was cut off) under the statement.
        return isinstance(error, psycopg.OperationalError)
    return sqlstate in _BACKEND_ENDED or sqlstate.startswith(_UNKNOWN_OUTCOME_CLASSES)


def closed_by_server(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server closed this idle connection meanwhile (a restart, a failover, a terminated backend).

    An idle connection has nothing to read; if its socket is readable, the server has sent
    its goodbye or closed it. A select() costs no round trip.
    """
    return conn.closed or bool(select.select([conn.fileno()], [], [], 0)[0])


class Database:
    """A pool of autocommit connections to one database; every failure is a ``PersistenceError``.

    Works behind a pooler in transaction mode (PgBouncer's default options): it keeps no
    session state across statements, and with ``prepared_statements=None`` (the default) a
    connection that goes through a pooler does not prepare statements. Once a prepared
    statement failed as it does behind a pooler (SQLSTATE 26000, 42P05), none of its
    connections prepares any more, and a single autocommit statement is run again.
    """

    def __init__(self, conninfo: str, *, application_name: str, pool_options: Mapping[str, Any]) -> None:
        """Use ``await Database.open(...)``: it builds the pool and waits for one connection."""
        self.conninfo = conninfo
        self.application_name = application_name
        # What open() was given, so a crash helper can open an equal one again.
        self.pool_options = dict(pool_options)
        # The pool gives up waiting for a connection after `timeout`; this also bounds a
        # statement on a server that accepted the connection but stopped answering.
        self.answer_within = 2 * self.pool_options["timeout"]
        self._connect_failures = _ConnectFailures()
        self.prepared_statements: bool | None = self.pool_options["prepared_statements"]
        # Automatic: each connection decides at connect (_configure); after a prepared statement
        # failed, every connection of this database stops preparing (_stop_preparing_after).
        self._never_prepare = self.prepared_statements is False
        # The connections that prepare automatically, so that one failure reaches them all.
        self._preparing: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        self._pool = self._new_pool()
        # Set when a call could not reach the server; the next call first checks whether it is back.
        self._server_lost = False
        # Cancel requests of statements past their deadline, still under way (see deadline.py).
        self._cancelling: set[asyncio.Task[None]] = set()
        # Held by the call that probes for a server that went away (see _wait_for_server).
        self._probing = asyncio.Lock()

    def _new_pool(self) -> AsyncConnectionPool[_PooledConnection]:
        options = self.pool_options
        return AsyncConnectionPool[_PooledConnection](
            self.conninfo,
            connection_class=self._connect_failures.connection_class(),
            kwargs={
                "autocommit": True,
                "connect_timeout": options["connect_timeout"],
                "application_name": self.application_name,
            },
            min_size=options["min_size"],
            max_size=options["max_size"],
            timeout=options["timeout"],
            configure=self._configure,
            open=False,
        )

    async def _configure(self, conn: _PooledConnection) -> None:
        """Set up a new connection of the pool: its notice handler, whether psycopg may prepare its statements.

        Behind a pooler in transaction mode each transaction may run on another server
        connection, which does not know the statements psycopg prepared on the one before (or
        already has one of that name). A pooler hands the client a backend pid of its own
        making, so one round trip per connection, never per call, tells whether one is there.
        """
        conn.add_notice_handler(conn.note_notice)
        if self.prepared_statements is True:
            return
        if not self._never_prepare:
            cursor = await conn.execute(b"SELECT pg_backend_pid()", prepare=False)
            row = await cursor.fetchone()
            # Checked again after the await: a failure meanwhile may have switched preparing off.
            if row is not None and row[0] == conn.info.backend_pid and not self._never_prepare:
                self._preparing.add(conn)
                return
        conn.prepare_threshold = None  # psycopg then neither prepares nor uses what it prepared

    def _stop_preparing_after(self, error: psycopg.Error) -> bool:
        """Whether ``error`` is a prepared statement the server connection lacked (or had already)
        under the automatic option; if so, no connection of this database prepares any more.

        For a pooler that passes the server's pid on, which ``_configure`` cannot tell from a
        direct connection. The statement did not run: its Parse or its Bind was refused.
        """
        if self.prepared_statements is not None or not _prepared_statement_failed(error):
            return False
        if not self._never_prepare:
            self._never_prepare = True
            for conn in list(self._preparing):
                conn.prepare_threshold = None
            self._preparing.clear()
            logger.warning(
                "%r: prepared statements switched off after %s: %s (a pooler in transaction mode in between?)",
                self,
                type(error).__name__,
                error,
            )
        return True

    @classmethod
    async def open(cls, conninfo: str, **options: Unpack[PoolOptions]) -> Self:
        """Open a pool on ``conninfo`` and wait until one connection works (``PoolOptions``).

        ``timeout`` bounds how long a call waits for a connection, so an unreachable
        database raises ``PersistenceError`` instead of hanging.
        """
        unknown = sorted(set(options) - set(PoolOptions.__annotations__))
        if unknown:
            raise TypeError(f"unknown pool options {unknown}; known: {sorted(PoolOptions.__annotations__)}")
        pool_options: dict[str, Any] = {
            "min_size": options.get("min_size", 1),
            "max_size": options.get("max_size", 10),
            "timeout": options.get("timeout", 5.0),
            "connect_timeout": options.get("connect_timeout", 5),
            "prepared_statements": options.get("prepared_statements"),
        }
        prepared = pool_options["prepared_statements"]
        if prepared is not None and not isinstance(prepared, bool):
            raise TypeError(
                f"prepared_statements must be True, False or None (automatic), not {type(prepared).__name__} "
                f"{prepared!r}"
            )
        # A name of its own lets a crash helper find exactly this pool's backends.
        name = options.get("application_name") or f"exai-sessions-{secrets.token_hex(4)}"
        database = cls(conninfo, application_name=name, pool_options=pool_options)
        with database_errors(f"connecting to {describe(conninfo)}", database._connect_failures):
            await database._pool.open(wait=True, timeout=pool_options["timeout"])
        return database

    async def close(self) -> None:
        await self._pool.close()
        # Left to the loop's shutdown, they would be cut short, which PgBouncer 1.18 was seen to
        # mishandle (a later login got the cancel's reply). Bounded: with a libpq older than 17,
        # psycopg sends a cancel from a thread, without a timeout.
        if self._cancelling:
            await asyncio.wait(self._cancelling, timeout=CANCEL_TIMEOUT)

    async def abandon(self) -> None:
        """Drop the pool without waiting for anything, as a dying process would."""
        await self._pool.close(timeout=0)

    async def fetch_one(
        self, action: str, query: Query, params: Mapping[str, Any], *, writes: bool = True
    ) -> tuple[Any, ...] | None:
        """Run one statement and return its first row: every single-row call of a store comes here.

        What ``connection`` guarantees (reconnection, a deadline, PersistenceError or
        CommitUncertain), spelled out without its layers of context managers, which cost a
        sizeable part of a call. ``writes=False``: a read, never uncertain.
        """
        # This call's pool: another call may replace self._pool meanwhile (see _reconnect).
        pool = self._pool
        deadline = Deadline(self.answer_within, self._cancelling)
        sent = False
        try:
            async with deadline.backstop():
                pool, conn = await self._acquire(action)
                conn.unreplicated = False
                deadline.watch(conn)
                try:
                    cursor = conn.row_cursor()
                    sent = writes
                    await cursor.execute(query, params)
                    # Read now: once the connection is back in the pool, another call resets it.
                    unreplicated = conn.unreplicated
                    row = await cursor.fetchone()
                finally:
                    await deadline.release(conn)
                    await pool.putconn(conn)
        except TimeoutError as error:
            raise self._no_answer(action, error, sent=sent) from error
        except psycopg.Error as error:
            if deadline.passed:
                raise self._no_answer(action, error, sent=sent) from error
            if self._stop_preparing_after(error):
                # One autocommit statement whose Parse or Bind was refused: it did not run.
                rows = await self._fetch_all(action, query, params, tuple_row, writes=writes)
                return rows[0] if rows else None
            self._note_failure(error, pool)
            raise _persistence_error(action, error, self._connect_failures, sent=sent) from error
        if unreplicated:
            raise CommitUncertain(action, _UNREPLICATED)
        return row

    async def fetch_all(
        self,
        action: str,
        query: Query,
        params: Mapping[str, Any],
        *,
        row_factory: RowFactory[Any] = tuple_row,
        writes: bool = True,
    ) -> list[Any]:
        """Run one autocommit statement and return its rows, as ``connection`` guarantees.

        Like ``fetch_one``, it runs the statement once more when psycopg's prepared statement
        failed (and preparing is then off): a refused Parse or Bind ran nothing.
        """
        try:
            return await self._fetch_all(action, query, params, row_factory, writes=writes)
        except PersistenceError as error:
            if not (isinstance(error.__cause__, psycopg.Error) and self._stop_preparing_after(error.__cause__)):
                raise
        return await self._fetch_all(action, query, params, row_factory, writes=writes)

    async def _fetch_all(
        self, action: str, query: Query, params: Mapping[str, Any], row_factory: RowFactory[Any], *, writes: bool
    ) -> list[Any]:
        async with self.connection(action, writes=writes) as conn:
            cursor = tuple_cursor(conn.cursor(row_factory=row_factory))
            await cursor.execute(query, params)
            return await cursor.fetchall()

    @asynccontextmanager
    async def connection(self, action: str, *, writes: bool = True) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; any failure becomes PersistenceError, and no call waits for ever.

        A failure once the block has begun, whose outcome is unknown, is ``CommitUncertain``
        (unless ``writes=False``: a block that only reads); so is a block whose statement, or
        whose transaction's COMMIT, committed here but was not waited for by the synchronous
        standby.
        """
        async with self._connection(action, writes=writes) as (conn, _):
            yield conn

    @asynccontextmanager
    async def _connection(
        self, action: str, *, writes: bool
    ) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], Deadline]]:
        """``connection``, and its deadline (``stream`` stops it while its consumer has the rows).

        The statement of the connection is cancelled when the deadline is up, and the connection
        cut off if that does not end it (see ``deadline.py``).
        """
        pool = self._pool
        deadline = Deadline(self.answer_within, self._cancelling)
        sent = False  # from the start of the caller's block on, a write may have reached the server
        try:
            async with deadline.backstop():
                pool, conn = await self._acquire(action)
                try:
                    conn.unreplicated = False
                    deadline.watch(conn)
                    sent = writes
                    try:
                        yield conn, deadline
                        unreplicated = conn.unreplicated
                    finally:
                        await deadline.release(conn)
                finally:
                    await pool.putconn(conn)
        except TimeoutError as error:
            raise self._no_answer(action, error, sent=sent) from error
        except psycopg.Error as error:
            if deadline.passed:
                # Cancelled or cut off at the deadline: that says nothing of the server.
                raise self._no_answer(action, error, sent=sent) from error
            # Inside the caller's block a failed prepared statement cannot be run again here:
            # the caller gets the error, and the calls after it do not prepare.
            if not self._stop_preparing_after(error):
                self._note_failure(error, pool)
            raise _persistence_error(action, error, self._connect_failures, sent=sent) from error
        if unreplicated:
            raise CommitUncertain(action, _UNREPLICATED)

    async def stream(
        self, action: str, query: sql.Composed, params: Mapping[str, Any], *, batch_size: int
    ) -> AsyncIterator[Sequence[Any]]:
        """Every row of ``query``, fetched through a server-side cursor ``batch_size`` at a time."""
        # The deadline applies to each round trip, not to the whole stream: reading 100k rows
        # may take longer than one call may wait, and the consumer's time is its own.
        async with (
            self._connection(action, writes=False) as (conn, deadline),
            conn.transaction(),
            tuple_cursor(conn.cursor(name="exai_stream", row_factory=tuple_row)) as cur,
        ):
            await cur.execute(query, params)
            while rows := await cur.fetchmany(batch_size):
                deadline.pause()
                try:
                    for row in rows:
                        yield row
                finally:
                    deadline.resume()  # also for what ends the stream: closing the cursor, COMMIT

    async def _acquire(self, action: str) -> tuple[AsyncConnectionPool[_PooledConnection], _PooledConnection]:
        """A connection of the pool that the server has not closed, and that pool; nothing is sent yet.

        One the server closed while it was idle means the server went away (restarted, failed
        over): the call waits for a server to take a connection again (``_wait_for_server``),
        the pool is replaced, and asked again. A pool ``check`` would discard it too, but then
        try the next connection only after its backoff, a second or more, in this very call.
        """
        if self._server_lost:
            await self._reconnect(action)
        pool = self._pool
        conn = await pool.getconn()
        if not closed_by_server(conn):
            return pool, conn
        await conn.close()  # closed, the pool drops it and opens a replacement
        await pool.putconn(conn)
        if pool is self._pool:
            self._server_lost = True
        await self._wait_for_server(action, pool)
        pool = self._pool
        return pool, await pool.getconn()

    async def _wait_for_server(self, action: str, lost: AsyncConnectionPool[_PooledConnection]) -> None:
        """``_reconnect`` every few ms until a server takes the connection, for at most the pool's ``timeout``.

        A restart or a failover takes a fraction of a second, and a call may wait that long for
        a connection anyway: it goes on as soon as the server (or the new primary) is there.
        One call probes at a time; the others find the pool replaced.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pool_options["timeout"]
        async with self._probing:
            while self._pool is lost:
                try:
                    await self._reconnect(action)
                except PersistenceError:
                    if loop.time() >= deadline:
                        raise
                    await asyncio.sleep(_PROBE_INTERVAL)

    def _note_failure(self, error: psycopg.Error, pool: AsyncConnectionPool[_PooledConnection]) -> None:
        """After a connection failure, or an answer that this server is no longer the primary
        (read-only, its backend ended), the next call first finds the server again.

        ``_reconnect`` connects through the DSN anew: behind one that names several hosts
        with ``target_session_attrs=read-write``, libpq then picks the one that is the
        primary now, and a new pool replaces every connection to the old one. Not for a
        failure of a pool already replaced (its calls get PoolClosed): the new one would be
        replaced in turn, and with calls in flight that never ended.
        """
        if pool is not self._pool:
            return
        if isinstance(error, psycopg.OperationalError) or error.sqlstate in _NOT_THE_PRIMARY:
            self._server_lost = True

    async def _reconnect(self, action: str) -> None:
        """After an outage: fail at once while the server is down, start afresh once it is back.

        The pool retries with a backoff that doubles up to minutes, so after a long outage it
        could keep failing calls long after the server returned. One direct connection tells
        whether the server is back; if it is, a new pool replaces the old one. Calls that
        found the server lost at the same time probe each; the first one back replaces the
        pool, the others use that one.
        """
        lost = self._pool
        with database_errors(action):
            probe = await psycopg.AsyncConnection.connect(
                self.conninfo, connect_timeout=self.pool_options["connect_timeout"]
            )
        await probe.close()
        if self._pool is not lost:
            return  # a call that probed at the same time has replaced it already
        # Opened before it is handed out: a call given a pool not open yet gets PoolClosed.
        fresh = self._new_pool()
        with database_errors(action, self._connect_failures):
            await fresh.open(wait=False)
        if self._pool is not lost:
            await fresh.close(timeout=0)
            return
        self._pool, self._server_lost = fresh, False
        await lost.close(timeout=0)

    def _no_answer(self, action: str, error: BaseException, *, sent: bool) -> PersistenceError:
        """The deadline passed. Cancelled by the server, the statement was rolled back; cut off
        (or the call cancelled) after a write was sent, nobody knows."""
        reason = f"the database did not answer within {self.answer_within:g}s"
        if sent and not isinstance(error, psycopg.errors.QueryCanceled):
            return CommitUncertain(action, f"{reason}, and the connection was cut off")
        return PersistenceError(f"{action} failed: {reason}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {describe(self.conninfo)} as {self.application_name!r}>"


def _prepared_statement_failed(error: psycopg.Error) -> bool:
    if error.sqlstate in _PREPARED_STATEMENT_ERRORS:
        return True
    return error.sqlstate == _PROTOCOL_VIOLATION and "prepared statement" in (error.diag.message_primary or "")


def describe(conninfo: str) -> str:
    """The DSN without its password, for error messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "the database (unparsable DSN)"
    params.pop("password", None)
    return (
        psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})
        or "the default database"
    )
