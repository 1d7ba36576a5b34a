// node-postgres (pg) through pgfleet on a sharded fleet that starts empty: what a Node
// application does, printed as JSON for tests/apps/test_node.py to check.
import pg from 'pg';

const url = process.env.PGFLEET_URL;
const out = {};
const client = new pg.Client({ connectionString: url });
await client.connect();

await client.query('CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance int NOT NULL)');

// One multi-row INSERT with parameters (the extended protocol), RETURNING in row order.
const rows = Array.from({ length: 50 }, (_, i) => [50 - i, `o${50 - i}`, 100]);
const values = rows.map((_, i) => `($${3 * i + 1}, $${3 * i + 2}, $${3 * i + 3})`).join(', ');
const inserted = await client.query(`INSERT INTO accounts (id, owner, balance) VALUES ${values} RETURNING id`,
  rows.flat());
out.returning = inserted.rows.map((r) => r.id);

// A transfer between two shards: one transaction, committed in two phases.
await client.query('BEGIN');
await client.query('UPDATE accounts SET balance = balance - 10 WHERE id = $1', [1]);
await client.query('UPDATE accounts SET balance = balance + 10 WHERE id = $1', [3]);
await client.query('COMMIT');

// A named prepared statement, run for keys on both shards.
const get = { name: 'get-account', text: 'SELECT id, owner, balance FROM accounts WHERE id = $1' };
out.one = (await client.query({ ...get, values: [1] })).rows;
out.three = (await client.query({ ...get, values: [3] })).rows;

// Reads merged from both shards.
out.total = (await client.query('SELECT sum(balance) AS total, count(*) AS n FROM accounts')).rows[0];
out.top = (await client.query('SELECT id FROM accounts ORDER BY id DESC LIMIT 3')).rows.map((r) => r.id);

// An error carries its SQLSTATE, and the connection goes on.
try {
  await client.query('INSERT INTO accounts (id, owner, balance) VALUES ($1, $2, $3)', [1, 'dup', 0]);
} catch (e) {
  out.duplicate = e.code;
}
out.after = (await client.query('SELECT 1 AS one')).rows[0].one;

// A pool of connections, queries in parallel.
const pool = new pg.Pool({ connectionString: url, max: 5 });
const answers = await Promise.all(Array.from({ length: 20 }, (_, i) =>
  pool.query('SELECT owner FROM accounts WHERE id = $1', [i + 1])));
out.pooled = answers.map((r) => r.rows[0].owner);
await pool.end();
await client.end();
console.log(JSON.stringify(out));
