//! The false-block corpus: ordinary application statements give the same results through
//! pgveil as directly, for a masked role and for an exempt one.

use tokio_postgres::SimpleQueryMessage;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::RULES;

/// Statements an application runs that touch no masked value; run in order on one session.
pub(crate) const CORPUS: &[&str] = &[
    "SELECT 1",
    "SELECT now() IS NOT NULL, current_user, version() LIKE 'PostgreSQL%'",
    "SELECT id, name FROM customers ORDER BY id LIMIT 10",
    "SELECT id, name, signup FROM customers WHERE id BETWEEN 5 AND 15 ORDER BY id",
    "SELECT count(*) FROM customers",
    "SELECT count(*), sum(amount), avg(amount)::numeric(10,2), min(amount), max(amount) FROM orders",
    "SELECT status, count(*) FROM orders GROUP BY status ORDER BY status",
    "SELECT status, count(*) FROM orders GROUP BY 1 HAVING count(*) > 10 ORDER BY 2 DESC",
    "SELECT o.id, o.amount, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id < 20 ORDER BY o.id",
    "SELECT c.name, count(o.id) FROM customers c LEFT JOIN orders o ON o.customer_id = c.id GROUP BY c.name ORDER BY c.name LIMIT 20",
    "SELECT id FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE amount > 1000) ORDER BY id",
    "SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id AND o.status = 'shipped') ORDER BY id LIMIT 5",
    "WITH big AS (SELECT customer_id, sum(amount) s FROM orders GROUP BY customer_id) SELECT customer_id, s FROM big ORDER BY s DESC, customer_id LIMIT 5",
    "SELECT id, amount, rank() OVER (PARTITION BY status ORDER BY amount DESC) FROM orders ORDER BY id LIMIT 10",
    "SELECT id, amount, sum(amount) OVER (ORDER BY id) FROM orders WHERE id <= 10 ORDER BY id",
    "SELECT DISTINCT status FROM orders ORDER BY status",
    "SELECT name FROM customers WHERE name LIKE 'Canary%' ORDER BY name",
    "SELECT upper(name), length(name), substr(name, 1, 3) FROM customers WHERE id < 4 ORDER BY id",
    "SELECT id FROM customers WHERE email = 'canary2@leak.test'",
    "SELECT id, name FROM customers WHERE email IN ('canary1@leak.test', 'user10@example.com') ORDER BY id",
    "SELECT date_trunc('month', placed_at), count(*) FROM orders GROUP BY 1 ORDER BY 1",
    "SELECT id FROM orders ORDER BY amount DESC, id LIMIT 3 OFFSET 2",
    "SELECT * FROM orders WHERE id = 42",
    "SELECT coalesce(NULL, 'x'), nullif(1, 1), greatest(1, 2), CASE WHEN 1 > 0 THEN 'y' END",
    "SELECT id FROM orders UNION SELECT id FROM customers ORDER BY 1 LIMIT 5",
    "SELECT generate_series(1, 5)",
    "SELECT x, x * 2 FROM generate_series(1, 3) AS g(x)",
    "VALUES (1, 'a'), (2, 'b')",
    "SELECT relname FROM pg_catalog.pg_class WHERE relname = 'customers'",
    "SELECT typname FROM pg_type WHERE oid = 23",
    "BEGIN",
    "INSERT INTO orders (customer_id, amount, status) VALUES (1, 9.99, 'new') RETURNING amount, status",
    "UPDATE orders SET status = 'paid' WHERE status = 'new' RETURNING amount, status",
    "SAVEPOINT sp1",
    "DELETE FROM orders WHERE status = 'paid'",
    "ROLLBACK TO SAVEPOINT sp1",
    "SELECT count(*) FROM orders WHERE status = 'paid'",
    "RELEASE SAVEPOINT sp1",
    "COMMIT",
    "INSERT INTO customers (name, email, ssn) VALUES ('New Person', 'new@example.com', '111-22-3333') RETURNING id > 0",
    "UPDATE customers SET name = 'Renamed' WHERE email = 'new@example.com'",
    "UPDATE customers SET name = 'Renamed' WHERE id = (SELECT id FROM customers WHERE email = 'new@example.com')",
    "UPDATE customers c SET name = 'Renamed' WHERE id IN (SELECT id FROM customers c2 WHERE email = 'new@example.com')",
    "SELECT name FROM customers WHERE name = 'Renamed'",
    "DELETE FROM customers WHERE name = 'Renamed'",
    "SET application_name = 'false-block-corpus'",
    "SHOW application_name",
    "SET search_path = public",
    "SET statement_timeout = '5s'",
    "RESET statement_timeout",
    "PREPARE byid(int) AS SELECT id, name FROM customers WHERE id = $1",
    "EXECUTE byid(3)",
    "DEALLOCATE byid",
    "LISTEN jobs",
    "NOTIFY jobs, 'ping'",
    "UNLISTEN jobs",
    "EXPLAIN SELECT id FROM customers WHERE id = 1",
    "SELECT id, name FROM customers ORDER BY id",
];

fn render(msgs: &[SimpleQueryMessage]) -> String {
    let mut out = String::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::Row(r) => {
                let cells: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect();
                out.push_str(&cells.join("|"));
                out.push('\n');
            }
            SimpleQueryMessage::CommandComplete(n) => out.push_str(&format!("-- {n}\n")),
            _ => {}
        }
    }
    out
}

async fn transcript(port: u16, role: &str, db: &str) -> Vec<String> {
    let client = connect_plain(&url(port, role, db, "sslmode=disable")).await.expect("connect");
    let mut out = Vec::new();
    for sql in CORPUS {
        let rendered = match client.simple_query(sql).await {
            Ok(msgs) => render(&msgs),
            Err(e) => format!("ERROR {:?}: {e}", e.code()),
        };
        out.push(rendered);
    }
    // The extended protocol (binary results) for the reads.
    for sql in CORPUS.iter().filter(|s| s.starts_with("SELECT") && !s.contains("now()")) {
        let rendered = match client.query(*sql, &[]).await {
            Ok(rows) => format!("{} rows", rows.len()),
            Err(e) => format!("ERROR {:?}: {e}", e.code()),
        };
        out.push(rendered);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_statements_give_the_same_results_as_direct() {
    assert!(CORPUS.len() >= 40);
    let cluster = pg::cluster();
    for role in ["app_user", "dba"] {
        let direct_db = cluster.fresh_db();
        let proxied_db = cluster.fresh_db();
        let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
        let direct = transcript(cluster.port, role, &direct_db.name).await;
        let proxied = transcript(p.port(), role, &proxied_db.name).await;
        for (i, (d, v)) in direct.iter().zip(&proxied).enumerate() {
            let sql = CORPUS.get(i).copied().unwrap_or("(extended protocol rerun)");
            assert!(!d.starts_with("ERROR"), "{role}: direct run failed on {sql}: {d}");
            assert_eq!(d, v, "{role}: {sql}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_masked_columns_are_forwarded_as_the_original_bytes() {
    use crate::harness::recorder::Recorder;
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let sql = "SELECT id, amount, status FROM orders ORDER BY id";
    let direct = Recorder::start(([127, 0, 0, 1], cluster.port).into()).await;
    let via = Recorder::start(p.addr).await;
    for r in [&direct, &via] {
        let c = connect_plain(&url(r.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
        c.simple_query(sql).await.unwrap();
    }
    // Every DataRow message of the stream, concatenated as it arrived.
    let rows = |bytes: Vec<u8>| {
        let mut out = Vec::new();
        let mut rest = bytes.as_slice();
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let (msg, tail) = rest.split_at(1 + len);
            if msg[0] == b'D' {
                out.extend_from_slice(msg);
            }
            rest = tail;
        }
        out
    };
    let (d, v) = (rows(direct.captured()), rows(via.captured()));
    assert!(d.len() > 10_000, "{} bytes of rows", d.len());
    assert!(d == v, "rows differ ({} vs {} bytes)", d.len(), v.len());
}
