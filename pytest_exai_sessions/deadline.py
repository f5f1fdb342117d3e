"""A call's deadline that holds even when the server cannot be reached to cancel the statement.

Cancelled, psycopg asks the server to cancel the running statement and then waits for it
to end: up to 10 s (psycopg 3.3), or for ever (3.2), when the backend is frozen, the
network is cut, or a pooler waits for a database that is down. So a call is not cancelled
at its deadline. The cancel request goes out then, without waiting for it, and a server
that answers ends the statement at once. What the caller then gets (db.py decides):

- the statement was still running: it fails with QueryCanceled and is rolled back, so a
  plain ``PersistenceError``: it did not take effect;
- it had already committed here and its COMMIT was waiting for a synchronous standby
  (``synchronous_standby_names``): a cancel does not undo a commit. The server stops
  waiting, sends a WARNING ("canceling wait for synchronous replication", the transaction
  "has already committed locally, but might not have been replicated to the standby") and
  answers with success. The write is on this server and maybe on no standby, so a failover
  may lose it: ``CommitUncertain``, never a success. (statement_timeout does not end that
  wait; only a cancel, a terminated backend or the standby's answer do.)

A connection still busy a second later is cut off: its socket is shut down, which ends the
call with a connection error. Whether a write then took effect is unknown (it may still
run, or have committed, on the server, as with any client that stops waiting):
``CommitUncertain``. The pool discards the connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import psycopg
from psycopg import pq

logger = logging.getLogger(__name__)

# psycopg's own bound on a cancel request.
CANCEL_TIMEOUT = 5.0
# How long after the deadline a server may take to end a cancelled statement.
_CONFIRM_WITHIN = 1.0
# After that, the call itself is cancelled: for what waits on something else than the connection.
_BACKSTOP = 0.5


class Deadline:
    """``seconds`` from now; ``watch(conn)`` cancels ``conn``'s statement then, and cuts it off a second later.

    ``cancelling``: where the cancel requests under way are kept, until they end (the loop
    keeps only weak references to tasks), so that their owner can wait for them on close.
    """

    __slots__ = ("_backstop", "_cancelling", "_conn", "_loop", "_task", "_timer", "passed", "seconds", "when")

    def __init__(self, seconds: float, cancelling: set[asyncio.Task[None]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._cancelling = cancelling
        self.seconds = seconds
        self.when = self._loop.time() + seconds
        self._timer: asyncio.TimerHandle | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._backstop: asyncio.Timeout | None = None
        self._task: asyncio.Task[Any] | None = None
        self.passed = False  # whether it passed while a connection was watched

    def backstop(self) -> asyncio.Timeout:
        """The bound of the whole block, after the connection's: then the call is cancelled."""
        self._backstop = asyncio.timeout_at(self.when + _CONFIRM_WITHIN + _BACKSTOP)
        self._task = asyncio.current_task()
        return self._backstop

    def watch(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._timer = self._loop.call_at(self.when, self._cancel, conn)

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    async def release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The call is done with ``conn``. Past the deadline it is closed, never reused: a cancel
        request still on its way would cancel the next call's statement on it."""
        self.done()
        if self.passed:
            await conn.close()

    def pause(self) -> None:
        """Stop the clock while the time is not the database's (a stream's consumer has the rows)."""
        self.done()
        if self._backstop is not None:
            self._backstop.reschedule(None)

    def resume(self) -> None:
        """Start it again, ``seconds`` from now, for the next round trip."""
        self.when = self._loop.time() + self.seconds
        # Rescheduled, the backstop cancels the task that entered it: only ever that one.
        if self._backstop is not None and asyncio.current_task() is self._task:
            self._backstop.reschedule(self.when + _CONFIRM_WITHIN + _BACKSTOP)
        if self._conn is not None:
            self.watch(self._conn)

    def _cancel(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.passed = True
        if conn.closed:
            return
        if conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
            task = asyncio.ensure_future(_cancel(conn))
            self._cancelling.add(task)
            task.add_done_callback(self._cancelling.discard)
        self._timer = self._loop.call_at(self.when + _CONFIRM_WITHIN, _cut_off, conn)


def _cut_off(conn: psycopg.AsyncConnection[Any]) -> None:
    """End the connection now: whatever waits on it fails at once."""
    if not conn.closed:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)


async def _cancel(conn: psycopg.AsyncConnection[Any]) -> None:
    try:
        await conn.cancel_safe(timeout=CANCEL_TIMEOUT)
    except psycopg.Error as error:  # the call fails anyway; this only tells why the server may go on
        logger.warning("the statement past its deadline could not be cancelled on the server: %s", error)
