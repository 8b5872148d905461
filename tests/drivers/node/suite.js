// node-postgres through pgveil. One JSON line per case; exit 1 on failure.
// Usage: node suite.js HOST PORT DBNAME ROLE
const { Client } = require('pg');
const Cursor = require('pg-cursor');
const { to: copyTo, from: copyFrom } = require('pg-copy-streams');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');

const [host, port, database, role] = process.argv.slice(2);
const masked = role !== 'dba';
const SSN = masked ? '***-**-0001' : '900-00-0001';
const results = [];
const check = (cond, what) => { if (!cond) throw new Error(JSON.stringify(what)); };

async function run(name, modes, fn) {
  try {
    const detail = await fn();
    results.push({ case: name, modes, ok: true, detail: detail || '' });
  } catch (e) {
    results.push({ case: name, modes, ok: false, detail: String(e && e.message) });
  }
}

(async () => {
  const client = new Client({ host, port: Number(port), database, user: role, password: `${role}_pw`, ssl: false });
  await client.connect();
  await run('simple query', 'simple', async () => {
    const r = await client.query('SELECT ssn FROM customers WHERE id = 1');
    check(r.rows[0].ssn === SSN, r.rows[0]);
  });
  await run('parameterised query', 'extended', async () => {
    const r = await client.query('SELECT ssn, balance, birth_date FROM customers WHERE id = $1', [1]);
    check(r.rows[0].ssn === SSN, r.rows[0]);
  });
  await run('named prepared statement reused', 'extended, prepared', async () => {
    for (let i = 1; i < 20; i++) {
      const r = await client.query({ name: 'byid', text: 'SELECT ssn FROM customers WHERE id = $1', values: [i] });
      check(r.rows.length === 1, i);
    }
  });
  await run('pg-cursor', 'extended, portal', async () => {
    const cursor = client.query(new Cursor('SELECT id, ssn FROM customers WHERE id <= 10 ORDER BY id'));
    const first = await cursor.read(3);
    const rest = await cursor.read(100);
    await cursor.close();
    check(first.length + rest.length === 10 && first[0].ssn === SSN, first[0]);
  });
  await run('pg-copy-streams', 'copy in/out', async () => {
    await client.query('BEGIN');
    await pipeline(Readable.from(['1\t4.5\tnodecopy\n']), client.query(copyFrom('COPY orders (customer_id, amount, status) FROM STDIN')));
    let out = '';
    await pipeline(client.query(copyTo("COPY (SELECT status FROM orders WHERE status = 'nodecopy') TO STDOUT")),
      new Writable({ write(chunk, _e, cb) { out += chunk; cb(); } }));
    await client.query('ROLLBACK');
    check(out.trim() === 'nodecopy', out);
  });
  await run('blocked statement is an ordinary SQL error', 'simple, extended', async () => {
    if (!masked) return 'exempt: not blocked';
    for (const q of ['SELECT id FROM customers ORDER BY ssn', { text: 'SELECT id FROM customers WHERE ssn = $1', values: ['x'] }]) {
      try { await client.query(q); throw new Error('not blocked'); } catch (e) { check(e.code === '42501', e.message); }
    }
    const r = await client.query('SELECT 1 AS one');
    check(r.rows[0].one === 1, 'usable');
  });
  await client.end();
  const version = require('pg/package.json').version;
  for (const r of results) console.log(JSON.stringify({ ...r, driver: 'node-postgres', version, role }));
  process.exit(results.every((r) => r.ok) ? 0 : 1);
})().catch((e) => { console.error(e); process.exit(2); });
