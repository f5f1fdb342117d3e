-- 007_clock_everywhere.sql
-- Every "now" of the schema reads unified.clock_now(): column defaults and triggers too.
--
-- 002-004 already take partition creation, retention and the materialized views'
-- windows from unified.clock_now(); the timestamp defaults and the updated_at triggers
-- still called now(), so a test that moved the database's clock (the unified.clock
-- setting) got events stamped with the real time, routed to the real month, and
-- updated_at values from another era than everything else. Without the setting
-- clock_now() is now(), so nothing changes in production.
--
-- A new file rather than edits of 002/003: applied migrations must never change.
-- Depends on 002 and 003. Idempotent: safe to run any number of times.

CREATE OR REPLACE FUNCTION unified.set_updated_at() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $fn$
BEGIN
    NEW.updated_at := unified.clock_now();
    RETURN NEW;
END
$fn$;

-- Same body as in 002 except for the clock. CREATE OR REPLACE keeps owner and grants.
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
        NEW.updated_at := unified.clock_now();
    END IF;

    RETURN NEW;
END
$fn$;

-- Defaults: setting them is a catalog-only change (no table rewrite). On the partitioned
-- parent it recurses to every partition; create_monthly_partition copies them (LIKE ...
-- INCLUDING DEFAULTS) into partitions created later.
ALTER TABLE unified.event_metric_events
    ALTER COLUMN event_timestamp SET DEFAULT unified.clock_now(),
    ALTER COLUMN created_at      SET DEFAULT unified.clock_now(),
    ALTER COLUMN updated_at      SET DEFAULT unified.clock_now();

ALTER TABLE public.sessions
    ALTER COLUMN created_at       SET DEFAULT unified.clock_now(),
    ALTER COLUMN updated_at       SET DEFAULT unified.clock_now(),
    ALTER COLUMN last_activity_at SET DEFAULT unified.clock_now();
