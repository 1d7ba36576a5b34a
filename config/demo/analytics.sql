-- The demo analytics database: raw events and a per-user daily roll-up. Loaded into the
-- `analytics` database; the demo maps both tables there (`tables:` in the config).
-- Every row is computed from its key, so reloading is harmless.

CREATE TABLE IF NOT EXISTS events (
    id         bigserial PRIMARY KEY,
    user_id    bigint,
    kind       text,
    payload    jsonb,
    created_at timestamptz
);
CREATE INDEX IF NOT EXISTS events_user_id ON events (user_id);

CREATE TABLE IF NOT EXISTS user_activity (
    user_id bigint,
    day     date,
    actions int,
    PRIMARY KEY (user_id, day)
);

-- 300 events from the 50 demo users.
INSERT INTO events (id, user_id, kind, payload, created_at)
SELECT i,
       (i * 7) % 50 + 1,
       (ARRAY['login', 'view_balance', 'transfer', 'card_payment', 'logout'])[i % 5 + 1],
       jsonb_build_object('session', i / 5, 'amount', (i * 31) % 500, 'channel',
                          CASE WHEN i % 3 = 0 THEN 'web' ELSE 'mobile' END),
       timestamptz '2025-03-01 00:00:00+00' + i * interval '23 minutes'
FROM generate_series(1, 300) AS i
ON CONFLICT (id) DO NOTHING;
-- Explicit ids above bypass the sequence: move it past them so a plain INSERT gets a new id.
SELECT setval(pg_get_serial_sequence('events', 'id'), (SELECT max(id) FROM events));

-- 7 days of activity for each of the 50 users.
INSERT INTO user_activity (user_id, day, actions)
SELECT u, date '2025-03-01' + d, (u * 13 + d * 7) % 40
FROM generate_series(1, 50) AS u, generate_series(0, 6) AS d
ON CONFLICT (user_id, day) DO NOTHING;
