"""A primary and its streaming standbys, each a ``TemporaryPostgres`` child of this process.

What a failover manager (Patroni, pg_auto_failover, a managed service) does when the primary
dies, done here on demand and in order: the primary is killed, the standbys receive what
reached them, the most advanced one is promoted, the others follow it. ``rejoin`` brings a
dead primary back as a standby with pg_rewind, which needs ``wal_log_hints``.

Synchronous replication names the standbys in ``synchronous_standby_names`` only once they
stream (commits would wait for ever before). When a failover leaves no standby, the new
primary runs without one until a standby rejoins, as Patroni's ``synchronous_mode`` (not
strict) and pg_auto_failover do: commits never hang for want of a standby, and a primary
alone keeps what it acknowledges only as long as it lives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, LiteralString, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .cluster import ServerStartError, TemporaryPostgres
from .connection import make_dsn
from .procfs import ProcessId, continue_processes, identify, stop_processes

# What a cluster with standbys needs on every node, over the temporary server's test settings.
REPLICATION_SETTINGS: Mapping[str, str] = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    # pg_rewind needs to know every page a checkpoint's hint bits changed, and whole pages.
    "wal_log_hints": "on",
    "full_page_writes": "on",
    # A re-pointed or rejoined standby finds on the new primary the WAL it still needs.
    "wal_keep_size": "256MB",
    # After losing its primary a standby tries again within this, not the default 5 s.
    "wal_retrieve_retry_interval": "50ms",
}
FROM_BASE_BACKUP = "pg_basebackup of the primary"
_PROMOTE_WAIT_SECONDS = 60
_STANDBY_SIGNAL = "standby.signal"
_AUTO_CONF = "postgresql.auto.conf"


class ReplicationError(ServerStartError):
    """A standby could not be built, promoted or rejoined; the message carries the node's log."""


def synchronous_names(policy: str, standbys: list[str]) -> str:
    """``synchronous_standby_names`` for ``policy`` (``FIRST k`` or ``ANY k``) over ``standbys``; '' for none.

    With fewer standbys than ``k``, all of them: a commit waits for every standby there is.
    """
    if not standbys:
        return ""
    method, _, count = policy.partition(" ")
    k = min(int(count), len(standbys))
    return f"{method} {k} ({', '.join(_quoted_name(name) for name in standbys)})"


def parse_policy(synchronous: bool | str) -> str | None:
    """``True`` is ``FIRST 1``; ``False`` asynchronous (None); else ``"FIRST k"`` or ``"ANY k"`` as given."""
    if synchronous is True:
        return "FIRST 1"
    if synchronous is False:
        return None
    method, _, count = str(synchronous).strip().upper().partition(" ")
    if method not in ("FIRST", "ANY") or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"synchronous must be True, False, 'FIRST k' or 'ANY k' with k >= 1, not {synchronous!r}")
    return f"{method} {int(count)}"


def _quoted_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ClusterNode(TemporaryPostgres):
    """One server of a replicated cluster: the primary, or a standby made by ``pg_basebackup`` of it."""

    def __init__(self, bindir: Path, *, name: str, settings: Mapping[str, str] | None = None, **options: Any) -> None:
        super().__init__(bindir, settings={**REPLICATION_SETTINGS, **(settings or {})}, **options)
        self.name = name
        self._upstream: ClusterNode | None = None

    # building

    def start_standby(self, primary: ClusterNode) -> Self:
        """A new standby of ``primary``: a base backup of it, streaming from it once this returns."""
        self._upstream = primary
        return self.start()

    def _create_cluster(self, seed: Path | None) -> None:
        if self._upstream is None:
            super()._create_cluster(seed)
            # In the data directory too, not only on the command line: pg_rewind's crash recovery
            # of a dead primary runs without it, and would record wal_log_hints off.
            self._set_in_auto_conf(REPLICATION_SETTINGS)
            return
        self._run_tool(
            "pg_basebackup",
            "--pgdata", str(self.datadir),
            "--checkpoint", "fast",
            "--wal-method", "stream",
            "--no-sync",
            "--dbname", self._upstream.dsn(),
        )  # fmt: skip
        self._configure_standby(self._upstream)
        self.cluster_source = FROM_BASE_BACKUP

    def _configure_standby(self, primary: ClusterNode) -> None:
        """Mark the stopped data directory a standby of ``primary``, under this node's name."""
        self._write_owned(_STANDBY_SIGNAL, "")
        self._set_in_auto_conf({"primary_conninfo": self._conninfo_of(primary)})

    def _set_in_auto_conf(self, settings: Mapping[str, str]) -> None:
        """Write ``settings`` into the stopped data directory's postgresql.auto.conf, over what it had."""
        auto_conf = self.datadir / _AUTO_CONF
        lines = auto_conf.read_text().splitlines() if auto_conf.exists() else []
        kept = [line for line in lines if line.split("=")[0].strip() not in settings]
        kept += [f"{name} = {_conf_string(value)}" for name, value in settings.items()]
        self._write_owned(_AUTO_CONF, "\n".join(kept) + "\n")

    def _conninfo_of(self, primary: ClusterNode) -> str:
        return make_conninfo(host=primary.host, port=str(primary.port), user=primary.user, application_name=self.name)

    def _write_owned(self, name: str, text: str) -> None:
        path = self.datadir / name
        path.write_text(text)
        if self.os_user is not None:
            os.chown(path, self.os_user.uid, self.os_user.gid)
        path.chmod(0o600)

    def _run_tool(self, tool: str, *arguments: str) -> None:
        binary = self.bindir / tool
        if not binary.exists():
            raise ReplicationError(f"{tool} is not in {self.bindir}: standbys need PostgreSQL's server binaries")
        with open(self.log_path, "ab") as log:
            result = subprocess.run(
                [str(binary), *arguments], stdout=log, stderr=subprocess.STDOUT, **self._child.run_as()
            )
        if result.returncode != 0:
            raise ReplicationError(f"{tool} failed (exit {result.returncode}) on {self.name}:\n{self.log_tail()}")

    # state

    def query(self, statement: LiteralString | sql.Composed, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on this node's maintenance database; its rows."""
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description is not None else []

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def received_position(self) -> int:
        """How far this standby's WAL reaches (received, else replayed), in bytes."""
        rows = self.query(
            "SELECT (coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), '0/0') - '0/0'::pg_lsn)::bigint"
        )
        return int(rows[0][0])

    def wal_receivers(self) -> list[ProcessId]:
        """The WAL receiver of this standby, if one runs."""
        found = [
            identify(int(pid)) for (pid,) in self.query("SELECT pid FROM pg_stat_wal_receiver WHERE pid IS NOT NULL")
        ]
        return [process for process in found if process is not None]

    def streaming(self) -> bool:
        return bool(self.query("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")[0][0])

    def set_config(self, name: str, value: str) -> None:
        """``ALTER SYSTEM SET name = value`` and reload: a setting that outlives a restart or a promotion."""
        self.query(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        self.query("SELECT pg_reload_conf()")

    # roles

    def promote(self) -> None:
        """End recovery: this standby becomes a primary once it has replayed all the WAL it has."""
        (promoted,) = self.query("SELECT pg_promote(true, %s)", (_PROMOTE_WAIT_SECONDS,))[0]
        if not promoted:
            raise ReplicationError(f"{self.name} was not promoted within {_PROMOTE_WAIT_SECONDS}s:\n{self.log_tail()}")

    def follow(self, primary: ClusterNode) -> None:
        """A running standby streams from ``primary`` from now on (on the new timeline after a promotion)."""
        self.set_config("primary_conninfo", self._conninfo_of(primary))

    def rewind_and_follow(self, primary: ClusterNode) -> None:
        """A dead former primary made a standby of ``primary``: pg_rewind (crash recovery first), then started."""
        self._run_tool(
            "pg_rewind",
            "--target-pgdata", str(self.datadir),
            "--source-server", primary.dsn(),
            "--no-sync",
        )  # fmt: skip
        self._configure_standby(primary)
        with contextlib.suppress(FileNotFoundError):
            (self.datadir / "postmaster.pid").unlink()
        self._launch()

    def __repr__(self) -> str:
        return f"<ClusterNode {self.name} at {self.root} pid={self.pid}>"


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class ReplicatedCluster:
    """A primary and ``standbys`` standbys; ``synchronous``: True (``FIRST 1``), ``"FIRST k"``, ``"ANY k"`` or False.

    It is a ``PostgresServer``: ``dsn()`` names every node, with ``target_session_attrs=read-write``,
    as production's DSN does, so a client finds whichever node is the primary.
    ``make_node(name)`` builds a node, not started; the primary starts from ``seed`` (a
    stopped data directory) when given.
    """

    external = False
    connect_timeout = 2

    def __init__(
        self, make_node: Callable[[str], ClusterNode], *, standbys: int = 1, synchronous: bool | str = True
    ) -> None:
        if standbys < 1:
            raise ValueError(f"a failover needs standbys >= 1, got {standbys}")
        self.policy = parse_policy(synchronous)
        self.nodes: list[ClusterNode] = [make_node(f"node{i}") for i in range(standbys + 1)]
        self.primary = self.nodes[0]
        self.failovers = 0
        self.killed_at = 0.0  # time.monotonic() of the last kill of a primary
        self._stalled: list[ProcessId] = []

    # PostgresServer

    @property
    def host(self) -> str:
        return ",".join(node.host for node in self.nodes)

    @property
    def port(self) -> int:
        return self.primary.port  # every node listens on its own socket directory under the same number

    @property
    def user(self) -> str:
        return self.primary.user

    @property
    def password(self) -> str | None:
        return None

    @property
    def dbname(self) -> str:
        return self.primary.dbname

    @property
    def version(self) -> str:
        return self.primary.version

    def dsn(self, dbname: str | None = None) -> str:
        return make_dsn(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=dbname or self.dbname,
            target_session_attrs="read-write",
            connect_timeout=str(self.connect_timeout),
        )

    @property
    def standbys(self) -> list[ClusterNode]:
        """The running standbys."""
        return [node for node in self.nodes if node is not self.primary and node.pid is not None]

    # lifecycle

    def start(self, seed: Path | None = None) -> Self:
        try:
            self.primary.start(seed)
            for node in self.nodes[1:]:
                node.start_standby(self.primary)
            self._wait_streaming(self.nodes[1:])
            self._apply_policy()
            self._wait_caught_up()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._resume_receivers()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # faults

    def fail_over(self) -> float:
        """Kill the primary, promote the most advanced standby, re-point the others; the seconds to the first write.

        Inside ``stall_replication()`` the standbys get what had reached their sockets once the
        primary is dead, as after a real crash during a lag. The seconds run from the kill to
        the first commit the new primary acknowledges (through the cluster's DSN, waiting for
        its synchronous standbys if it has any).
        """
        self.kill_primary()
        self.promote()
        return self.first_write()

    def kill_primary(self) -> None:
        """SIGKILL the primary and reap it (its backends too); the standbys' receivers run again if stalled."""
        if not self.standbys:
            raise ReplicationError("no standby to fail over to: rejoin() the old primary first")
        self.killed_at = time.monotonic()
        self.primary.kill()
        self._resume_receivers()

    def promote(self) -> None:
        """Promote the standby whose WAL reaches furthest, once each has read all it will get; the rest follow it."""
        candidates = self.standbys
        self._wait_not_streaming(candidates)
        chosen = max(candidates, key=lambda node: node.received_position())
        chosen.promote()
        self.primary = chosen
        self.failovers += 1
        for node in self.standbys:
            node.follow(chosen)
        self._apply_policy()

    def first_write(self, dsn: str | None = None, timeout: float = 30.0) -> float:
        """Commit on ``dsn`` (default: the cluster's) until one is acknowledged; the seconds since the kill."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(dsn or self.dsn(), autocommit=True, connect_timeout=self.connect_timeout) as conn:
                    conn.execute("SELECT pg_catalog.txid_current()")
                break
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise ReplicationError(f"no write on the new primary within {timeout:g}s: {error}") from None
                time.sleep(0.005)
        return time.monotonic() - self.killed_at

    def rejoin(self) -> float:
        """Bring every dead node back as a standby of the primary (pg_rewind); the seconds until they stream."""
        started = time.monotonic()
        dead = [node for node in self.nodes if node.pid is None]
        # pg_rewind reads the source's timeline from its control file, which a promotion updates
        # only at the next checkpoint.
        self.primary.query("CHECKPOINT")
        for node in dead:
            node.rewind_and_follow(self.primary)
        self._wait_streaming(dead)
        self._apply_policy()
        self._wait_caught_up()
        return time.monotonic() - started

    @contextlib.contextmanager
    def stall_replication(self) -> Iterator[None]:
        """Stop every standby's WAL receiver (SIGSTOP) until the block ends; a failover inside lets them drain first."""
        for node in self.standbys:
            found = node.wal_receivers()
            if not found:
                raise ReplicationError(f"{node.name} has no WAL receiver to stall:\n{node.log_tail()}")
            stop_processes(found)
            self._stalled += found
        try:
            yield
        finally:
            self._resume_receivers()

    def cancel_waiting_commits(self) -> int:
        """Cancel every commit of the primary waiting for its synchronous standbys; how many there were."""
        rows = self.primary.query(
            "SELECT count(*) FILTER (WHERE pg_cancel_backend(pid)) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        )
        return int(rows[0][0])

    # inside

    def _apply_policy(self) -> None:
        """Name the running standbys in the primary's ``synchronous_standby_names``, and wait until they are waited for.

        A reload takes effect in each process when it gets to it, and a commit waits only once
        the checkpointer has taken it in (it keeps the flag commits look at). So: until the
        WAL senders show the standbys as synchronous (the postmaster has passed the reload on
        to every process), then a CHECKPOINT, which the checkpointer starts only after the
        reload pending for it.
        """
        if self.policy is None:
            return
        names = synchronous_names(self.policy, [node.name for node in self.standbys])
        self.primary.set_config("synchronous_standby_names", names)
        if not names:
            return
        expected = {node.name for node in self.standbys}
        query = "SELECT application_name FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum', 'potential')"
        deadline = time.monotonic() + 30.0
        while not expected <= {name for (name,) in self.primary.query(query)}:
            if time.monotonic() > deadline:
                raise ReplicationError(f"{sorted(expected)} did not become synchronous standbys within 30s")
            time.sleep(0.002)
        self.primary.query("CHECKPOINT")

    def _wait_caught_up(self, timeout: float = 30.0) -> None:
        """Until every standby has flushed all the WAL the primary has now.

        A commit acknowledged while no standby was synchronous (after a failover that left
        none, or before a reload took effect) is then on every standby, before the next
        failover can come: ``rejoin()`` returns only after this.
        """
        (target,) = self.primary.query("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")[0]
        names = {node.name for node in self.standbys}
        query = "SELECT application_name FROM pg_stat_replication WHERE (flush_lsn - '0/0'::pg_lsn)::bigint >= %s"
        deadline = time.monotonic() + timeout
        while not names <= {name for (name,) in self.primary.query(query, (target,))}:
            if time.monotonic() > deadline:
                raise ReplicationError(f"standbys {sorted(names)} did not catch up within {timeout:g}s")
            time.sleep(0.002)

    def _resume_receivers(self) -> None:
        stalled, self._stalled = self._stalled, []
        continue_processes(stalled)

    def _wait_streaming(self, nodes: list[ClusterNode], timeout: float = 30.0) -> None:
        names = {node.name for node in nodes}
        deadline = time.monotonic() + timeout
        while True:
            rows = self.primary.query("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
            if names <= {name for (name,) in rows}:
                return
            if time.monotonic() > deadline:
                late = sorted(names - {name for (name,) in rows})
                logs = "\n".join(f"{node.name}:\n{node.log_tail(10)}" for node in nodes if node.name in late)
                raise ReplicationError(f"standbys {late} did not stream within {timeout:g}s:\n{logs}")
            time.sleep(0.005)

    def _wait_not_streaming(self, nodes: list[ClusterNode], timeout: float = 10.0) -> None:
        """Until the standbys have read all their dead primary sent (their receivers saw the connection end)."""
        deadline = time.monotonic() + timeout
        while any(node.streaming() for node in nodes):
            if time.monotonic() > deadline:
                raise ReplicationError(f"a standby still streams {timeout:g}s after its primary died")
            time.sleep(0.002)

    def __repr__(self) -> str:
        return f"<ReplicatedCluster primary={self.primary.name} standbys={[n.name for n in self.standbys]}>"


def base_backup_unsupported(bindir: Path) -> str | None:
    """Why standbys cannot be built from ``bindir``, or None."""
    missing = [tool for tool in ("pg_basebackup", "pg_rewind") if shutil.which(tool, path=str(bindir)) is None]
    return f"{', '.join(missing)} missing from {bindir}" if missing else None
