-- 009_session_versions.sql
-- Row versions for compare-and-set, and a live-session count that several replicas can
-- agree on.
--
-- public.sessions.version starts at 1 and every write of a row adds one (the store's
-- statements do it, not a trigger: the hot path stays one cheap statement). Existing rows
-- get 1: ADD COLUMN with a constant default is a catalog-only change, no table rewrite.
--
-- unified.reserve_session_slot(cap, stale_before, now) is what a manager creating a session
-- calls in the same INSERT: it serializes creations (a transaction-scoped advisory lock,
-- released at the INSERT's commit) and counts live sessions, at most cap of them, so the
-- cost is bounded by the limit, not by the table. VOLATILE on purpose: its count then sees
-- every creation committed before the lock was granted, which the INSERT's own snapshot,
-- taken before it waited, would miss.
--
-- Depends on 003 and 007. Idempotent: safe to run any number of times.

ALTER TABLE public.sessions
    ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 1;

DO $version_check$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                    WHERE conrelid = 'public.sessions'::regclass
                      AND conname = 'sessions_version_check') THEN
        ALTER TABLE public.sessions
            ADD CONSTRAINT sessions_version_check CHECK (version >= 1);
    END IF;
END
$version_check$;

COMMENT ON COLUMN public.sessions.version IS
    'Starts at 1; every write of the row adds 1 (compare-and-set: update ... WHERE version = expected)';

CREATE OR REPLACE FUNCTION unified.reserve_session_slot(
    p_cap bigint, p_stale_before timestamptz, p_now timestamptz
) RETURNS boolean
    LANGUAGE plpgsql
    VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $fn$
DECLARE
    v_live bigint;
BEGIN
    -- One lock for every creator of this database: the count and the INSERT that follows
    -- it are one step for all replicas. The key is fixed: hashtext of the function's name.
    PERFORM pg_advisory_xact_lock(hashtext('unified.reserve_session_slot'));
    -- The same liveness rule as the store's (pytest_exai_sessions.store._LIVE).
    SELECT count(*) INTO v_live
      FROM (SELECT 1
              FROM public.sessions s
             WHERE s.session_state = 'active'
               AND s.last_activity_at >= p_stale_before
               AND (s.expires_at IS NULL OR s.expires_at > p_now)
             LIMIT p_cap) AS live;
    RETURN v_live < p_cap;
END
$fn$;

COMMENT ON FUNCTION unified.reserve_session_slot(bigint, timestamptz, timestamptz) IS
    'True when fewer than cap sessions are live; holds a lock that serializes session creation until commit';

-- EXECUTE stays with PUBLIC: whichever role the application writes sessions as calls it, and
-- it runs with the caller's rights (it counts only the rows row-level security shows them).
