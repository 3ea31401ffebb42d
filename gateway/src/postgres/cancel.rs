//! Cancel keys: the gateway gives every PostgreSQL client a process id and
//! secret key of its own (BackendKeyData) and keeps, for each, the upstream
//! session's, so that a CancelRequest through the gateway reaches the right
//! server session, and only for the identity that opened it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// The upstream session a gateway-issued cancel key stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// The server.
    pub dst: SocketAddr,
    /// The server's process id for the session.
    pub process_id: i32,
    /// The server's secret key for the session.
    pub secret_key: i32,
    /// The identity whose session it is: only it may cancel.
    pub identity: String,
}

/// Gateway-issued keys of the open sessions.
#[derive(Debug, Default, Clone)]
pub struct CancelKeys(Arc<Mutex<HashMap<(i32, i32), CancelTarget>>>);

impl CancelKeys {
    /// Issues a fresh (process id, secret key) for `target`; the key is
    /// withdrawn when the returned guard drops.
    pub fn issue(&self, target: CancelTarget) -> IssuedKey {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
            if key.0 != 0 && !map.contains_key(&key) {
                map.insert(key, target);
                return IssuedKey { keys: self.clone(), key };
            }
        }
    }

    /// The upstream session for a client's cancel key.
    pub fn lookup(&self, process_id: i32, secret_key: i32) -> Option<CancelTarget> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(&(process_id, secret_key)).cloned()
    }
}

/// A cancel key in force while its session lasts.
#[derive(Debug)]
pub struct IssuedKey {
    keys: CancelKeys,
    /// (process id, secret key) as the client knows them.
    pub key: (i32, i32),
}

impl Drop for IssuedKey {
    fn drop(&mut self) {
        self.keys.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_their_session_while_it_lasts() {
        let keys = CancelKeys::default();
        let target = CancelTarget {
            dst: "127.0.0.1:5432".parse().unwrap(),
            process_id: 42,
            secret_key: 7,
            identity: "spiffe://x/y".into(),
        };
        let issued = keys.issue(target.clone());
        let (pid, key) = issued.key;
        assert_eq!(keys.lookup(pid, key), Some(target));
        assert_eq!(keys.lookup(pid, key.wrapping_add(1)), None);
        drop(issued);
        assert_eq!(keys.lookup(pid, key), None);
    }
}
