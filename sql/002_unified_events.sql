-- 002_unified_events.sql
-- Schema "unified": a movable clock, the month-partitioned event table, its
-- partition maintenance functions and its metadata trigger.
--
-- Depends on 001 (roles). Idempotent: safe to run any number of times.

CREATE SCHEMA IF NOT EXISTS unified;

-- ---------------------------------------------------------------------------
-- Clock
-- ---------------------------------------------------------------------------
-- Every time window below (partitions, retention, materialized views) reads "now"
-- through this function so that tests can move the database's notion of time with
-- set_config('unified.clock', '<timestamptz>', false) instead of waiting for it.
-- Give the setting an explicit UTC offset: a bare timestamp is read in the session's
-- TimeZone. nullif: a setting reset at transaction end reads back as ''.
CREATE OR REPLACE FUNCTION unified.clock_now() RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $fn$
        SELECT coalesce(nullif(current_setting('unified.clock', true), '')::timestamptz, now())
    $fn$;

COMMENT ON FUNCTION unified.clock_now() IS
    'now(), unless the setting unified.clock holds a timestamptz (used by tests to move time)';

-- Views and policies may call it as any role.
GRANT EXECUTE ON FUNCTION unified.clock_now() TO PUBLIC;

-- ---------------------------------------------------------------------------
-- Event table
-- ---------------------------------------------------------------------------
-- The original schema declared monthly partitions of a table that was never declared
-- partitioned. A plain table of this name left over from it would make every
-- statement below fail obscurely, so refuse it with a clear message instead.
DO $guard$
DECLARE
    v_kind "char";
BEGIN
    SELECT c.relkind INTO v_kind
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'unified' AND c.relname = 'event_metric_events';
    IF FOUND AND v_kind <> 'p' THEN
        RAISE EXCEPTION 'unified.event_metric_events exists but is not a partitioned table (relkind %)', v_kind
            USING HINT = 'It is probably left over from the old monitoring schema: rename or drop it, then re-run the migrations.';
    END IF;
END
$guard$;

CREATE TABLE IF NOT EXISTS unified.event_metric_events (
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
    event_type        text        NOT NULL,
    event_category    text        NOT NULL,
    source_system     text        NOT NULL,
    event_timestamp   timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    event_data        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    event_metrics     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    event_metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    severity          text        DEFAULT 'info',
    status            text        DEFAULT 'completed',
    priority          integer     DEFAULT 0,
    retry_count       integer     NOT NULL DEFAULT 0,
    max_retries       integer     NOT NULL DEFAULT 3,
    resolved_at       timestamptz,
    duration_ms       bigint,
    data_size_bytes   bigint,
    response_time_ms  bigint,
    correlation_id    text,
    user_id           text,
    session_id        text,
    CONSTRAINT event_metric_events_severity_check
        CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
    CONSTRAINT event_metric_events_status_check
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'resolved', 'cancelled')),
    CONSTRAINT event_metric_events_priority_check
        CHECK (priority BETWEEN 0 AND 10),
    CONSTRAINT event_metric_events_retry_count_check
        CHECK (retry_count >= 0),
    CONSTRAINT event_metric_events_max_retries_check
        CHECK (max_retries >= 0),
    CONSTRAINT event_metric_events_duration_ms_check
        CHECK (duration_ms IS NULL OR duration_ms >= 0),
    CONSTRAINT event_metric_events_data_size_bytes_check
        CHECK (data_size_bytes IS NULL OR data_size_bytes >= 0),
    CONSTRAINT event_metric_events_response_time_ms_check
        CHECK (response_time_ms IS NULL OR response_time_ms >= 0),
    -- A unique constraint on a partitioned table must contain the partition key.
    CONSTRAINT event_metric_events_pkey PRIMARY KEY (id, event_timestamp)
) PARTITION BY RANGE (event_timestamp);

COMMENT ON TABLE unified.event_metric_events IS
    'Monitoring events, RANGE-partitioned by UTC month of event_timestamp (partitions *_yYYYYmMM plus a DEFAULT partition)';

-- Deny by default from the very first commit: 005 adds grants and policies, and if a
-- later file failed the table must not be left readable.
ALTER TABLE unified.event_metric_events ENABLE ROW LEVEL SECURITY;

-- Catch-all partition: an insert with any timestamp (years back, far future, a month
-- nobody created yet) must never fail for lack of a partition.
CREATE TABLE IF NOT EXISTS unified.event_metric_events_default
    PARTITION OF unified.event_metric_events DEFAULT;

-- Partitions do not inherit the parent's RLS or ACL: accessed directly they would be
-- governed by their own. RLS without policies plus no grants keeps direct access to
-- the table owner; everyone else goes through the parent and its policies.
ALTER TABLE unified.event_metric_events_default ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE unified.event_metric_events_default FROM PUBLIC, anon, authenticated;

-- Secondary indexes, declared on the parent so that every partition (present and
-- future, including attached ones) gets them.
CREATE INDEX IF NOT EXISTS event_metric_events_type_ts_idx
    ON unified.event_metric_events (event_type, event_timestamp DESC);
CREATE INDEX IF NOT EXISTS event_metric_events_category_ts_idx
    ON unified.event_metric_events (event_category, event_timestamp DESC);
CREATE INDEX IF NOT EXISTS event_metric_events_source_ts_idx
    ON unified.event_metric_events (source_system, event_timestamp DESC);
CREATE INDEX IF NOT EXISTS event_metric_events_session_ts_idx
    ON unified.event_metric_events (session_id, event_timestamp DESC)
    WHERE session_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS event_metric_events_user_ts_idx
    ON unified.event_metric_events (user_id, event_timestamp DESC)
    WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS event_metric_events_correlation_idx
    ON unified.event_metric_events (correlation_id)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS event_metric_events_severity_status_ts_idx
    ON unified.event_metric_events (severity, status, event_timestamp DESC);
CREATE INDEX IF NOT EXISTS event_metric_events_event_data_gin_idx
    ON unified.event_metric_events USING gin (event_data jsonb_path_ops);

-- ---------------------------------------------------------------------------
-- Metadata trigger
-- ---------------------------------------------------------------------------
-- The original schema attached a trigger to a function it never defined. This one
-- normalises the three jsonb columns (explicit NULL becomes {} before NOT NULL is
-- checked) and stamps standard metadata underneath the caller's own keys.
CREATE OR REPLACE FUNCTION unified.standardize_event_metadata() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $fn$
BEGIN
    NEW.event_data     := coalesce(NEW.event_data, '{}'::jsonb);
    NEW.event_metrics  := coalesce(NEW.event_metrics, '{}'::jsonb);
    NEW.event_metadata := coalesce(NEW.event_metadata, '{}'::jsonb);

    IF jsonb_typeof(NEW.event_data) <> 'object' THEN
        RAISE EXCEPTION 'event_data must be a JSON object, got a JSON %', jsonb_typeof(NEW.event_data)
            USING ERRCODE = 'check_violation';
    END IF;
    IF jsonb_typeof(NEW.event_metrics) <> 'object' THEN
        RAISE EXCEPTION 'event_metrics must be a JSON object, got a JSON %', jsonb_typeof(NEW.event_metrics)
            USING ERRCODE = 'check_violation';
    END IF;
    IF jsonb_typeof(NEW.event_metadata) <> 'object' THEN
        RAISE EXCEPTION 'event_metadata must be a JSON object, got a JSON %', jsonb_typeof(NEW.event_metadata)
            USING ERRCODE = 'check_violation';
    END IF;

    -- Standard keys first so that the caller's keys win on conflict.
    NEW.event_metadata := jsonb_build_object('schema_version', 1, 'source_system', NEW.source_system)
                          || NEW.event_metadata;

    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;

    RETURN NEW;
END
$fn$;

-- Triggers fire without an EXECUTE check; nobody needs to call this directly.
REVOKE ALL ON FUNCTION unified.standardize_event_metadata() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION unified.standardize_event_metadata() TO service_role;

-- Drop + create (not CREATE OR REPLACE TRIGGER) so that a same-named trigger left by
-- the old schema, pointing at a missing function, is replaced on every PostgreSQL 14+.
-- A row trigger on the parent is cloned to every partition, present and future.
DROP TRIGGER IF EXISTS event_metric_events_standardize_metadata ON unified.event_metric_events;
CREATE TRIGGER event_metric_events_standardize_metadata
    BEFORE INSERT OR UPDATE ON unified.event_metric_events
    FOR EACH ROW EXECUTE FUNCTION unified.standardize_event_metadata();

-- ---------------------------------------------------------------------------
-- Partition maintenance
-- ---------------------------------------------------------------------------
-- Month arithmetic is done on UTC wall-clock timestamps (timestamp without time zone)
-- and converted back with AT TIME ZONE 'UTC': adding '1 month' to a timestamptz would
-- be computed in the session's TimeZone and shift the boundaries.
--
-- SECURITY DEFINER so that service_role (granted EXECUTE) can maintain partitions
-- without owning the table; search_path is pinned because of that, and every name
-- below is schema-qualified.
CREATE OR REPLACE FUNCTION unified.create_monthly_partition(p_month timestamptz DEFAULT unified.clock_now())
    RETURNS text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_schema      constant text := 'unified';
    v_parent      constant text := 'event_metric_events';
    v_default     constant text := 'event_metric_events_default';
    v_month_local timestamp;    -- first instant of the month, UTC wall clock
    v_from        timestamptz;
    v_to          timestamptz;
    v_from_lit    text;
    v_to_lit      text;
    v_name        text;
    v_rel         regclass;
    v_parent_oid  oid;
    v_role        text;
    v_moved       bigint;
    v_has_default boolean;
BEGIN
    IF p_month IS NULL OR NOT isfinite(p_month) THEN
        RAISE EXCEPTION 'create_monthly_partition: month must be a finite timestamptz, got %', p_month
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_month_local := date_trunc('month', p_month AT TIME ZONE 'UTC');
    v_from := v_month_local AT TIME ZONE 'UTC';
    v_to   := (v_month_local + interval '1 month') AT TIME ZONE 'UTC';
    v_name := format('%s_y%sm%s', v_parent, to_char(v_month_local, 'YYYY'), to_char(v_month_local, 'MM'));
    -- ISO 8601 with an explicit offset parses the same under any DateStyle/TimeZone.
    v_from_lit := to_char(v_month_local, 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00';
    v_to_lit   := to_char(v_month_local + interval '1 month', 'YYYY-MM-DD"T"HH24:MI:SS') || '+00:00';

    v_parent_oid := to_regclass(format('%I.%I', v_schema, v_parent));
    IF v_parent_oid IS NULL THEN
        RAISE EXCEPTION 'create_monthly_partition: %.% does not exist', v_schema, v_parent;
    END IF;

    -- Fast path without any lock: already attached.
    v_rel := to_regclass(format('%I.%I', v_schema, v_name));
    IF v_rel IS NOT NULL AND EXISTS (SELECT 1 FROM pg_catalog.pg_inherits
                                      WHERE inhrelid = v_rel AND inhparent = v_parent_oid) THEN
        RETURN v_name;
    END IF;

    -- SHARE ROW EXCLUSIVE on the parent conflicts with itself, so two callers are
    -- serialised: the second waits here and then finds the partition attached by the
    -- first (each plpgsql statement sees fresh catalog state under READ COMMITTED).
    -- It also makes concurrent INSERT/UPDATE/DELETE wait for the few statements below
    -- instead of failing: a writer that had already routed a row to the default
    -- partition would otherwise get "violates partition constraint" once the new range
    -- is attached. Readers are not blocked.
    EXECUTE format('LOCK TABLE %I.%I IN SHARE ROW EXCLUSIVE MODE', v_schema, v_parent);

    v_rel := to_regclass(format('%I.%I', v_schema, v_name));
    IF v_rel IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_inherits
                    WHERE inhrelid = v_rel AND inhparent = v_parent_oid) THEN
            RETURN v_name;
        END IF;
        RAISE EXCEPTION 'create_monthly_partition: %.% exists but is not a partition of %.%',
                        v_schema, v_name, v_schema, v_parent
            USING HINT = 'Attach or drop that table by hand.';
    END IF;

    -- Rows of this month may already sit in the default partition, and attaching a
    -- range that the default partition still holds rows for fails. So: build the new
    -- table standalone, move those rows into it, then attach it. The default partition
    -- is locked first so no new row for this month can slip into it in between.
    v_has_default := to_regclass(format('%I.%I', v_schema, v_default)) IS NOT NULL;
    IF v_has_default THEN
        EXECUTE format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE', v_schema, v_default);
    END IF;

    -- INCLUDING CONSTRAINTS: ATTACH requires the parent's CHECK constraints on the child.
    EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   v_schema, v_name, v_schema, v_parent);

    v_moved := 0;
    IF v_has_default THEN
        EXECUTE format(
            'WITH moved AS (DELETE FROM %I.%I WHERE event_timestamp >= $1 AND event_timestamp < $2 RETURNING *) '
            'INSERT INTO %I.%I SELECT * FROM moved',
            v_schema, v_default, v_schema, v_name)
            USING v_from, v_to;
        GET DIAGNOSTICS v_moved = ROW_COUNT;
    END IF;

    -- ATTACH builds the parent's indexes and clones its row triggers onto the new table.
    EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                   v_schema, v_parent, v_schema, v_name, v_from_lit, v_to_lit);

    -- Same reasoning as for the default partition above: only the owner may touch a
    -- partition directly; everyone else goes through the parent and its RLS policies.
    EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', v_schema, v_name);
    EXECUTE format('REVOKE ALL ON TABLE %I.%I FROM PUBLIC', v_schema, v_name);
    FOR v_role IN
        SELECT rolname FROM pg_catalog.pg_roles WHERE rolname IN ('anon', 'authenticated')
    LOOP
        EXECUTE format('REVOKE ALL ON TABLE %I.%I FROM %I', v_schema, v_name, v_role);
    END LOOP;

    IF v_moved > 0 THEN
        RAISE NOTICE 'create_monthly_partition: moved % row(s) from %.% into %.%',
                     v_moved, v_schema, v_default, v_schema, v_name;
    END IF;

    RETURN v_name;
END
$fn$;

COMMENT ON FUNCTION unified.create_monthly_partition(timestamptz) IS
    'Creates (if missing) the partition for the UTC month containing p_month, moving its rows out of the default partition; returns the partition name';

CREATE OR REPLACE FUNCTION unified.cleanup_old_partitions(p_retention_days integer DEFAULT 90)
    RETURNS SETOF text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_schema     constant text := 'unified';
    v_parent     constant text := 'event_metric_events';
    v_default    constant text := 'event_metric_events_default';
    v_parent_oid oid;
    v_cutoff     timestamptz;
    v_part       record;
    v_deleted    bigint;
BEGIN
    IF p_retention_days IS NULL OR p_retention_days < 0 THEN
        RAISE EXCEPTION 'cleanup_old_partitions: retention must be a non-negative number of days, got %',
                        p_retention_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_parent_oid := to_regclass(format('%I.%I', v_schema, v_parent));
    IF v_parent_oid IS NULL THEN
        RAISE EXCEPTION 'cleanup_old_partitions: %.% does not exist', v_schema, v_parent;
    END IF;

    -- Whole UTC days, independent of the session's TimeZone (DST would shift by an hour).
    v_cutoff := ((unified.clock_now() AT TIME ZONE 'UTC') - make_interval(days => p_retention_days))
                AT TIME ZONE 'UTC';

    -- Same lock as create_monthly_partition, so the two never interleave.
    EXECUTE format('LOCK TABLE %I.%I IN SHARE ROW EXCLUSIVE MODE', v_schema, v_parent);

    -- Partitions are found through pg_inherits (only real partitions of this parent) and
    -- their month is parsed from the name with a regexp, never by character offsets.
    -- The default partition never matches the pattern and is excluded explicitly too.
    FOR v_part IN
        SELECT c.relname AS name,
               (make_timestamp(m[1]::integer, m[2]::integer, 1, 0, 0, 0) + interval '1 month')
                   AT TIME ZONE 'UTC' AS range_end
          FROM pg_catalog.pg_inherits i
          JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          CROSS JOIN LATERAL regexp_match(c.relname, '^event_metric_events_y([0-9]{4,})m(0[1-9]|1[0-2])$') AS m
         WHERE i.inhparent = v_parent_oid
           AND n.nspname = v_schema
           AND c.relname <> v_default
           AND pg_catalog.pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
         ORDER BY 2, 1
    LOOP
        IF v_part.range_end <= v_cutoff THEN
            EXECUTE format('DROP TABLE %I.%I', v_schema, v_part.name);
            RETURN NEXT v_part.name;
        END IF;
    END LOOP;

    -- Retention also applies to rows that landed in the default partition (months
    -- without a partition of their own); those rows are deleted, the partition stays.
    v_deleted := 0;
    IF to_regclass(format('%I.%I', v_schema, v_default)) IS NOT NULL THEN
        EXECUTE format('DELETE FROM %I.%I WHERE event_timestamp < $1', v_schema, v_default)
            USING v_cutoff;
        GET DIAGNOSTICS v_deleted = ROW_COUNT;
    END IF;
    IF v_deleted > 0 THEN
        RAISE NOTICE 'cleanup_old_partitions: deleted % row(s) older than % from %.%',
                     v_deleted, v_cutoff, v_schema, v_default;
    END IF;

    RETURN;
END
$fn$;

COMMENT ON FUNCTION unified.cleanup_old_partitions(integer) IS
    'Drops monthly partitions whose whole range ends at or before clock_now() - retention, deletes older rows from the default partition; returns the dropped partition names';

-- SECURITY DEFINER functions that can create or drop tables: never callable by PUBLIC.
REVOKE ALL ON FUNCTION unified.create_monthly_partition(timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION unified.cleanup_old_partitions(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION unified.create_monthly_partition(timestamptz) FROM anon, authenticated;
REVOKE ALL ON FUNCTION unified.cleanup_old_partitions(integer) FROM anon, authenticated;
GRANT EXECUTE ON FUNCTION unified.create_monthly_partition(timestamptz) TO service_role;
GRANT EXECUTE ON FUNCTION unified.cleanup_old_partitions(integer) TO service_role;

-- Partitions relative to the clock (never hard-coded months): one month back, the
-- current month, three months ahead. Existing ones are left as they are.
DO $initial_partitions$
DECLARE
    v_this_month timestamp := date_trunc('month', unified.clock_now() AT TIME ZONE 'UTC');
    v_offset     integer;
BEGIN
    FOR v_offset IN -1..3 LOOP
        PERFORM unified.create_monthly_partition(
            (v_this_month + make_interval(months => v_offset)) AT TIME ZONE 'UTC');
    END LOOP;
END
$initial_partitions$;
