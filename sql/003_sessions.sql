-- 003_sessions.sql
-- public.sessions: the session store used by pytest_exai_sessions.
--
-- Depends on 002 (schema unified). Idempotent: safe to run any number of times.

CREATE SCHEMA IF NOT EXISTS unified;

-- Generic "touch updated_at" trigger function (the original schema referenced one
-- without ever defining it).
CREATE OR REPLACE FUNCTION unified.set_updated_at() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $fn$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$fn$;

-- Triggers fire without an EXECUTE check; nobody needs to call this directly.
REVOKE ALL ON FUNCTION unified.set_updated_at() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION unified.set_updated_at() TO service_role;

CREATE TABLE IF NOT EXISTS public.sessions (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id         text        NOT NULL,
    session_data       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    session_state      text        NOT NULL DEFAULT 'active',
    user_id            text,
    user_type          text        NOT NULL DEFAULT 'human',
    ip_address         inet,
    user_agent         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    last_activity_at   timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz,
    request_count      bigint      NOT NULL DEFAULT 0,
    total_duration_ms  bigint      NOT NULL DEFAULT 0,
    metadata           jsonb       NOT NULL DEFAULT '{"schema_version": 1}'::jsonb,
    CONSTRAINT sessions_session_id_key UNIQUE (session_id),
    CONSTRAINT sessions_session_id_length_check
        CHECK (char_length(session_id) BETWEEN 1 AND 255),
    CONSTRAINT sessions_session_state_check
        CHECK (session_state IN ('active', 'inactive', 'expired')),
    CONSTRAINT sessions_user_type_check
        CHECK (user_type IN ('human', 'agent', 'system')),
    CONSTRAINT sessions_request_count_check
        CHECK (request_count >= 0),
    CONSTRAINT sessions_total_duration_ms_check
        CHECK (total_duration_ms >= 0),
    CONSTRAINT sessions_session_data_object_check
        CHECK (jsonb_typeof(session_data) = 'object'),
    CONSTRAINT sessions_metadata_object_check
        CHECK (jsonb_typeof(metadata) = 'object')
);

COMMENT ON TABLE public.sessions IS
    'Persistent sessions of pytest_exai_sessions (one row per session_id)';

-- CREATE TABLE IF NOT EXISTS silently keeps a same-named table of another shape (for
-- example one left by the old schema); the Python store would then fail much later
-- and far less clearly. Check the columns it relies on now.
DO $guard$
DECLARE
    v_missing text;
BEGIN
    SELECT string_agg(req.col, ', ' ORDER BY req.ord)
      INTO v_missing
      FROM unnest(ARRAY[
               'id', 'session_id', 'session_data', 'session_state', 'user_id', 'user_type',
               'ip_address', 'user_agent', 'created_at', 'updated_at', 'last_activity_at',
               'expires_at', 'request_count', 'total_duration_ms', 'metadata'
           ]) WITH ORDINALITY AS req(col, ord)
     WHERE NOT EXISTS (
               SELECT 1
                 FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = 'public.sessions'::regclass
                  AND a.attname = req.col
                  AND a.attnum > 0
                  AND NOT a.attisdropped);
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'public.sessions exists but lacks column(s): %', v_missing
            USING HINT = 'It is probably left over from an older schema: rename or migrate it, then re-run the migrations.';
    END IF;
END
$guard$;

-- Deny by default from the very first commit: 005 adds grants and policies, and if a
-- later file failed the table must not be left readable.
ALTER TABLE public.sessions ENABLE ROW LEVEL SECURITY;

-- Expiry sweeps and "active sessions" listings filter on state and idle time.
CREATE INDEX IF NOT EXISTS sessions_state_last_activity_idx
    ON public.sessions (session_state, last_activity_at);
CREATE INDEX IF NOT EXISTS sessions_user_id_idx
    ON public.sessions (user_id)
    WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS sessions_expires_at_idx
    ON public.sessions (expires_at)
    WHERE expires_at IS NOT NULL;

-- Drop + create rather than CREATE OR REPLACE TRIGGER: also replaces a same-named
-- trigger of an older schema, on every PostgreSQL version this supports.
DROP TRIGGER IF EXISTS sessions_set_updated_at ON public.sessions;
CREATE TRIGGER sessions_set_updated_at
    BEFORE UPDATE ON public.sessions
    FOR EACH ROW EXECUTE FUNCTION unified.set_updated_at();
