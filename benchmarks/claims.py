"""The seed's "80% storage reduction" and "60% faster queries", measured: the unified table against 5 per-type tables.

    python benchmarks/claims.py                  # 100,000 and 1,000,000 events; appends its section to RESULTS.md
    python benchmarks/claims.py --events 20000   # other sizes; prints only
    python benchmarks/claims.py --quick          # 100,000 events, fewer rounds; prints only

The seed's report gives no schema for its "5 monitoring tables". The five here are the fairest
reading this project can make: one table per event type, each with every column of
``unified.event_metric_events`` and the same rows (copied from the unified table after its trigger
stamped them, so the bytes are identical), and the unified table's indexes where a per-type table
needs them: its primary key on ``id`` alone (no partition key to include) and ``(event_timestamp
DESC)`` in place of ``(event_type, event_timestamp DESC)``, the other seven alike. The unified table
is the migrated one: month partitions for the 90 days of retention the events span, the default
partition, its 9 indexes on each. "Now" is noon on the 15th of the current month (the database clock is
frozen there), so that the current month's partition holds half a month of events on any day this runs.

Times are ratios of ways measured in the same rounds on the same server, never absolute claims.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from run import RESULTS, Figure, median_ratio, sections_from, start_server

from pytest_exai_sessions.schema import latest_version
from pytest_exai_sessions.server import TemporaryPostgres
from pytest_exai_sessions.testing.databases import TestDatabases

RETENTION = timedelta(days=90)
SECTION = 8  # its number in RESULTS.md, after run.py's seven
# The five per-type tables, their event type and category, and each type's share of the events.
TYPES = {
    "api_requests": ("api_request", "request", 0.40),
    "performance_metrics": ("performance_metric", "performance", 0.25),
    "session_events": ("session_event", "session", 0.15),
    "error_events": ("error", "error", 0.10),
    "system_health": ("system_health", "system", 0.10),
}
BENCH_SCHEMA = "per_type"

# One INSERT ... SELECT fills the unified table; random() after setseed() makes every run's rows alike.
# Each type gets the payload a monitoring table of its kind plausibly holds.
FILL_UNIFIED = """
INSERT INTO unified.event_metric_events
    (event_type, event_category, source_system, event_timestamp, event_data, event_metrics, severity, status,
     duration_ms, response_time_ms, data_size_bytes, correlation_id, user_id, session_id)
SELECT t.event_type, t.category, 'exai-' || mod(n, 4), e.at,
       CASE t.event_type
           WHEN 'api_request' THEN jsonb_build_object('method', (ARRAY['GET', 'POST'])[1 + mod(n, 2)],
                'path', '/v1/tools/' || mod(n, 37), 'status', CASE WHEN mod(n, 50) = 0 THEN 500 ELSE 200 END)
           WHEN 'performance_metric' THEN jsonb_build_object(
                'metric', (ARRAY['latency', 'tokens', 'queue'])[1 + mod(n, 3)],
                'tool', 'tool-' || mod(n, 37), 'value', round((random() * 1000)::numeric, 2))
           WHEN 'session_event' THEN jsonb_build_object(
                'action', (ARRAY['created', 'resumed', 'closed'])[1 + mod(n, 3)],
                'client', 'client-' || mod(n, 500))
           WHEN 'error' THEN jsonb_build_object(
                'error', (ARRAY['TimeoutError', 'ConnectionError', 'ValueError'])[1 + mod(n, 3)],
                'message', 'request to provider ' || mod(n, 7) || ' failed after ' || mod(n, 5) || ' retries: '
                           || md5(n::text) || md5((n + 1)::text),
                'tool', 'tool-' || mod(n, 37))
           ELSE jsonb_build_object('cpu', round((random() * 100)::numeric, 1), 'memory_mb', 200 + mod(n, 800),
                'connections', mod(n, 64))
       END,
       CASE WHEN t.event_type IN ('api_request', 'performance_metric')
            THEN jsonb_build_object('tokens', mod(n, 4000), 'cost_usd', round((random() / 100)::numeric, 5))
            ELSE jsonb_build_object() END,
       CASE WHEN t.event_type = 'error' THEN (ARRAY['error', 'critical'])[1 + (mod(n, 10) = 0)::int]
            WHEN t.event_type = 'api_request' AND mod(n, 50) = 0 THEN 'error'
            WHEN mod(n, 20) = 0 THEN 'warning' ELSE 'info' END,
       CASE WHEN t.event_type = 'error' THEN 'failed' ELSE 'completed' END,
       CASE WHEN t.event_type IN ('api_request', 'performance_metric') THEN (random() * 2000)::bigint END,
       CASE WHEN t.event_type = 'api_request' THEN (random() * 1500)::bigint END,
       CASE WHEN t.event_type = 'api_request' THEN (random() * 65536)::bigint END,
       CASE WHEN t.event_type IN ('api_request', 'error') THEN md5((n / 3)::text) END,
       CASE WHEN mod(n, 3) > 0 THEN 'user-' || mod(n, 997) END,
       CASE WHEN t.event_type IN ('api_request', 'session_event', 'error') THEN 'session-' || mod(n, 5000) END
  FROM generate_series(1, %(events)s) AS n
 CROSS JOIN LATERAL (SELECT n AS k, %(now)s::timestamptz - random() * %(span)s::interval AS at, random() AS pick) AS e
 CROSS JOIN LATERAL (
       SELECT v.event_type, v.category
         FROM unnest(%(types)s::text[], %(categories)s::text[], %(bounds)s::float8[])
              AS v(event_type, category, upper_bound)
        WHERE e.pick < v.upper_bound
        ORDER BY v.upper_bound LIMIT 1) AS t
"""

# Copies of the unified table's secondary indexes for a per-type table: (event_type, ts) becomes (ts).
PER_TYPE_INDEXES = [
    "(event_timestamp DESC)",
    "(event_category, event_timestamp DESC)",
    "(source_system, event_timestamp DESC)",
    "(session_id, event_timestamp DESC) WHERE session_id IS NOT NULL",
    "(user_id, event_timestamp DESC) WHERE user_id IS NOT NULL",
    "(correlation_id) WHERE correlation_id IS NOT NULL",
    "(severity, status, event_timestamp DESC)",
    "USING gin (event_data jsonb_path_ops)",
]

RECENT_COLUMNS = "id, event_timestamp, event_type, event_category, source_system, severity, status, session_id"
ERROR_GROUPS = "(event_timestamp AT TIME ZONE 'UTC')::date, event_type, source_system, severity"
ERROR_AGGREGATES = "count(*), min(event_timestamp), max(event_timestamp)"
PERF_AGGREGATES = (
    "count(*), round(avg(duration_ms), 2), percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms),"
    " max(duration_ms), round(avg(response_time_ms), 2),"
    " percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms), max(response_time_ms)"
)


def type_shares() -> dict[str, list[Any]]:
    """FILL_UNIFIED's parameters for the types: each with the upper bound of its share of [0, 1)."""
    bounds, bound = [], 0.0
    for _, _, share in TYPES.values():
        bound += share
        bounds.append(bound)
    bounds[-1] = 2.0  # above any random(), whatever the rounding of the sum
    return {
        "types": [event_type for event_type, _, _ in TYPES.values()],
        "categories": [category for _, category, _ in TYPES.values()],
        "bounds": bounds,
    }


def create_per_type_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(BENCH_SCHEMA)))
    for table in TYPES:
        name = sql.Identifier(BENCH_SCHEMA, table)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE unified.event_metric_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS,"
                " PRIMARY KEY (id))"
            ).format(name)
        )
        for columns in PER_TYPE_INDEXES:
            conn.execute(sql.SQL("CREATE INDEX ON {} ").format(name) + sql.SQL(columns))


def fill(conn: psycopg.Connection[Any], events: int, now: datetime) -> None:
    """``events`` events over the retention span in the unified table, then the same rows in the per-type tables."""
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    oldest = now - RETENTION
    while month >= oldest.replace(day=1, hour=0, minute=0, second=0, microsecond=0):  # what maintenance creates
        conn.execute("SELECT unified.create_monthly_partition(%s)", (month,))
        month = (month - timedelta(days=1)).replace(day=1)
    conn.execute("SELECT setseed(0.16)")
    conn.execute(FILL_UNIFIED, {"events": events, "now": now, "span": RETENTION, **type_shares()})
    for table, (event_type, _, _) in TYPES.items():
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM unified.event_metric_events WHERE event_type = %s").format(
                sql.Identifier(BENCH_SCHEMA, table)
            ),
            (event_type,),
        )
    conn.execute("VACUUM ANALYZE")
    conn.execute("SELECT unified.refresh_materialized_views()")
    default_rows = conn.execute("SELECT count(*) FROM unified.event_metric_events_default").fetchone()
    counts = conn.execute(
        sql.SQL("SELECT (SELECT count(*) FROM unified.event_metric_events), {}").format(
            sql.SQL(" + ").join(
                sql.SQL("(SELECT count(*) FROM {})").format(sql.Identifier(BENCH_SCHEMA, t)) for t in TYPES
            )
        )
    ).fetchone()
    if counts != (events, events) or default_rows != (0,):
        raise AssertionError(f"expected {events} events in each design, none in the default partition: {counts}")


STORAGE = """
SELECT count(*) FILTER (WHERE c.relkind IN ('r', 'p')),
       count(*) FILTER (WHERE c.relkind IN ('r', 'p')) + coalesce(sum(index_count), 0)
           + count(*) FILTER (WHERE c.reltoastrelid <> 0) * 2,
       coalesce(sum(pg_relation_size(c.oid)), 0),
       coalesce(sum(pg_table_size(c.oid) - pg_relation_size(c.oid)), 0),
       coalesce(sum(pg_indexes_size(c.oid)), 0),
       coalesce(sum(pg_total_relation_size(c.oid)), 0)
  FROM pg_class c
 CROSS JOIN LATERAL (SELECT count(*) AS index_count FROM pg_index i WHERE i.indrelid = c.oid) AS i
 WHERE c.oid = ANY(%s)
"""


def storage(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, ...]]:
    """Per design: tables, relations (tables, indexes, TOAST tables and theirs), heap, TOAST + maps, indexes, total."""
    unified = [
        row[0] for row in conn.execute("SELECT relid::oid FROM pg_partition_tree('unified.event_metric_events')")
    ]
    per_type = [
        row[0]
        for row in conn.execute(
            "SELECT c.oid FROM pg_class c WHERE c.relnamespace = %s::regnamespace AND c.relkind = 'r'",
            (BENCH_SCHEMA,),
        )
    ]
    return {
        design: tuple(int(value) for value in conn.execute(STORAGE, (oids,)).fetchone() or ())
        for design, oids in (("unified", unified), ("per_type", per_type))
    }


# What the migrations create, counted in the migrated database (before this script adds anything):
# the seed's "8 indexes, 3 materialized views, 3 functions, 2 triggers" against the catalog.
INVENTORY = {
    "indexes on unified.event_metric_events (primary key + secondary)": (
        "SELECT count(*), string_agg(indexrelid::regclass::text, ', ' ORDER BY indexrelid::regclass::text)"
        " FROM pg_index WHERE indrelid = 'unified.event_metric_events'::regclass"
    ),
    "its partitions at migration (month -1 to +3, default), each with those indexes": (
        "SELECT count(*), string_agg(relid::text, ', ' ORDER BY relid::text)"
        " FROM pg_partition_tree('unified.event_metric_events') WHERE isleaf"
    ),
    "indexes on public.sessions": (
        "SELECT count(*), string_agg(indexrelid::regclass::text, ', ' ORDER BY indexrelid::regclass::text)"
        " FROM pg_index WHERE indrelid = 'public.sessions'::regclass"
    ),
    "materialized views (each with one unique index)": (
        "SELECT count(*), string_agg(schemaname || '.' || matviewname, ', ' ORDER BY matviewname) FROM pg_matviews"
    ),
    "plain views of the schema": (
        "SELECT count(*), coalesce(string_agg(schemaname || '.' || viewname, ', '), '')"
        " FROM pg_views WHERE schemaname IN ('public', 'unified', 'auth')"
    ),
    "functions in unified, auth, public": (
        "SELECT count(*), string_agg(n.nspname || '.' || p.proname, ', ' ORDER BY n.nspname, p.proname)"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname IN ('public', 'unified', 'auth')"
    ),
    "triggers (declared; a partition's clone not counted)": (
        "SELECT count(*), string_agg(t.tgrelid::regclass || ': ' || t.tgname, ', ' ORDER BY t.tgname)"
        " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal AND NOT c.relispartition"
    ),
    "tables with row-level security (partitions not counted)": (
        "SELECT count(*), string_agg(oid::regclass::text, ', ' ORDER BY oid::regclass::text)"
        " FROM pg_class WHERE relrowsecurity AND NOT relispartition"
    ),
    "row-level security policies": (
        "SELECT count(*), string_agg(tablename || ': ' || policyname, ', ' ORDER BY tablename, policyname)"
        " FROM pg_policies"
    ),
}


def inventory(conn: psycopg.Connection[Any]) -> list[Figure]:
    figures = []
    for label, query in INVENTORY.items():
        count, names = conn.execute(query).fetchone() or (0, "")
        figures.append(Figure(f"schema: {label}", int(count), f"({names})"))
    return figures


def per_type_queries(select: str, tail: str) -> list[sql.Composed]:
    return [sql.SQL(select + " FROM {} " + tail).format(sql.Identifier(BENCH_SCHEMA, table)) for table in TYPES]


def union_all(queries: list[sql.Composed], tail: str = "") -> sql.Composed:
    return (
        sql.SQL("SELECT * FROM (")
        + sql.SQL(" UNION ALL ").join(sql.SQL("({})").format(query) for query in queries)
        + sql.SQL(") AS u " + tail)
    )


# Each read: the five queries (one per table, combined in Python), the same five in one UNION ALL,
# one query on the unified table, and the materialized view that precomputes it where there is one.
RECENT_WINDOW = "WHERE event_timestamp >= %(now)s - interval '24 hours' AND event_timestamp <= %(now)s"
ERROR_WINDOW = (
    "WHERE severity IN ('error', 'critical') AND event_timestamp >= %(now)s - interval '168 hours'"
    " AND event_timestamp <= %(now)s"
)
PERF_WINDOW = "WHERE event_timestamp >= %(now)s - interval '1 hour' AND event_timestamp <= %(now)s"
RECENT_LIMIT = 100


def reads() -> dict[str, dict[str, Any]]:
    recent_tail = f"{RECENT_WINDOW} ORDER BY event_timestamp DESC, id LIMIT {RECENT_LIMIT}"
    errors_tail = f"{ERROR_WINDOW} GROUP BY 1, 2, 3, 4"
    perf_tail = f"{PERF_WINDOW} GROUP BY 1, 2"
    session_tail = "WHERE session_id = %(session)s ORDER BY event_timestamp DESC, id"
    return {
        "recent events across all types (24 h, newest 100)": {
            "select": f"SELECT {RECENT_COLUMNS}",
            "tail": recent_tail,
            "combine": lambda rows: sorted(rows, key=lambda r: (-r[1].timestamp(), r[0]))[:RECENT_LIMIT],
            "union_tail": f"ORDER BY event_timestamp DESC, id LIMIT {RECENT_LIMIT}",
            "view": f"SELECT {RECENT_COLUMNS} FROM unified.mv_recent_events_24h"
            f" ORDER BY event_timestamp DESC, id LIMIT {RECENT_LIMIT}",
        },
        "error summary (7 days, per day, type, source, severity)": {
            "select": f"SELECT {ERROR_GROUPS}, {ERROR_AGGREGATES}",
            "tail": errors_tail,
            "combine": sorted,
            "union_tail": "",
            "view": "SELECT event_day, event_type, source_system, severity, error_count, first_seen_at, last_seen_at"
            " FROM unified.mv_error_summary_7d",
        },
        "performance metrics (1 h, per type and source: count, avg, p95, max)": {
            "select": f"SELECT event_type, source_system, {PERF_AGGREGATES}",
            "tail": perf_tail,
            "combine": sorted,
            "union_tail": "",
            "view": "SELECT event_type, source_system, event_count, avg_duration_ms, p95_duration_ms,"
            " max_duration_ms, avg_response_time_ms, p95_response_time_ms, max_response_time_ms"
            " FROM unified.mv_performance_metrics_1h",
        },
        "one session's events across all types": {
            "select": f"SELECT {RECENT_COLUMNS}",
            "tail": session_tail,
            "combine": lambda rows: sorted(rows, key=lambda r: (-r[1].timestamp(), r[0])),
            "union_tail": "ORDER BY event_timestamp DESC, id",
            "view": None,
        },
    }


def ways_of(
    conn: psycopg.Connection[Any], read: dict[str, Any], params: dict[str, Any]
) -> dict[str, Callable[[], Any]]:
    """Each way of one read, each returning its rows in one order, so that the ways can be checked to agree."""
    five = per_type_queries(read["select"], read["tail"])
    union = union_all(five, read["union_tail"])
    unified = sql.SQL(read["select"] + " FROM unified.event_metric_events " + read["tail"])
    combine = read["combine"]

    def five_queries() -> Any:
        rows: list[Any] = []
        for query in five:
            rows += conn.execute(query, params).fetchall()
        return combine(rows)

    ways: dict[str, Callable[[], Any]] = {
        "5 queries": five_queries,
        "5 tables, 1 UNION ALL": lambda: combine(conn.execute(union, params).fetchall()),
        "unified, 1 query": lambda: combine(conn.execute(unified, params).fetchall()),
    }
    if read["view"] is not None:
        ways["materialized view"] = lambda: combine(conn.execute(read["view"]).fetchall())
    return ways


def comparable(rows: Any) -> Any:
    """Rows with floats rounded (percentile_cont in a view and in a query may differ in the last bit)."""
    return [tuple(round(float(v), 6) if isinstance(v, float) else v for v in row) for row in rows]


def time_ways(ways: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each way, the ways taking turns in every round (a load change hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            started = time.perf_counter()
            for _ in range(calls):
                way()
            samples[name].append((time.perf_counter() - started) / calls)
    return samples


def measure(server: TemporaryPostgres, events: int, rounds: int, calls: int, *, with_inventory: bool) -> list[Figure]:
    databases = TestDatabases(server)
    databases.create_template()
    try:
        dsn = server.dsn(databases.create_clone())
        # Mid-month, whatever today is: a time window in the unified table scans its month's partition, whose
        # size depends on the day of the month (no index of the table leads with event_timestamp).
        now = datetime.now(UTC).replace(day=15, hour=12, minute=0, second=0, microsecond=0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema = inventory(conn)
            conn.execute("SELECT unified.set_clock(%s)", (now,))  # the views' windows end where the queries' do
            create_per_type_tables(conn)
            started = time.perf_counter()
            fill(conn, events, now)
            print(f"{events:,} events in both designs in {time.perf_counter() - started:.0f} s", flush=True)
            sizes = storage(conn)
            session = conn.execute(
                "SELECT session_id FROM unified.event_metric_events WHERE session_id IS NOT NULL"
                " GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
            ).fetchone()
            params = {"now": now, "session": session[0] if session else None}
            figures = [*schema, *storage_figures(events, sizes)] if with_inventory else storage_figures(events, sizes)
            for label, read in reads().items():
                ways = ways_of(conn, read, params)
                answers = {name: comparable(way()) for name, way in ways.items()}
                if any(answer != answers["5 queries"] for answer in answers.values()) or not answers["5 queries"]:
                    raise AssertionError(f"{label}: the ways disagree or find nothing: {answers}")
                samples = time_ways(ways, rounds, calls)
                figures += query_figures(events, label, len(answers["5 queries"]), samples)
            refresh = time_ways(
                {
                    "refresh": lambda: conn.execute("SELECT unified.refresh_materialized_views()"),
                    "recent, 5 queries": ways_of(conn, next(iter(reads().values())), params)["5 queries"],
                },
                rounds,
                1,
            )
            figures.append(
                Figure(
                    f"{events:,}: refresh of the 3 views / the 5 queries of recent events, once",
                    median_ratio(refresh["refresh"], refresh["recent, 5 queries"]),
                    "x",
                )
            )
    finally:
        databases.drop_template()
    return figures


def storage_figures(events: int, sizes: dict[str, tuple[int, ...]]) -> list[Figure]:
    mib = 1024 * 1024
    figures = []
    for design, label in (("unified", "unified (partitioned)"), ("per_type", "5 per-type tables")):
        tables, relations, heap, toast, indexes, total = sizes[design]
        figures += [
            Figure(f"{events:,}: {label}: tables / all relations", tables, f"/ {relations:,} relations"),
            Figure(f"{events:,}: {label}: heap", heap / mib, "MiB"),
            Figure(f"{events:,}: {label}: TOAST + free space and visibility maps", toast / mib, "MiB"),
            Figure(f"{events:,}: {label}: indexes", indexes / mib, "MiB"),
            Figure(f"{events:,}: {label}: total", total / mib, "MiB"),
        ]
    ratio = sizes["unified"][5] / sizes["per_type"][5]
    return [
        *figures,
        Figure(
            f"{events:,}: total size, unified / 5 tables",
            ratio,
            "x",
            "the seed: <= 0.2",
            ratio <= 0.2,
        ),
    ]


def query_figures(events: int, label: str, rows: int, samples: dict[str, list[float]]) -> list[Figure]:
    base = samples["5 queries"]
    figures = [Figure(f"{events:,}: {label} ({rows:,} rows): 5 queries", statistics.median(base) * 1000, "ms")]
    for name, timed in samples.items():
        if name != "5 queries":
            ratio = median_ratio(timed, base)
            figures.append(
                Figure(
                    f"{events:,}: {label}: {name} / 5 queries (time)",
                    ratio,
                    "x",
                    "the seed: <= 0.4",
                    ratio <= 0.4,
                )
            )
    union = samples["5 tables, 1 UNION ALL"]
    figures.append(
        Figure(
            f"{events:,}: {label}: unified, 1 query / 5 tables, 1 UNION ALL (time: the schema alone)",
            median_ratio(samples["unified, 1 query"], union),
            "x",
        )
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 events, fewer rounds; print only")
    parser.add_argument("--events", nargs="+", type=int, help="these numbers of events; print only")
    args = parser.parse_args()
    sizes = args.events or ([100_000] if args.quick else [100_000, 1_000_000])
    rounds, calls = (5, 3) if args.quick else (15, 5)
    load_at_start = os.getloadavg()[0]
    server = start_server(None)
    try:
        figures = [
            figure
            for events in sizes
            for figure in measure(server, events, rounds, calls, with_inventory=events == sizes[0])
        ]
    finally:
        server.stop()
    header = (
        f"Written by `python benchmarks/claims.py` on {time.strftime('%Y-%m-%d')}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores; PostgreSQL {server.version}; schema version {latest_version()}; cluster on tmpfs. "
        f"{rounds} rounds of {calls} calls of each way, the ways taking turns; a ratio is the median of the "
        f"per-round ratios. 1-minute load average {load_at_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end."
    )
    table = "\n".join(["| measure | value | target |", "|---|---|---|", *(f.line() for f in figures)])
    report = f"{header}\n\n{table}\n"
    print(report)
    if not args.quick and not args.events:
        # Section 8 replaced (or added): what precedes it is run.py's, what follows it is kept.
        text = RESULTS.read_text()
        start = text.find(f"\n### {SECTION}. ")
        before = text if start < 0 else text[: start + 1]
        after = sections_from(SECTION + 1)
        section = f"### {SECTION}. The seed's claims: unified table against five per-type tables\n\n{report}"
        RESULTS.write_text(before.rstrip("\n") + "\n\n" + section + (f"\n{after}" if after else ""))


if __name__ == "__main__":
    main()
