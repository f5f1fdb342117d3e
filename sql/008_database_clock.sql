-- 008_database_clock.sql
-- The database's test clock lives in a one-row table, unified.clock, which every
-- connection reads at its next statement.
--
-- Until now a moved clock was the unified.clock setting, set per database with
-- ALTER DATABASE ... SET. A backend reads such a setting only when it starts, so a
-- connection that was already open (an application's pool, a pooler's server
-- connection) kept the old time, and setting it took a superuser. A row is seen by
-- every connection at once, through a pooler too, and needs only a grant on the table.
--
-- clock_now(): the session setting unified.clock when set (a per-connection or SET LOCAL
-- override, and what the migration runner uses to apply the schema as of an instant),
-- else the row of unified.clock, else now(). Without either, nothing changes in production.
--
-- Depends on 002 and 005 (roles, RLS model). Idempotent: safe to run any number of times.

CREATE TABLE IF NOT EXISTS unified.clock (
    -- At most one row: the primary key admits only true.
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    frozen_at timestamptz NOT NULL CHECK (isfinite(frozen_at))
);

COMMENT ON TABLE unified.clock IS
    'Test clock: while it holds a row, unified.clock_now() returns frozen_at instead of now(). Empty in production.';

-- Every role reads it (clock_now() runs as the caller, in defaults, triggers and views);
-- only the owner, or a role granted the writes, moves it. Grants are the whole story:
-- there is one row and no one's own rows, so row-level security would add nothing.
REVOKE ALL ON TABLE unified.clock FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE unified.clock TO PUBLIC;

-- Still a plain SQL function without SET clauses, so the planner can inline it.
CREATE OR REPLACE FUNCTION unified.clock_now() RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $fn$
        SELECT coalesce(
            nullif(current_setting('unified.clock', true), '')::timestamptz,
            (SELECT c.frozen_at FROM unified.clock c),
            now()
        )
    $fn$;

COMMENT ON FUNCTION unified.clock_now() IS
    'now(), unless the setting unified.clock or the row of the table unified.clock holds a timestamp (tests move time with them)';
