//! Hot reload: rewriting the rules file under a busy client never fails a query and never
//! serves a value unmasked; rejected files leave the previous rules in force.

use std::sync::atomic::Ordering;

use crate::harness::client::{connect_plain, url};
use crate::harness::{pg, proxy as harness_proxy};
use crate::masking::RULES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_rules_fifty_times_under_load_never_unmasks() {
    let cluster = pg::cluster();
    let db = cluster.fresh_db();
    let p = harness_proxy::spawn_with_rules(cluster, RULES, |_| {}).await;
    let rules_path = p.shared.config.rules.clone().unwrap();
    let redacting = RULES.replace("mask: { partial: { keep_last: 4 } }", "mask: redact");
    let client = connect_plain(&url(p.port(), "app_user", &db.name, "sslmode=disable")).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let row = client
                    .query_one("SELECT ssn FROM customers WHERE id = 1", &[])
                    .await
                    .expect("no query fails during reloads");
                let ssn: String = row.get(0);
                assert!(ssn == "***-**-0001" || ssn == "****", "served {ssn:?} during a reload");
                seen.insert(ssn);
                n += 1;
            }
            (seen, n)
        })
    };
    for i in 0..50 {
        let text = match i % 4 {
            0 => redacting.clone(),
            1 => "version: 1\ncolumns: {public.customers.ssn: {mask: hsah}}\n".to_owned(),
            2 => RULES.to_owned(),
            _ => "version: [not yaml".to_owned(),
        };
        // Editors replace the file; do the same.
        let tmp = rules_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &rules_path).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, n) = reader.await.unwrap();
    assert!(n > 50, "the client ran {n} queries");
    assert_eq!(seen.len(), 2, "both rule versions were in force at some point: {seen:?}");
    let m = &p.shared.metrics;
    assert!(m.reloads_ok.load(Ordering::Relaxed) >= 20, "{}", m.reloads_ok.load(Ordering::Relaxed));
    assert!(m.reloads_rejected.load(Ordering::Relaxed) >= 20, "{}", m.reloads_rejected.load(Ordering::Relaxed));
    // SIGHUP's path: an explicit reload of a valid file.
    std::fs::write(&rules_path, RULES).unwrap();
    assert!(proxy::policy::reload(&p.shared));
}
