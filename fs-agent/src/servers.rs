//! The chunk server registry in the metadata store: which servers there are, whether they are
//! alive, and which ones are leaving. Keys:
//! - `/fs/servers/<addr>`: [`ServerRecord`], rewritten by the server at every heartbeat;
//! - `/fs/draining/<addr>`: [`DrainRecord`], set by an operator (`fs-agent drain-server`): no
//!   new chunks go there and healing moves its replicas to other servers;
//! - `/fs/dead/<addr>`: [`DeadRecord`], set by the healer for a server that has not answered
//!   nor sent a heartbeat for its grace period. It holds only until the server's next heartbeat,
//!   so a server that comes back is alive again whether or not a healer runs.
//!
//! A replica on a draining, dead or unregistered (removed) server does not count towards its
//! chunk's copies: healing copies the chunk elsewhere, then drops that replica.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::metadata_store::Mutation;
use crate::namespace::{Namespace, NamespaceError, SERVERS_PREFIX};

pub const DRAINING_PREFIX: &str = "/fs/draining/";
pub const DEAD_PREFIX: &str = "/fs/dead/";

pub fn unix_now() -> u64 {
    unix_now_millis() / 1000
}

pub fn unix_now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub addr: String,
    /// When the server last wrote this record (its clock, milliseconds since the epoch).
    pub heartbeat_unix_millis: u64,
    pub heartbeat_interval_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub since_unix_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadRecord {
    pub since_unix_secs: u64,
    /// The heartbeat the server had when it was declared dead: a newer one revives it.
    pub last_heartbeat_unix_millis: u64,
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry records serialize")
}

fn put(ns: &Namespace, key: String, value: Vec<u8>) -> Result<(), NamespaceError> {
    ns.store().commit(&[], &[Mutation::Put { key, value }])?;
    Ok(())
}

fn delete(ns: &Namespace, keys: Vec<String>) -> Result<(), NamespaceError> {
    ns.store().commit(&[], &keys.into_iter().map(|key| Mutation::Delete { key }).collect::<Vec<_>>())?;
    Ok(())
}

/// Registers chunk server `addr`, or renews its heartbeat.
pub fn heartbeat(ns: &Namespace, addr: &str, interval_secs: u64) -> Result<(), NamespaceError> {
    let record = ServerRecord { addr: addr.to_string(), heartbeat_unix_millis: unix_now_millis(), heartbeat_interval_secs: interval_secs };
    put(ns, format!("{SERVERS_PREFIX}{addr}"), json(&record))
}

/// Every registered server. A record from before heartbeats (the bare address) has none.
pub fn records(ns: &Namespace) -> Result<Vec<ServerRecord>, NamespaceError> {
    Ok(ns
        .store()
        .list_prefix(SERVERS_PREFIX)?
        .into_iter()
        .map(|(key, v)| {
            let addr = key[SERVERS_PREFIX.len()..].to_string();
            serde_json::from_slice(&v.value).unwrap_or(ServerRecord { addr, heartbeat_unix_millis: 0, heartbeat_interval_secs: 0 })
        })
        .collect())
}

fn list<T: for<'de> Deserialize<'de>>(ns: &Namespace, prefix: &str) -> Result<BTreeMap<String, T>, NamespaceError> {
    Ok(ns.store().list_prefix(prefix)?.into_iter().filter_map(|(key, v)| Some((key[prefix.len()..].to_string(), serde_json::from_slice(&v.value).ok()?))).collect())
}

/// The servers being drained.
pub fn draining(ns: &Namespace) -> Result<BTreeSet<String>, NamespaceError> {
    Ok(list::<DrainRecord>(ns, DRAINING_PREFIX)?.into_keys().collect())
}

/// The key whose presence marks `addr` draining.
pub fn draining_key(addr: &str) -> String {
    format!("{DRAINING_PREFIX}{addr}")
}

pub fn set_draining(ns: &Namespace, addr: &str, draining: bool) -> Result<(), NamespaceError> {
    let key = draining_key(addr);
    if draining {
        put(ns, key, json(&DrainRecord { since_unix_secs: unix_now() }))
    } else {
        delete(ns, vec![key])
    }
}

pub fn declare_dead(ns: &Namespace, addr: &str, last_heartbeat_unix_millis: u64) -> Result<(), NamespaceError> {
    put(ns, format!("{DEAD_PREFIX}{addr}"), json(&DeadRecord { since_unix_secs: unix_now(), last_heartbeat_unix_millis }))
}

pub fn clear_dead(ns: &Namespace, addr: &str) -> Result<(), NamespaceError> {
    delete(ns, vec![format!("{DEAD_PREFIX}{addr}")])
}

/// Forgets server `addr`: its registration, draining and dead records.
pub fn remove(ns: &Namespace, addr: &str) -> Result<(), NamespaceError> {
    delete(ns, [SERVERS_PREFIX, DRAINING_PREFIX, DEAD_PREFIX].iter().map(|prefix| format!("{prefix}{addr}")).collect())
}

/// What the registry says about every server, for deciding which replicas count.
#[derive(Debug, Clone, Default)]
pub struct ServerStates {
    pub records: BTreeMap<String, ServerRecord>,
    pub draining: BTreeMap<String, DrainRecord>,
    /// Dead declarations still in force (the server has sent no heartbeat since).
    pub dead: BTreeMap<String, DeadRecord>,
}

impl ServerStates {
    pub fn load(ns: &Namespace) -> Result<ServerStates, NamespaceError> {
        Ok(ServerStates::new(records(ns)?, list(ns, DRAINING_PREFIX)?, list(ns, DEAD_PREFIX)?))
    }

    /// Pure: drops dead declarations that a later heartbeat overrides.
    pub fn new(records: Vec<ServerRecord>, draining: BTreeMap<String, DrainRecord>, dead: BTreeMap<String, DeadRecord>) -> ServerStates {
        let records: BTreeMap<String, ServerRecord> = records.into_iter().map(|r| (r.addr.clone(), r)).collect();
        let dead = dead.into_iter().filter(|(addr, d)| records.get(addr).is_none_or(|r| r.heartbeat_unix_millis <= d.last_heartbeat_unix_millis)).collect();
        ServerStates { records, draining, dead }
    }

    pub fn is_registered(&self, server: &str) -> bool {
        self.records.contains_key(server)
    }

    pub fn is_draining(&self, server: &str) -> bool {
        self.draining.contains_key(server)
    }

    pub fn is_dead(&self, server: &str) -> bool {
        self.dead.contains_key(server)
    }

    /// Its replicas do not count towards a chunk's copies: it is leaving or gone.
    pub fn retiring(&self, server: &str) -> bool {
        !self.is_registered(server) || self.is_draining(server) || self.is_dead(server)
    }

    /// New replicas may go there (if it answers).
    pub fn placeable(&self, server: &str) -> bool {
        !self.retiring(server)
    }
}

/// What the healer makes of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Up,
    /// Not answering, for `silent_secs` since its last heartbeat: within the grace period,
    /// maybe a restart. Its replicas are left alone.
    Down { silent_secs: u64 },
    /// Not answering, and no heartbeat for the whole grace period.
    Dead { silent_secs: u64 },
}

/// Pure: `answers` is whether the server answered just now.
pub fn liveness(record: &ServerRecord, answers: bool, now_unix_millis: u64, dead_after_secs: u64) -> Liveness {
    let silent_secs = now_unix_millis.saturating_sub(record.heartbeat_unix_millis) / 1000;
    match answers {
        true => Liveness::Up,
        false if silent_secs >= dead_after_secs => Liveness::Dead { silent_secs },
        false => Liveness::Down { silent_secs },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata_store::MemoryMetadata;
    use std::sync::Arc;

    fn record(addr: &str, heartbeat: u64) -> ServerRecord {
        ServerRecord { addr: addr.into(), heartbeat_unix_millis: heartbeat * 1000, heartbeat_interval_secs: 10 }
    }

    #[test]
    fn a_server_is_dead_only_when_silent_for_the_whole_grace_period() {
        let r = record("a", 1000);
        assert_eq!(liveness(&r, true, 5_000_000, 60), Liveness::Up, "an answering server is up, whatever its heartbeat");
        assert_eq!(liveness(&r, false, 1_030_000, 60), Liveness::Down { silent_secs: 30 });
        assert_eq!(liveness(&r, false, 1_060_000, 60), Liveness::Dead { silent_secs: 60 });
        assert_eq!(liveness(&r, false, 990_000, 60), Liveness::Down { silent_secs: 0 }, "a clock behind the server's is not a reason");
    }

    #[test]
    fn a_heartbeat_after_the_dead_declaration_revives_a_server() {
        let dead = |hb| BTreeMap::from([("a".to_string(), DeadRecord { since_unix_secs: 2000, last_heartbeat_unix_millis: hb })]);
        let states = ServerStates::new(vec![record("a", 1000)], BTreeMap::new(), dead(1_000_000));
        assert!(states.is_dead("a") && states.retiring("a") && !states.placeable("a"));
        let states = ServerStates::new(vec![record("a", 1001)], BTreeMap::new(), dead(1_000_000));
        assert!(!states.is_dead("a") && !states.retiring("a"));
    }

    #[test]
    fn draining_and_unregistered_servers_are_retiring() {
        let draining = BTreeMap::from([("b".to_string(), DrainRecord { since_unix_secs: 1 })]);
        let states = ServerStates::new(vec![record("a", 1), record("b", 1)], draining, BTreeMap::new());
        assert!(!states.retiring("a") && states.placeable("a"));
        assert!(states.retiring("b") && !states.placeable("b"));
        assert!(states.retiring("gone"), "a removed server's replicas do not count");
    }

    #[test]
    fn the_registry_round_trips_through_the_store() {
        let ns = Namespace::new(Arc::new(MemoryMetadata::new()));
        heartbeat(&ns, "10.0.0.1:7001", 10).unwrap();
        heartbeat(&ns, "10.0.0.2:7001", 10).unwrap();
        ns.store().commit(&[], &[Mutation::Put { key: format!("{SERVERS_PREFIX}10.0.0.3:7001"), value: b"10.0.0.3:7001".to_vec() }]).unwrap();
        let all = records(&ns).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].heartbeat_unix_millis, 0, "a registration from before heartbeats has none");
        assert_eq!(ns.servers().unwrap().len(), 3);
        set_draining(&ns, "10.0.0.2:7001", true).unwrap();
        declare_dead(&ns, "10.0.0.3:7001", 0).unwrap();
        let states = ServerStates::load(&ns).unwrap();
        assert!(states.is_draining("10.0.0.2:7001") && states.is_dead("10.0.0.3:7001") && states.placeable("10.0.0.1:7001"));
        set_draining(&ns, "10.0.0.2:7001", false).unwrap();
        remove(&ns, "10.0.0.3:7001").unwrap();
        let states = ServerStates::load(&ns).unwrap();
        assert!(!states.is_draining("10.0.0.2:7001") && !states.is_dead("10.0.0.3:7001") && !states.is_registered("10.0.0.3:7001"));
    }
}
