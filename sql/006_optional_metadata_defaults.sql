-- 006_optional_metadata_defaults.sql
-- Give metadata columns of optional application tables the same versioned default as
-- public.sessions.metadata.
--
-- These tables belong to applications that may or may not share the database (the
-- original schema ALTERed them unconditionally and failed where they were missing).
-- Only tables that exist and have a jsonb "metadata" column are touched; anything
-- else is skipped without error. Idempotent: safe to run any number of times.

DO $metadata_defaults$
DECLARE
    c_schema  constant text  := 'public';
    c_default constant jsonb := '{"schema_version": 1}'::jsonb;
    v_table   text;
    v_type    text;
    v_current text;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['conversations', 'messages', 'files'] LOOP
        SELECT format_type(a.atttypid, a.atttypmod), pg_catalog.pg_get_expr(d.adbin, d.adrelid)
          INTO v_type, v_current
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
          LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
         WHERE n.nspname = c_schema
           AND c.relname = v_table
           AND c.relkind IN ('r', 'p')          -- tables only, not views
           AND a.attname = 'metadata'
           AND a.attnum > 0
           AND NOT a.attisdropped;

        IF NOT FOUND THEN
            CONTINUE;                           -- no such table, or no metadata column
        END IF;

        IF v_type <> 'jsonb' THEN
            RAISE NOTICE 'skipping %.%.metadata: type is %, not jsonb', c_schema, v_table, v_type;
            CONTINUE;
        END IF;

        -- Skip when already set: ALTER TABLE takes an ACCESS EXCLUSIVE lock on what
        -- may be a busy application table.
        IF v_current = format('%L::jsonb', c_default::text) THEN
            CONTINUE;
        END IF;

        BEGIN
            EXECUTE format('ALTER TABLE %I.%I ALTER COLUMN %I SET DEFAULT %L::jsonb',
                           c_schema, v_table, 'metadata', c_default::text);
        EXCEPTION WHEN insufficient_privilege THEN
            -- On Supabase such a table may belong to another role; not ours to force.
            RAISE WARNING 'cannot set the default of %.%.metadata: not the table owner', c_schema, v_table;
        END;
    END LOOP;
END
$metadata_defaults$;
