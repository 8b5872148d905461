//! `pgveil init --against URL [--print]`: creates or upgrades, idempotently, the `pgveil`
//! schema in one database: the SECURITY DEFINER HMAC the `hash` mask is computed with (over
//! a key table only its owner can read, filled from `PGVEIL_HASH_KEY`, one row per key so
//! keys can rotate) and the schema version `run` checks. The key itself is never sent: the
//! table holds HMAC's padded keys, written by this command, never shown by `--print`. Also
//! the containment state every instance shares (`pgveil.quarantine`, granted to the catalog
//! role).

use std::fmt::Write as _;

use rules::sql::mask_sql;

use crate::cli::{EXIT_FINDING, EXIT_OK, EXIT_USAGE};

/// `key`: from `PGVEIL_HASH_KEY` (`main` reads it).
/// `catalog_role`: the proxy's catalog login, granted the shared containment table.
pub async fn init(url: &str, print: bool, key: Option<rules::HashKey>, catalog_role: &str) -> (String, u8) {
    let mut out = String::new();
    if print {
        out.push_str(&mask_sql::init_sql_for(catalog_role));
        match &key {
            Some(k) => {
                let _ = writeln!(
                    out,
                    "-- and the key with fingerprint {} (its pads are written by `pgveil init` itself, never printed)",
                    k.fingerprint()
                );
            }
            None => out.push_str("-- PGVEIL_HASH_KEY is not set: no key would be installed\n"),
        }
        return (out, EXIT_OK);
    }
    let client = match crate::cli::connect(url).await {
        Ok(c) => c,
        Err(e) => {
            return (format!("pgveil init: cannot connect to {}: {e}\n", crate::cli::redact_url(url)), EXIT_USAGE);
        }
    };
    if let Err(e) = client.batch_execute(&format!("BEGIN;\n{}\nCOMMIT;", mask_sql::init_sql_for(catalog_role))).await {
        return (format!("pgveil init: {e}\n"), EXIT_FINDING);
    }
    let _ = writeln!(
        out,
        "pgveil schema version {} installed in {}",
        mask_sql::SCHEMA_VERSION,
        crate::cli::redact_url(url)
    );
    match key {
        Some(k) => match install_key(&client, &k).await {
            Ok(()) => {
                let _ = writeln!(out, "hash key installed (fingerprint {})", k.fingerprint());
            }
            Err(e) => return (format!("pgveil init: installing the key: {e}\n"), EXIT_FINDING),
        },
        None => out.push_str("PGVEIL_HASH_KEY is not set: no key installed (the `hash` mask needs one)\n"),
    }
    (out, EXIT_OK)
}

/// Writes the key's row with its pads as bind values, with statement logging off for this
/// connection where the role may turn it off, so the pads reach no server log.
async fn install_key(client: &tokio_postgres::Client, key: &rules::HashKey) -> Result<(), tokio_postgres::Error> {
    for quiet in
        ["SET log_statement = 'none'", "SET log_min_duration_statement = -1", "SET log_parameter_max_length = 0"]
    {
        // Superuser-only settings: a role that may not change them gets the server's own.
        let _ = client.batch_execute(quiet).await;
    }
    let (fingerprint, ipad, opad) = mask_sql::key_sql_params(key);
    client.execute(mask_sql::KEY_INSERT, &[&fingerprint, &ipad, &opad]).await.map(|_| ())
}
