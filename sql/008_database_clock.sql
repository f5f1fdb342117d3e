-- 008_database_clock.sql
-- unified.set_clock(p_frozen_at): stop the database's clock at an instant, for every
-- connection at once; unified.set_clock(NULL) lets it follow now() again.
--
-- Until now a moved clock was the unified.clock setting, set per database with
-- ALTER DATABASE ... SET. A backend reads such a setting only when it starts, so a
-- connection that was already open (an application's pool, a pooler's server
-- connection) kept the old time, and setting it took a superuser. set_clock() instead
-- rewrites the body of unified.clock_now() itself: every connection, open or new, sees
-- the new body from its next transaction (cached plans that inlined the old one are
-- invalidated), and it takes only the ownership of clock_now(), which whoever applied
-- the schema has.
--
-- Why the body and not a row in a table: clock_now() is called in column defaults, the
-- updated_at triggers and the views' windows. Reading a table there made every event
-- insert about 40% and every session update about 25% slower, in production too, where
-- no clock is ever set. Both bodies below are as cheap as 002's: an inlined expression.
--
-- The session setting unified.clock still wins on its own connection (SET LOCAL in a
-- test; the migration runner applies the schema as of an instant with it).
--
-- Depends on 002. Idempotent: safe to run any number of times.

CREATE OR REPLACE FUNCTION unified.set_clock(p_frozen_at timestamptz) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_now text := 'now()';
BEGIN
    IF p_frozen_at IS NOT NULL THEN
        IF NOT isfinite(p_frozen_at) THEN
            RAISE EXCEPTION 'set_clock: the clock must be a finite timestamptz, got %', p_frozen_at
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- ISO 8601 with an explicit offset: parsed alike under every DateStyle and TimeZone
        -- of the sessions that will run the body.
        v_now := format('%L::timestamptz',
                        to_char(p_frozen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00');
    END IF;
    -- CREATE OR REPLACE keeps the function's OID, owner, grants and comment, so defaults,
    -- triggers, views and policies that call it are untouched.
    EXECUTE format(
        $def$CREATE OR REPLACE FUNCTION unified.clock_now() RETURNS timestamptz
                 LANGUAGE sql STABLE PARALLEL SAFE
                 AS %L$def$,
        format('SELECT coalesce(nullif(current_setting(%L, true), %L)::timestamptz, %s)', 'unified.clock', '', v_now)
    );
END
$fn$;

COMMENT ON FUNCTION unified.set_clock(timestamptz) IS
    'Freeze unified.clock_now() at an instant for every connection (tests); NULL: follow now() again. Takes the owner of clock_now().';

-- Only the owner of clock_now() can rewrite it anyway; no API role needs to try.
REVOKE ALL ON FUNCTION unified.set_clock(timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION unified.set_clock(timestamptz) FROM anon, authenticated, service_role;

COMMENT ON FUNCTION unified.clock_now() IS
    'now(), unless the setting unified.clock holds a timestamptz or unified.set_clock() froze it (tests move time with them)';
