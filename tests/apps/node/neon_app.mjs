// Neon's serverless driver in HTTP mode, unchanged, pointed at pgfleet's /sql
// (tests/apps/test_node.py). Prints what it got as one JSON line.
import { neon, neonConfig } from "@neondatabase/serverless";

const url = process.env.PGFLEET_URL;          // postgresql://key:secret@127.0.0.1/app
neonConfig.fetchEndpoint = process.env.PGFLEET_SQL_ENDPOINT;  // http://127.0.0.1:<http port>/sql
const sql = neon(url);

const out = {};
const n = 41;
out.tagged = await sql`SELECT ${n}::int + 1 AS answer, ${"it's"}::text AS quoted, now() IS NOT NULL AS ok`;
out.arrays = await sql.query("SELECT $1::int AS a, $2::text AS b", [7, "x"], { arrayMode: true });
await sql`CREATE TABLE IF NOT EXISTS neon_things (id int PRIMARY KEY, name text)`;
await sql`DELETE FROM neon_things`;
out.transaction = await sql.transaction([
  sql`INSERT INTO neon_things VALUES (1, 'one') RETURNING id`,
  sql`INSERT INTO neon_things VALUES (2, 'two') RETURNING id`,
  sql`SELECT count(*)::int AS n FROM neon_things`,
]);
try {
  await sql.transaction([
    sql`INSERT INTO neon_things VALUES (3, 'three')`,
    sql`INSERT INTO neon_things VALUES (1, 'again')`,
  ]);
  out.duplicate = "no error";
} catch (err) {
  out.duplicate = err.code;
}
out.after = await sql`SELECT id FROM neon_things ORDER BY id`;
try {
  await sql`SELECT 1/0`;
} catch (err) {
  out.division = { code: err.code, message: err.message };
}
console.log(JSON.stringify(out));
