"""Per-test clones made ahead and dropped in the background (TestDatabases(ahead=...))."""

import signal
import threading

import psycopg
import pytest
from pg_leftovers import database_names, own_databases

from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.testing.databases import TestDatabases


def has_the_schema(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass('public.sessions') IS NOT NULL").fetchone() == (True,)


@pytest.fixture
def ahead(exai_pg_server):
    databases = TestDatabases(exai_pg_server, ahead=1)
    databases.create_template()
    yield databases
    databases.drop_template()


@pytest.fixture
def own_server(basedir):
    """A server of this test's own, to kill without disturbing the session's."""
    server = TemporaryPostgres(find_bindir(), basedir=basedir, os_user=server_os_user(None)).start()
    yield server
    server.stop()


def test_each_clone_is_new_and_has_the_schema(ahead, exai_pg_server):
    names = [ahead.create_clone() for _ in range(4)]
    assert len(set(names)) == 4
    for name in names:
        assert has_the_schema(exai_pg_server.dsn(name))
        ahead.release(name)


def test_a_clone_is_made_ahead_while_the_test_runs(ahead, exai_pg_server):
    first = ahead.create_clone()
    # The next one is cloned in the background: it appears without a second create_clone().
    with ahead._background._state:
        assert ahead._background._state.wait_for(lambda: ahead._background._ready, timeout=30)
        (spare,) = ahead._background._ready
    assert spare in database_names(exai_pg_server.dsn())
    assert ahead.create_clone() == spare
    ahead.release(first)
    ahead.release(spare)


def test_a_released_clone_is_dropped_in_the_background(ahead, exai_pg_server):
    name = ahead.create_clone()
    ahead.release(name)
    with ahead._background._state:
        assert ahead._background._state.wait_for(lambda: not ahead._background._to_drop, timeout=30)
    # The queue is empty once a thread took the drop; wait until the database is gone.
    with psycopg.connect(exai_pg_server.dsn(), autocommit=True) as conn:
        for _ in range(300):
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                break
            threading.Event().wait(0.1)
        else:
            pytest.fail(f"{name} still exists 30 s after its release")


def test_releases_beyond_the_backlog_are_dropped_by_the_caller(ahead, exai_pg_server):
    names = [ahead.create_clone() for _ in range(10)]
    with ahead._background._state:
        ahead._background._paused = True  # the threads take no job: every drop waits in the queue
    for name in names:
        ahead.release(name)
    assert len(ahead._background._to_drop) == ahead._background.MAX_PENDING_DROPS
    remaining = database_names(exai_pg_server.dsn())
    dropped_now = [name for name in names if name not in remaining]
    assert len(dropped_now) == len(names) - ahead._background.MAX_PENDING_DROPS


def test_closing_drops_every_clone_and_ends_the_threads(exai_pg_server):
    databases = TestDatabases(exai_pg_server, ahead=2)
    databases.create_template()
    names = [databases.create_clone() for _ in range(3)]
    databases.release(names[0])
    threads = list(databases._background._threads)
    assert len(threads) == databases._background.THREADS
    databases.drop_template()
    left = own_databases(databases)
    assert left == set()  # the template, the clones in use, the spares and the queued drops
    assert not [thread for thread in threads if thread.is_alive()]


def test_a_clone_after_close_is_made_in_the_caller(exai_pg_server):
    databases = TestDatabases(exai_pg_server, ahead=1)
    databases.create_template()
    databases.close()
    name = databases.create_clone()  # no thread starts again
    assert databases._background._threads == []
    databases.drop(name)
    databases.drop_template()


def test_ahead_zero_clones_in_the_caller(exai_pg_server):
    databases = TestDatabases(exai_pg_server, ahead=0)
    databases.create_template()
    try:
        name = databases.create_clone()
        assert has_the_schema(exai_pg_server.dsn(name))
        databases.release(name)
        assert name not in database_names(exai_pg_server.dsn())  # dropped before release() returned
    finally:
        databases.drop_template()


def test_a_negative_ahead_is_refused(exai_pg_server):
    with pytest.raises(ValueError, match="ahead must be 0 or more, got -1"):
        TestDatabases(exai_pg_server, ahead=-1)


def test_clones_go_on_after_the_server_was_killed_and_restarted(own_server):
    databases = TestDatabases(own_server, ahead=1)
    databases.create_template()
    try:
        first = databases.create_clone()
        databases.release(first)
        own_server.kill(signal.SIGKILL)
        own_server.restart()
        # Whatever the threads were doing when the server died, the next tests get working clones.
        for _ in range(3):
            name = databases.create_clone()
            assert has_the_schema(own_server.dsn(name))
            databases.release(name)
    finally:
        databases.drop_template()
    assert own_databases(databases) == set()


def test_a_failure_raises_in_the_test_that_needs_the_clone(own_server):
    databases = TestDatabases(own_server, ahead=1)
    databases.create_template()
    try:
        databases.release(databases.create_clone())
        own_server.kill(signal.SIGKILL)
        # The background cannot clone on a dead server; the caller's own attempt raises.
        with pytest.raises(psycopg.OperationalError):
            while True:  # a clone made before the kill may be handed out first
                databases.create_clone()
    finally:
        own_server.restart()
        databases.drop_template()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unforeseen_error_in_the_background_never_leaves_a_test_waiting(exai_pg_server, monkeypatch):
    def broken(self, kind, name, connection):
        raise RuntimeError("a bug in the background")

    monkeypatch.setattr("pytest_exai_sessions.testing.databases._Background._do", broken)
    databases = TestDatabases(exai_pg_server, ahead=1)
    databases._background.WAIT_FOR_CLONE_SECS = 2  # were the failed job still counted, each take waited this
    databases.create_template()
    try:
        for _ in range(3):  # the threads died on the first job; clones are made in the caller
            name = databases.create_clone()
            assert has_the_schema(exai_pg_server.dsn(name))
            databases.release(name)
        with databases._background._state:
            assert databases._background._state.wait_for(lambda: not databases._background._creating, timeout=30)
            assert not databases._background._ready  # nothing that failed passes for a clone
    finally:
        databases.drop_template()
    assert own_databases(databases) == set()


def test_a_test_connected_to_the_template_keeps_its_connection(ahead, exai_pg_server):
    first = ahead.create_clone()
    with ahead._background._state:  # the spare is ready, so the next take clones nothing in the caller
        assert ahead._background._state.wait_for(lambda: ahead._background._ready, timeout=30)
    with psycopg.connect(exai_pg_server.dsn(ahead.template)) as on_template:
        second = ahead.create_clone()  # the threads now clone the next one, while we hold the template
        background = ahead._background
        with background._state:  # until that clone is done, one way or the other
            assert background._state.wait_for(lambda: background._ready or background._paused, timeout=60)
        assert on_template.execute("SELECT 1").fetchone() == (1,)  # not terminated by the background
    third = ahead.create_clone()  # the background's clone failed; the caller's works
    assert has_the_schema(exai_pg_server.dsn(third))
    for name in (first, second, third):
        ahead.release(name)
