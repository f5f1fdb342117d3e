-- 010_scheduled_maintenance.sql
-- The maintenance the schema needs to keep working, and its schedule:
--   unified.maintenance_settings          one row: retention in days, months of partitions ahead
--   unified.create_upcoming_partitions()  this month's and the next months' partitions
--   unified.apply_retention()             drops partitions past the configured retention
--   unified.refresh_materialized_views()  every view of the schema, CONCURRENTLY where it can
--   unified.schedule_maintenance_jobs()   named pg_cron jobs calling the three, when pg_cron is here
--
-- The pg_cron jobs and `exai-sessions maintain` call the same functions and read the same
-- settings row at run time, so changing the retention is one UPDATE for both.
--
-- The extension is never created here: on Supabase enabling pg_cron is the project owner's
-- choice, and elsewhere it needs a superuser. Without it the file schedules nothing and
-- does not fail. Installed later, its jobs come with the next `exai-sessions maintain`
-- or with SELECT * FROM unified.schedule_maintenance_jobs().
--
-- Depends on 002 and 004. Idempotent: safe to run any number of times.

CREATE TABLE IF NOT EXISTS unified.maintenance_settings (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    retention_days integer NOT NULL DEFAULT 90 CHECK (retention_days >= 0),
    months_ahead   integer NOT NULL DEFAULT 3 CHECK (months_ahead BETWEEN 0 AND 24)
);

COMMENT ON TABLE unified.maintenance_settings IS
    'One row read by the maintenance functions at run time: retention_days (partitions older are dropped), months_ahead (partitions created ahead of the current month)';

INSERT INTO unified.maintenance_settings (only_row) VALUES (true) ON CONFLICT (only_row) DO NOTHING;

-- Settings of the owner and service_role only; RLS without policies keeps the API roles out
-- even if someone grants them the table.
ALTER TABLE unified.maintenance_settings ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE unified.maintenance_settings FROM PUBLIC, anon, authenticated;
GRANT SELECT, UPDATE ON TABLE unified.maintenance_settings TO service_role;
DROP POLICY IF EXISTS maintenance_settings_service_role ON unified.maintenance_settings;
CREATE POLICY maintenance_settings_service_role ON unified.maintenance_settings
    TO service_role USING (true) WITH CHECK (true);

-- The partitions of this UTC month and of the months_ahead after it; returns those it
-- created (none when they all exist). The parent's lock (the one create_monthly_partition
-- takes) is taken first, so that of two callers at once only one reports a partition.
CREATE OR REPLACE FUNCTION unified.create_upcoming_partitions() RETURNS SETOF text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_this_month timestamp := date_trunc('month', unified.clock_now() AT TIME ZONE 'UTC');
    v_ahead      integer;
    v_offset     integer;
    v_month      timestamp;
    v_name       text;
BEGIN
    SELECT s.months_ahead INTO v_ahead FROM unified.maintenance_settings s;
    v_ahead := coalesce(v_ahead, 3);
    LOCK TABLE unified.event_metric_events IN SHARE ROW EXCLUSIVE MODE;
    FOR v_offset IN 0..v_ahead LOOP
        v_month := v_this_month + make_interval(months => v_offset);
        v_name := format('event_metric_events_y%sm%s', to_char(v_month, 'YYYY'), to_char(v_month, 'MM'));
        -- Only an attached partition counts: a table of that name that is not one is left to
        -- create_monthly_partition, which refuses it with a hint.
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_inherits
                               WHERE inhrelid = to_regclass(format('%I.%I', 'unified', v_name))
                                 AND inhparent = 'unified.event_metric_events'::regclass);
        RETURN NEXT unified.create_monthly_partition(v_month AT TIME ZONE 'UTC');
    END LOOP;
END
$fn$;

COMMENT ON FUNCTION unified.create_upcoming_partitions() IS
    'Creates the partitions of the current UTC month and of the maintenance_settings.months_ahead next ones; returns those created';

-- Retention as configured in unified.maintenance_settings; returns the dropped partitions.
CREATE OR REPLACE FUNCTION unified.apply_retention() RETURNS SETOF text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_days integer;
BEGIN
    SELECT s.retention_days INTO v_days FROM unified.maintenance_settings s;
    RETURN QUERY SELECT dropped FROM unified.cleanup_old_partitions(coalesce(v_days, 90)) AS dropped;
END
$fn$;

COMMENT ON FUNCTION unified.apply_retention() IS
    'Drops the partitions older than maintenance_settings.retention_days (and such rows of the default partition); returns the dropped partitions';

-- 004's function refreshed its three views CONCURRENTLY by name. This body refreshes every
-- materialized view of the schema, found in the catalog, and uses CONCURRENTLY only where
-- PostgreSQL allows it: a populated view with a unique index on plain columns and without a
-- WHERE. A view restored from a schema-only dump is not populated, and CONCURRENTLY would fail
-- on it. Same signature as in 004, so re-running 004 on its own still works (it brings back
-- its own body, which refreshes the same three views).
CREATE OR REPLACE FUNCTION unified.refresh_materialized_views() RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_view record;
BEGIN
    FOR v_view IN
        SELECT c.relname AS name,
               c.relispopulated AND EXISTS (
                   SELECT 1 FROM pg_catalog.pg_index i
                    WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
                      AND i.indpred IS NULL AND i.indexprs IS NULL) AS concurrently
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'unified' AND c.relkind = 'm'
         ORDER BY c.relname
    LOOP
        IF v_view.concurrently THEN
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %I.%I', 'unified', v_view.name);
        ELSE
            EXECUTE format('REFRESH MATERIALIZED VIEW %I.%I', 'unified', v_view.name);
        END IF;
    END LOOP;
END
$fn$;

COMMENT ON FUNCTION unified.refresh_materialized_views() IS
    'Refreshes every unified materialized view, CONCURRENTLY (readers never blocked) where it is populated and has a unique index';

-- The pg_cron jobs, named so that they are found again. A job that exists is kept as it is
-- (same jobid, and a schedule changed with cron.alter_job stays changed); a missing one is
-- scheduled. Returns each job with what was done: 'scheduled', 'kept', or why it was not.
-- No rows when pg_cron is not installed in this database.
--
-- SECURITY DEFINER: the jobs always belong to the schema's owner, whoever calls this
-- (migration runner, `maintain` as service_role), so there is one set of jobs, run as the
-- role that owns what they maintain. On Supabase that is postgres, which has USAGE on cron.
CREATE OR REPLACE FUNCTION unified.schedule_maintenance_jobs()
    RETURNS TABLE (job_name text, schedule text, command text, job_id bigint, action text)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_job record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_cron') THEN
        RETURN;
    END IF;
    -- Two callers at once (two replicas' `maintain`) take turns: the second finds the jobs.
    PERFORM pg_advisory_xact_lock(hashtextextended('exai-sessions: schedule maintenance jobs', 0));
    FOR v_job IN
        SELECT * FROM (VALUES
            ('exai-sessions-partitions', '7 0 * * *', 'SELECT unified.create_upcoming_partitions()'),
            ('exai-sessions-retention', '17 0 * * *', 'SELECT unified.apply_retention()'),
            ('exai-sessions-refresh-views', '*/5 * * * *', 'SELECT unified.refresh_materialized_views()')
        ) AS j(name, schedule, command)
    LOOP
        job_name := v_job.name;
        schedule := v_job.schedule;
        command := v_job.command;
        job_id := NULL;
        IF NOT has_schema_privilege('cron', 'USAGE') THEN
            action := format('not scheduled: role %s has no USAGE on schema cron', current_user);
            RETURN NEXT;
            CONTINUE;
        END IF;
        -- cron.job shows each role its own jobs only (row-level security).
        SELECT j.jobid, j.schedule, j.command INTO job_id, schedule, command
          FROM cron.job j WHERE j.jobname = v_job.name AND j.username = current_user;
        IF FOUND THEN
            action := 'kept';
        ELSE
            schedule := v_job.schedule;
            command := v_job.command;
            job_id := cron.schedule(v_job.name, v_job.schedule, v_job.command);
            action := 'scheduled';
        END IF;
        RETURN NEXT;
    END LOOP;
END
$fn$;

COMMENT ON FUNCTION unified.schedule_maintenance_jobs() IS
    'Schedules the missing exai-sessions-* pg_cron jobs (partitions, retention, views) when pg_cron is installed in this database; keeps existing ones';

-- SECURITY DEFINER functions that create, drop or schedule: never callable by PUBLIC.
REVOKE ALL ON FUNCTION unified.create_upcoming_partitions() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION unified.apply_retention() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION unified.schedule_maintenance_jobs() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION unified.create_upcoming_partitions() TO service_role;
GRANT EXECUTE ON FUNCTION unified.apply_retention() TO service_role;
GRANT EXECUTE ON FUNCTION unified.schedule_maintenance_jobs() TO service_role;

SELECT job_name, job_id, action FROM unified.schedule_maintenance_jobs();
