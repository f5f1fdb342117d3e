-- 005_row_level_security.sql
-- Grants and row-level security for public.sessions and unified.event_metric_events.
--
-- Depends on 001-003. Idempotent: safe to run any number of times.
--
-- Model (as on Supabase): the API roles get ordinary table privileges and RLS decides
-- which rows they reach.
--   service_role   everything (it also has BYPASSRLS; the policy makes that explicit
--                  and covers a service_role created without it)
--   authenticated  reads only its own rows (user_id = auth.uid()), writes nothing
--   anon           no policy at all: reads return no rows, writes are refused
-- Every policy names its role: a policy without TO applies to PUBLIC.

-- RLS before grants: even run statement by statement, this file never leaves a table
-- granted to the API roles without RLS.
ALTER TABLE public.sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE unified.event_metric_events ENABLE ROW LEVEL SECURITY;

-- Partitions are reachable by name and do not inherit the parent's RLS or grants.
-- create_monthly_partition already locks new ones down; this covers partitions that
-- were created or attached some other way.
DO $lock_down_partitions$
DECLARE
    v_part record;
BEGIN
    FOR v_part IN
        SELECT n.nspname AS schema_name, c.relname AS table_name
          FROM pg_catalog.pg_inherits i
          JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE i.inhparent = 'unified.event_metric_events'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', v_part.schema_name, v_part.table_name);
        EXECUTE format('REVOKE ALL ON TABLE %I.%I FROM PUBLIC, anon, authenticated',
                       v_part.schema_name, v_part.table_name);
    END LOOP;
END
$lock_down_partitions$;

-- ---------------------------------------------------------------------------
-- Grants
-- ---------------------------------------------------------------------------
GRANT USAGE ON SCHEMA unified TO anon, authenticated, service_role;

GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.sessions TO anon, authenticated, service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE unified.event_metric_events TO anon, authenticated, service_role;

-- The identity column's sequence needs no privilege for plain inserts (identity values
-- are drawn without a permission check), but Supabase grants it and code that reads
-- currval()/setval() expects it.
DO $identity_sequence$
DECLARE
    v_seq record;
BEGIN
    FOR v_seq IN
        SELECT n.nspname AS schema_name, c.relname AS sequence_name
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = pg_catalog.pg_get_serial_sequence('public.sessions', 'id')::regclass
    LOOP
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %I.%I TO service_role',
                       v_seq.schema_name, v_seq.sequence_name);
    END LOOP;
END
$identity_sequence$;

-- EXECUTE on the unified functions: service_role only (also in the files that define
-- them, so no file leaves a window). clock_now() stays callable by everyone because
-- views and policies may use it.
REVOKE ALL ON FUNCTION unified.standardize_event_metadata() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION unified.set_updated_at() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION unified.create_monthly_partition(timestamptz) FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION unified.cleanup_old_partitions(integer) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION unified.standardize_event_metadata() TO service_role;
GRANT EXECUTE ON FUNCTION unified.set_updated_at() TO service_role;
GRANT EXECUTE ON FUNCTION unified.create_monthly_partition(timestamptz) TO service_role;
GRANT EXECUTE ON FUNCTION unified.cleanup_old_partitions(integer) TO service_role;
GRANT EXECUTE ON FUNCTION unified.clock_now() TO PUBLIC;

DO $mv_function_grants$
BEGIN
    -- 004 may be skipped by a deployment that does not want the dashboards.
    IF to_regprocedure('unified.refresh_materialized_views()') IS NOT NULL THEN
        REVOKE ALL ON FUNCTION unified.refresh_materialized_views() FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION unified.refresh_materialized_views() TO service_role;
    END IF;
END
$mv_function_grants$;

-- ---------------------------------------------------------------------------
-- Policies (drop + create: CREATE POLICY has no IF NOT EXISTS / OR REPLACE)
-- ---------------------------------------------------------------------------
-- (select auth.uid()) instead of auth.uid(): evaluated once per statement as an
-- InitPlan rather than once per row.
DROP POLICY IF EXISTS sessions_service_role_all ON public.sessions;
CREATE POLICY sessions_service_role_all ON public.sessions
    AS PERMISSIVE FOR ALL TO service_role
    USING (true) WITH CHECK (true);

DROP POLICY IF EXISTS sessions_authenticated_select_own ON public.sessions;
CREATE POLICY sessions_authenticated_select_own ON public.sessions
    AS PERMISSIVE FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid())::text);

DROP POLICY IF EXISTS event_metric_events_service_role_all ON unified.event_metric_events;
CREATE POLICY event_metric_events_service_role_all ON unified.event_metric_events
    AS PERMISSIVE FOR ALL TO service_role
    USING (true) WITH CHECK (true);

DROP POLICY IF EXISTS event_metric_events_authenticated_select_own ON unified.event_metric_events;
CREATE POLICY event_metric_events_authenticated_select_own ON unified.event_metric_events
    AS PERMISSIVE FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid())::text);

-- Policies are permissive and OR-ed together, so one stray policy for PUBLIC (the old
-- schema created USING (true) policies without a TO clause) would open the table to
-- everyone whatever the policies above say. Such policies are dropped; policies for
-- named roles that someone added on purpose are kept, only reported.
DO $drop_public_policies$
DECLARE
    v_pol record;
BEGIN
    FOR v_pol IN
        SELECT p.schemaname, p.tablename, p.policyname, p.roles
          FROM pg_catalog.pg_policies p
         WHERE (p.schemaname, p.tablename) IN (('public', 'sessions'), ('unified', 'event_metric_events'))
           AND p.policyname NOT IN ('sessions_service_role_all', 'sessions_authenticated_select_own',
                                    'event_metric_events_service_role_all',
                                    'event_metric_events_authenticated_select_own')
    LOOP
        IF 'public' = ANY (v_pol.roles) THEN
            RAISE NOTICE 'dropping policy % on %.%: it applies to PUBLIC',
                         v_pol.policyname, v_pol.schemaname, v_pol.tablename;
            EXECUTE format('DROP POLICY %I ON %I.%I', v_pol.policyname, v_pol.schemaname, v_pol.tablename);
        ELSE
            RAISE NOTICE 'keeping extra policy % on %.% for role(s) %',
                         v_pol.policyname, v_pol.schemaname, v_pol.tablename, v_pol.roles;
        END IF;
    END LOOP;
END
$drop_public_policies$;
