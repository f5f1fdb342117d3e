-- 004_materialized_views.sql
-- Dashboards over unified.event_metric_events, refreshed without blocking readers.
--
-- Depends on 002. Idempotent: safe to run any number of times.
--
-- REFRESH ... CONCURRENTLY needs a UNIQUE index on plain columns, without WHERE,
-- covering every row; each view below has one, and its key columns are non-null by
-- construction (group keys wrapped in coalesce, the day derived from a NOT NULL
-- column) so that the index really identifies one row: NULLs never compare equal. Time windows come from unified.clock_now() at refresh time and
-- every name is schema-qualified: since PostgreSQL 17 REFRESH runs with a restricted
-- search_path.

-- Materialized views are derived data. One of the same name but another shape (left
-- by the old schema) would keep CREATE ... IF NOT EXISTS from fixing it, so it is
-- dropped and rebuilt; any other kind of object in the way is an error.
DO $reset_stale_views$
DECLARE
    v_view     record;
    v_kind     "char";
    v_columns  text[];
BEGIN
    FOR v_view IN
        SELECT * FROM (VALUES
            ('mv_recent_events_24h', ARRAY['id', 'event_timestamp', 'event_type', 'event_category',
                                           'source_system', 'severity', 'status', 'session_id',
                                           'user_id', 'duration_ms']),
            ('mv_error_summary_7d', ARRAY['event_day', 'event_type', 'source_system', 'severity',
                                          'error_count', 'first_seen_at', 'last_seen_at']),
            ('mv_performance_metrics_1h', ARRAY['event_type', 'source_system', 'event_count',
                                                'avg_duration_ms', 'p95_duration_ms', 'max_duration_ms',
                                                'avg_response_time_ms', 'p95_response_time_ms',
                                                'max_response_time_ms', 'window_start', 'window_end'])
        ) AS v(name, columns)
    LOOP
        SELECT c.relkind,
               array(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                      ORDER BY a.attnum)
          INTO v_kind, v_columns
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'unified' AND c.relname = v_view.name;
        CONTINUE WHEN NOT FOUND;

        IF v_kind <> 'm' THEN
            RAISE EXCEPTION 'unified.% exists but is not a materialized view (relkind %)', v_view.name, v_kind;
        END IF;
        IF v_columns IS DISTINCT FROM v_view.columns THEN
            RAISE NOTICE 'rebuilding unified.%: its columns % differ from the expected %',
                         v_view.name, v_columns, v_view.columns;
            EXECUTE format('DROP MATERIALIZED VIEW %I.%I', 'unified', v_view.name);
        END IF;
    END LOOP;
END
$reset_stale_views$;

-- Row-level feed of the last 24 hours; future-dated events are not "recent".
CREATE MATERIALIZED VIEW IF NOT EXISTS unified.mv_recent_events_24h AS
SELECT e.id,
       e.event_timestamp,
       e.event_type,
       e.event_category,
       e.source_system,
       e.severity,
       e.status,
       e.session_id,
       e.user_id,
       e.duration_ms
  FROM unified.event_metric_events e
 WHERE e.event_timestamp >= unified.clock_now() - interval '24 hours'
   AND e.event_timestamp <= unified.clock_now()
WITH DATA;

-- (id, event_timestamp) is the table's primary key, hence unique per row.
CREATE UNIQUE INDEX IF NOT EXISTS mv_recent_events_24h_uidx
    ON unified.mv_recent_events_24h (id, event_timestamp);

-- Errors per UTC day. 168 hours rather than '7 days': interval days on timestamptz
-- follow the session's TimeZone (DST), hours do not.
CREATE MATERIALIZED VIEW IF NOT EXISTS unified.mv_error_summary_7d AS
SELECT (e.event_timestamp AT TIME ZONE 'UTC')::date AS event_day,
       coalesce(e.event_type, '')                  AS event_type,
       coalesce(e.source_system, '')               AS source_system,
       coalesce(e.severity, '')                    AS severity,
       count(*)                                    AS error_count,
       min(e.event_timestamp)                      AS first_seen_at,
       max(e.event_timestamp)                      AS last_seen_at
  FROM unified.event_metric_events e
 WHERE e.severity IN ('error', 'critical')
   AND e.event_timestamp >= unified.clock_now() - interval '168 hours'
   AND e.event_timestamp <= unified.clock_now()
 GROUP BY 1, 2, 3, 4
WITH DATA;

CREATE UNIQUE INDEX IF NOT EXISTS mv_error_summary_7d_uidx
    ON unified.mv_error_summary_7d (event_day, event_type, source_system, severity);

CREATE MATERIALIZED VIEW IF NOT EXISTS unified.mv_performance_metrics_1h AS
SELECT coalesce(e.event_type, '')                                             AS event_type,
       coalesce(e.source_system, '')                                          AS source_system,
       count(*)                                                               AS event_count,
       round(avg(e.duration_ms), 2)                                           AS avg_duration_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms)            AS p95_duration_ms,
       max(e.duration_ms)                                                     AS max_duration_ms,
       round(avg(e.response_time_ms), 2)                                      AS avg_response_time_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY e.response_time_ms)       AS p95_response_time_ms,
       max(e.response_time_ms)                                                AS max_response_time_ms,
       -- The window actually covered, so readers can tell how fresh the numbers are.
       unified.clock_now() - interval '1 hour'                                AS window_start,
       unified.clock_now()                                                    AS window_end
  FROM unified.event_metric_events e
 WHERE e.event_timestamp >= unified.clock_now() - interval '1 hour'
   AND e.event_timestamp <= unified.clock_now()
 GROUP BY 1, 2
WITH DATA;

CREATE UNIQUE INDEX IF NOT EXISTS mv_performance_metrics_1h_uidx
    ON unified.mv_performance_metrics_1h (event_type, source_system);

-- REFRESH requires owning the view: SECURITY DEFINER lets service_role refresh them.
CREATE OR REPLACE FUNCTION unified.refresh_materialized_views() RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY unified.mv_recent_events_24h;
    REFRESH MATERIALIZED VIEW CONCURRENTLY unified.mv_error_summary_7d;
    REFRESH MATERIALIZED VIEW CONCURRENTLY unified.mv_performance_metrics_1h;
END
$fn$;

COMMENT ON FUNCTION unified.refresh_materialized_views() IS
    'Refreshes the unified.mv_* views CONCURRENTLY (readers are never blocked)';

REVOKE ALL ON FUNCTION unified.refresh_materialized_views() FROM PUBLIC;
REVOKE ALL ON FUNCTION unified.refresh_materialized_views() FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION unified.refresh_materialized_views() TO service_role;

-- Materialized views cannot have RLS: they would show every user's events to anyone
-- allowed to read them. Only service_role may.
REVOKE ALL ON TABLE unified.mv_recent_events_24h FROM PUBLIC, anon, authenticated;
REVOKE ALL ON TABLE unified.mv_error_summary_7d FROM PUBLIC, anon, authenticated;
REVOKE ALL ON TABLE unified.mv_performance_metrics_1h FROM PUBLIC, anon, authenticated;
GRANT SELECT ON TABLE unified.mv_recent_events_24h TO service_role;
GRANT SELECT ON TABLE unified.mv_error_summary_7d TO service_role;
GRANT SELECT ON TABLE unified.mv_performance_metrics_1h TO service_role;
