-- 011_request_ids.sql
-- Exactly-once request counting across a retry: the ids of each session's recent requests.
--
-- A caller whose update_activity ended in CommitUncertain (the connection broke during the
-- COMMIT, or the wait for a synchronous standby was cancelled) cannot know whether the
-- request was counted. Sent again with the same request_id, it is counted only if it was
-- not: public.sessions.recent_request_ids keeps the ids of the session's last 32 counted
-- requests (a retry comes soon after its first try), and the store's UPDATE counts a
-- request only when its id is not among them, in the same statement that appends it. Two
-- replicas sending one id at once are serialized by the row lock: the second re-reads the
-- row the first wrote (READ COMMITTED's recheck) and counts nothing.
--
-- unified.count_new_requests(recent, requests, keep) is that rule, for one request or a
-- batch: requests is a jsonb array of [request_id, duration_ms] pairs; it returns how many
-- of them (and their duration) are new, ignoring an id repeated within the batch, and the
-- ids to keep (the last keep). Requests without an id never come here: they are always counted.
--
-- Depends on 003 and 007. Idempotent: safe to run any number of times.

ALTER TABLE public.sessions
    ADD COLUMN IF NOT EXISTS recent_request_ids text[] NOT NULL DEFAULT '{}';

COMMENT ON COLUMN public.sessions.recent_request_ids IS
    'The ids of the last 32 requests counted with a request_id: a retried id is not counted again';

CREATE OR REPLACE FUNCTION unified.count_new_requests(
    p_recent text[], p_requests jsonb, p_keep integer DEFAULT 32,
    OUT requests bigint, OUT duration_ms bigint, OUT recent text[]
)
    LANGUAGE sql
    IMMUTABLE
    PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $fn$
    WITH given AS (
        -- An id repeated within the batch is one request: its first occurrence.
        SELECT DISTINCT ON (r.request ->> 0) r.request ->> 0 AS request_id,
               (r.request ->> 1)::bigint AS duration_ms, r.n
          FROM jsonb_array_elements(p_requests) WITH ORDINALITY AS r(request, n)
         ORDER BY r.request ->> 0, r.n
    ), fresh AS (
        SELECT g.request_id, g.duration_ms, g.n FROM given g WHERE g.request_id <> ALL (p_recent)
    ), kept AS (
        SELECT p_recent || coalesce((SELECT array_agg(f.request_id ORDER BY f.n) FROM fresh f), '{}') AS ids
    )
    SELECT (SELECT count(*) FROM fresh),
           (SELECT coalesce(sum(f.duration_ms), 0) FROM fresh f)::bigint,
           k.ids[greatest(cardinality(k.ids) - p_keep + 1, 1):]
      FROM kept k
$fn$;

COMMENT ON FUNCTION unified.count_new_requests(text[], jsonb, integer) IS
    'Of [request_id, duration_ms] pairs, those not among recent (how many, their duration) and the last p_keep ids to remember';

-- EXECUTE stays with PUBLIC: it reads no table, only its arguments, and whichever role the
-- application writes sessions as calls it.
