-- 001_supabase_compat.sql
-- Supabase compatibility layer for vanilla PostgreSQL 14+.
--
-- Supabase ships the roles anon / authenticated / service_role and the functions
-- auth.uid(), auth.role(), auth.jwt(). The later migrations (policies, grants) refer
-- to them, so on a vanilla server they must exist. On a real Supabase database they
-- already exist and are owned by Supabase's own roles: this file then creates and
-- replaces NOTHING (every object is created only when missing; no CREATE OR REPLACE).
--
-- Idempotent: safe to run any number of times, alone or after the other files.

-- Roles are cluster-wide, so two processes migrating two different databases of the
-- same cluster can race here: the pg_roles check avoids the common case and the
-- exception handler absorbs the race (CREATE ROLE then fails with duplicate_object,
-- or with unique_violation when both inserts hit pg_authid at the same moment).
DO $compat_roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        BEGIN
            CREATE ROLE anon NOLOGIN NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            RAISE NOTICE 'role anon was created concurrently; keeping it';
        END;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        BEGIN
            CREATE ROLE authenticated NOLOGIN NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            RAISE NOTICE 'role authenticated was created concurrently; keeping it';
        END;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        BEGIN
            CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                RAISE NOTICE 'role service_role was created concurrently; keeping it';
            -- Only a superuser may grant BYPASSRLS. A non-superuser runner still gets a
            -- working service_role: 005 gives it an explicit allow-all policy anyway.
            WHEN insufficient_privilege THEN
                BEGIN
                    CREATE ROLE service_role NOLOGIN NOINHERIT;
                    RAISE NOTICE 'created service_role without BYPASSRLS (runner is not superuser)';
                EXCEPTION WHEN duplicate_object OR unique_violation THEN
                    RAISE NOTICE 'role service_role was created concurrently; keeping it';
                END;
        END;
    END IF;
END
$compat_roles$;

-- Checked with to_regnamespace instead of CREATE SCHEMA IF NOT EXISTS because the latter
-- checks CREATE privilege on the database before noticing that the schema exists.
DO $compat_schema$
BEGIN
    IF to_regnamespace('auth') IS NULL THEN
        CREATE SCHEMA auth;
        GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
    END IF;
END
$compat_schema$;

-- The auth.* functions mirror Supabase's: PostgREST puts the JWT claims into
-- transaction-local settings. After a SET LOCAL / set_config(..., true) transaction
-- ends, current_setting(..., true) returns '' (not NULL), and ''::jsonb / ''::uuid
-- would raise, hence nullif() around every read. Created only when missing so that a
-- real Supabase (or any existing) definition is never replaced.
DO $compat_auth_functions$
BEGIN
    -- Without USAGE on an existing schema auth (owned by someone else, as on Supabase)
    -- nothing in it can even be looked up, and 005's policies could not be created.
    IF NOT has_schema_privilege('auth', 'USAGE') THEN
        RAISE EXCEPTION 'role % has no USAGE privilege on schema auth', current_user
            USING HINT = 'Grant it (GRANT USAGE ON SCHEMA auth TO ' || quote_ident(current_user)
                         || '): the row-level security policies call auth.uid().';
    END IF;

    IF to_regprocedure('auth.uid()') IS NULL THEN
        CREATE FUNCTION auth.uid() RETURNS uuid
            LANGUAGE sql STABLE
            AS $fn$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim.sub', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
                )::uuid
            $fn$;
        COMMENT ON FUNCTION auth.uid() IS
            'Supabase-compatible stand-in (pytest_exai_sessions): subject of the current request JWT, or NULL';
        GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated, service_role;
    END IF;

    IF to_regprocedure('auth.role()') IS NULL THEN
        CREATE FUNCTION auth.role() RETURNS text
            LANGUAGE sql STABLE
            AS $fn$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim.role', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
                )::text
            $fn$;
        COMMENT ON FUNCTION auth.role() IS
            'Supabase-compatible stand-in (pytest_exai_sessions): role claim of the current request JWT, or NULL';
        GRANT EXECUTE ON FUNCTION auth.role() TO anon, authenticated, service_role;
    END IF;

    IF to_regprocedure('auth.jwt()') IS NULL THEN
        CREATE FUNCTION auth.jwt() RETURNS jsonb
            LANGUAGE sql STABLE
            AS $fn$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')
                )::jsonb
            $fn$;
        COMMENT ON FUNCTION auth.jwt() IS
            'Supabase-compatible stand-in (pytest_exai_sessions): claims of the current request JWT, or NULL';
        GRANT EXECUTE ON FUNCTION auth.jwt() TO anon, authenticated, service_role;
    END IF;
END
$compat_auth_functions$;

-- RLS policies (005) call auth.uid() as the authenticated role, which therefore needs
-- USAGE on the schema and EXECUTE on the function. On Supabase these grants already
-- exist and the migrating role does not own schema auth, so (beyond the explicit
-- grants made above on objects created here) a grant is issued only where a
-- privilege is actually missing (no "no privileges were granted" warnings),
-- and a grant the migrating role may not give is reported instead of aborting.
DO $compat_auth_grants$
DECLARE
    v_role text;
    v_func text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT has_schema_privilege(v_role, 'auth', 'USAGE') THEN
            BEGIN
                EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', 'auth', v_role);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE WARNING 'cannot grant USAGE on schema auth to %: %', v_role, SQLERRM;
            END;
        END IF;

        FOREACH v_func IN ARRAY ARRAY['uid', 'role', 'jwt'] LOOP
            IF NOT has_function_privilege(v_role, format('%I.%I()', 'auth', v_func), 'EXECUTE') THEN
                BEGIN
                    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.%I() TO %I', 'auth', v_func, v_role);
                EXCEPTION WHEN insufficient_privilege THEN
                    RAISE WARNING 'cannot grant EXECUTE on auth.%() to %: %', v_func, v_role, SQLERRM;
                END;
            END IF;
        END LOOP;
    END LOOP;
END
$compat_auth_grants$;
