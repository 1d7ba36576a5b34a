-- The demo bank (the seeds' Vaelix Bank): users, their accounts and transactions, and the
-- currencies they use. Loaded into the `bank` database of both `primary` and `secondary`.
-- Every row is computed from its id, so two loads give identical databases, and reloading is
-- harmless (CREATE ... IF NOT EXISTS, INSERT ... ON CONFLICT DO NOTHING).

CREATE TABLE IF NOT EXISTS currencies (
    code     char(3) PRIMARY KEY,
    name     text NOT NULL,
    decimals int NOT NULL
);

CREATE TABLE IF NOT EXISTS users (
    id         bigint PRIMARY KEY,
    email      text UNIQUE,
    name       text,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS accounts (
    id         bigint PRIMARY KEY,
    user_id    bigint NOT NULL,
    currency   char(3),
    balance    numeric(14,2),
    updated_at timestamptz
);
CREATE INDEX IF NOT EXISTS accounts_user_id ON accounts (user_id);

CREATE TABLE IF NOT EXISTS transactions (
    id         bigint PRIMARY KEY,
    user_id    bigint,
    account_id bigint,
    amount     numeric(14,2),
    currency   char(3),
    created_at timestamptz,
    updated_at timestamptz
);
CREATE INDEX IF NOT EXISTS transactions_user_id ON transactions (user_id);
CREATE INDEX IF NOT EXISTS transactions_updated_at ON transactions (updated_at);

INSERT INTO currencies (code, name, decimals) VALUES
    ('EUR', 'Euro', 2),
    ('USD', 'US Dollar', 2),
    ('GBP', 'Pound Sterling', 2),
    ('CHF', 'Swiss Franc', 2),
    ('JPY', 'Japanese Yen', 0)
ON CONFLICT (code) DO NOTHING;

-- 50 users (ids 1..50, so the demo tenant key user_id 42 has rows of its own).
INSERT INTO users (id, email, name, created_at, updated_at)
SELECT i,
       format('user%s@vaelix.example', i),
       format('User %s', i),
       timestamptz '2025-01-01 00:00:00+00' + i * interval '1 day',
       timestamptz '2025-01-01 00:00:00+00' + i * interval '1 day' + interval '1 hour'
FROM generate_series(1, 50) AS i
ON CONFLICT (id) DO NOTHING;

-- 60 accounts: every user has one, users 1..10 a second one in another currency.
INSERT INTO accounts (id, user_id, currency, balance, updated_at)
SELECT i,
       (i - 1) % 50 + 1,
       (ARRAY['EUR', 'USD', 'GBP', 'CHF', 'JPY'])[(i - 1) / 50 * 2 + (i - 1) % 5 % 3 + 1],
       round(((i * 7919) % 100000) / 10.0, 2),
       timestamptz '2025-03-01 00:00:00+00' + i * interval '1 hour'
FROM generate_series(1, 60) AS i
ON CONFLICT (id) DO NOTHING;

-- 200 transactions spread over the 60 accounts, positive (credits) and negative (debits).
INSERT INTO transactions (id, user_id, account_id, amount, currency, created_at, updated_at)
SELECT i,
       ((i - 1) % 60) % 50 + 1,
       (i - 1) % 60 + 1,
       round((((i * 104729) % 20001) - 10000) / 100.0, 2),
       (ARRAY['EUR', 'USD', 'GBP', 'CHF', 'JPY'])[((i - 1) % 60) / 50 * 2 + ((i - 1) % 60) % 5 % 3 + 1],
       timestamptz '2025-03-01 00:00:00+00' + i * interval '37 minutes',
       timestamptz '2025-03-01 00:00:00+00' + i * interval '37 minutes'
FROM generate_series(1, 200) AS i
ON CONFLICT (id) DO NOTHING;
