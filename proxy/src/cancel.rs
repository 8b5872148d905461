//! Cancel keys: clients get a random (pid, key) issued by the proxy; this map turns it back into
//! the backend's own key. Keys are compared in constant time; a wrong key does nothing.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use rand::RngCore;
use subtle::ConstantTimeEq;

/// Where a session's cancel requests must go.
#[derive(Clone)]
pub struct Target {
    pub key: Bytes,
    pub backend_pid: u32,
    pub backend_key: Bytes,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("backend_pid", &self.backend_pid).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
pub struct CancelMap {
    by_pid: DashMap<u32, Target>,
}

/// Removes the session's entry when the session ends.
#[derive(Debug)]
pub struct Registration {
    map: Arc<CancelMap>,
    pub pid: u32,
    pub key: Bytes,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.map.by_pid.remove(&self.pid);
    }
}

impl CancelMap {
    /// Issues a fresh synthetic key of `key_len` bytes for a backend key.
    pub fn register(self: &Arc<Self>, key_len: usize, backend_pid: u32, backend_key: Bytes) -> Registration {
        let mut rng = rand::rng();
        let mut key = vec![0u8; key_len];
        rng.fill_bytes(&mut key);
        let key = Bytes::from(key);
        loop {
            // Positive int32 values, like real process ids, so clients that print them are happy.
            let pid = rng.next_u32() >> 1;
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(slot) = self.by_pid.entry(pid) {
                slot.insert(Target { key: key.clone(), backend_pid, backend_key: backend_key.clone() });
                return Registration { map: Arc::clone(self), pid, key };
            }
        }
    }

    /// The backend key for a client's cancel request, if the key matches.
    pub fn lookup(&self, pid: u32, key: &[u8]) -> Option<Target> {
        let target = self.by_pid.get(&pid)?;
        bool::from(target.key.as_ref().ct_eq(key)).then(|| target.clone())
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_key_finds_nothing_and_entries_go_away() {
        let map = Arc::new(CancelMap::default());
        let reg = map.register(32, 42, Bytes::from_static(b"real"));
        assert_eq!(map.lookup(reg.pid, &reg.key).map(|t| t.backend_pid), Some(42));
        let mut wrong = reg.key.to_vec();
        wrong[0] ^= 1;
        assert!(map.lookup(reg.pid, &wrong).is_none());
        assert!(map.lookup(reg.pid, &reg.key[..4]).is_none());
        drop(reg);
        assert!(map.is_empty());
    }
}
