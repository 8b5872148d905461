//! Cancel keys. Clients get a BackendKeyData issued by the proxy: the backend's real pid (so
//! `PQbackendPID()`, notification pids and `pg_terminate_backend(<pid>)` mean what they mean
//! without pgveil) and the backend's secret key encrypted with a keyed pseudo-random
//! permutation tweaked by the pid (a four-round Feistel network over the key, HMAC-SHA-256 as
//! round function). The sealed key is as hard to guess as the backend's own, yet any pgveil
//! instance holding the same secret can turn a cancel request back into the backend's key:
//! several instances behind a load balancer need to share only `PGVEIL_CANCEL_KEY`, no state.
//! A wrong key decrypts to a key the server does not know, and PostgreSQL ignores it, as it
//! ignores any wrong key. Keys of every length protocol 3.2 allows keep their length.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The backend's key as the server issued it.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: u32,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendKey").field("pid", &self.pid).field("key_len", &self.key.len()).finish()
    }
}

/// The secret that seals backend keys into client keys.
#[derive(Clone)]
pub struct CancelKeys {
    secret: Vec<u8>,
}

impl std::fmt::Debug for CancelKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CancelKeys(..)")
    }
}

const ROUNDS: u8 = 4;

impl CancelKeys {
    /// From a shared secret (`PGVEIL_CANCEL_KEY`), or a random one for a single instance.
    pub fn new(secret: Option<&[u8]>) -> Self {
        let secret = match secret {
            Some(s) if !s.is_empty() => s.to_vec(),
            _ => {
                let mut s = vec![0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut s);
                s
            }
        };
        CancelKeys { secret }
    }

    /// The (pid, key) to give the client for a backend key: the real pid, the key sealed, of
    /// the server's key length.
    pub fn seal(&self, backend: &BackendKey) -> (u32, Vec<u8>) {
        let mut key = backend.key.clone();
        self.permute(backend.pid, &mut key, false);
        (backend.pid, key)
    }

    /// The backend key a client's cancel request names (garbage in, garbage out).
    pub fn open(&self, pid: u32, key: &[u8]) -> BackendKey {
        let mut key = key.to_vec();
        self.permute(pid, &mut key, true);
        BackendKey { pid, key }
    }

    fn round_fn(&self, pid: u32, round: u8, input: &[u8], out_len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(out_len.saturating_add(32));
        let mut counter = 0u8;
        while out.len() < out_len {
            #[allow(clippy::expect_used, reason = "HMAC accepts keys of any length")]
            let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
            mac.update(&pid.to_be_bytes());
            mac.update(&[round, counter, u8::try_from(input.len()).unwrap_or(u8::MAX)]);
            mac.update(input);
            out.extend_from_slice(&mac.finalize().into_bytes());
            counter = counter.wrapping_add(1);
        }
        out.truncate(out_len);
        out
    }

    /// An unbalanced Feistel network over the key, tweaked by the pid (right gets the extra
    /// byte).
    fn permute(&self, pid: u32, block: &mut [u8], inverse: bool) {
        let half = block.len() / 2;
        let rounds: Vec<u8> = if inverse { (0..ROUNDS).rev().collect() } else { (0..ROUNDS).collect() };
        for r in rounds {
            // Even rounds change the left part from the right, odd rounds the reverse.
            let (left, right) = block.split_at_mut(half);
            let (from, to): (&[u8], &mut [u8]) = if r % 2 == 0 { (right, left) } else { (left, right) };
            let f = self.round_fn(pid, r, from, to.len());
            for (t, k) in to.iter_mut().zip(f) {
                *t ^= k;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_for_every_key_size_and_hides_the_backend_key() {
        let keys = CancelKeys::new(Some(b"shared secret"));
        for len in [4, 32, 5, 256] {
            let backend = BackendKey { pid: 4242, key: (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect() };
            let (pid, key) = keys.seal(&backend);
            assert_eq!(key.len(), len);
            assert_eq!(pid, backend.pid, "the client sees the backend's real pid");
            assert_ne!(key, backend.key, "but not its key");
            assert_eq!(keys.open(pid, &key), backend, "len {len}");
            // Another instance with the same secret opens it too; with another secret it does not.
            assert_eq!(CancelKeys::new(Some(b"shared secret")).open(pid, &key), backend);
            assert_ne!(CancelKeys::new(Some(b"other")).open(pid, &key), backend);
        }
    }

    #[test]
    fn a_wrong_key_opens_to_something_else() {
        let keys = CancelKeys::new(None);
        let backend = BackendKey { pid: 7, key: vec![1, 2, 3, 4] };
        let (pid, mut key) = keys.seal(&backend);
        key[0] ^= 1;
        assert_ne!(keys.open(pid, &key), backend);
    }
}
