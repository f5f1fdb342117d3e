-- What production held before migration 009 (session versions): two sessions an app
-- wrote through schema 008, and an order of the app's own that refers to one of them.
INSERT INTO public.sessions (session_id, session_data, user_id, user_type, created_at, updated_at,
                             last_activity_at, request_count, total_duration_ms)
VALUES
    ('checkout-7', '{"cart": ["sku-1", "sku-2"], "step": "payment"}', 'user-7', 'human',
     '2026-06-01T11:00:00Z', '2026-06-01T11:55:00Z', '2026-06-01T11:55:00Z', 12, 840),
    ('agent-3', '{"task": "reindex"}', NULL, 'agent',
     '2026-06-01T11:30:00Z', '2026-06-01T11:50:00Z', '2026-06-01T11:50:00Z', 3, 90);

CREATE TABLE public.orders (
    order_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id text NOT NULL REFERENCES public.sessions (session_id),
    total_cents integer NOT NULL
);

INSERT INTO public.orders (session_id, total_cents) VALUES ('checkout-7', 4200);
