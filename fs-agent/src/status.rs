//! Replica health for operators (`fs-agent status`): which chunk servers answer, how much
//! space they have, and how many chunks lack copies.

use std::collections::{BTreeMap, HashMap};

use crate::chunk_client::ChunkClient;
use crate::chunk_protocol::{ChunkRequest, ChunkResponse};
use crate::chunk_store::ScrubReport;
use crate::healer::HealerStatus;
use crate::namespace::{ChunkInfo, Inode, Namespace, NamespaceError};
use crate::servers::ServerStates;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplicaHealth {
    pub chunks: u64,
    /// Chunks with fewer current copies than their file asks for.
    pub under_replicated: u64,
    /// Chunks with no current copy at all (data loss unless a server comes back).
    pub unavailable: u64,
    /// Replicas that missed writes and are never read.
    pub stale_replicas: u64,
    /// Chunks that several files point at (copy-on-write clones).
    pub shared: u64,
}

/// One entry per chunk from `(desired copies, chunk record)` pairs, however many files point
/// at it: `(the most copies any of them wants, the chunk, how many records point at it)`.
pub fn distinct_chunks(records: impl IntoIterator<Item = (u32, ChunkInfo)>) -> Vec<(u32, ChunkInfo, u32)> {
    let mut by_id: BTreeMap<u64, (u32, ChunkInfo, u32)> = BTreeMap::new();
    for (desired, chunk) in records {
        let entry = by_id.entry(chunk.chunk_id).or_insert((desired, chunk, 0));
        entry.0 = entry.0.max(desired);
        entry.2 += 1;
    }
    by_id.into_values().collect()
}

/// Counts replica health over distinct chunks `(desired copies, chunk, records pointing at
/// it)`, with which servers answer (`is_up`) and which are leaving (`is_retiring`: draining,
/// dead, removed; see [`crate::servers`]); pure. A chunk is under-replicated when fewer than
/// its desired copies are current on servers that answer and stay, unavailable when no current
/// replica answers.
pub fn replica_health<'a>(chunks: impl IntoIterator<Item = (u32, &'a ChunkInfo, u32)>, is_up: impl Fn(&str) -> bool, is_retiring: impl Fn(&str) -> bool) -> ReplicaHealth {
    let mut health = ReplicaHealth::default();
    for (desired, chunk, references) in chunks {
        let current = chunk.current_servers();
        let readable = current.iter().filter(|s| is_up(s)).count();
        let staying = current.iter().filter(|s| is_up(s) && !is_retiring(s)).count();
        health.chunks += 1;
        if references > 1 {
            health.shared += 1;
        }
        if staying < desired as usize {
            health.under_replicated += 1;
        }
        if readable == 0 {
            health.unavailable += 1;
        }
        health.stale_replicas += (chunk.replicas.len() - current.len()) as u64;
    }
    health
}

pub struct ServerStatus {
    pub addr: String,
    /// `(free, total)` bytes, or why the server did not answer.
    pub capacity: Result<(u64, u64), String>,
    pub replicas: u64,
    pub scrub: Option<ScrubReport>,
    /// Seconds since its last heartbeat (by this machine's clock); `None` for a server removed
    /// from the registry that chunk records still list.
    pub heartbeat_age_secs: Option<u64>,
    pub draining: bool,
    /// Declared dead by the healer.
    pub dead: bool,
}

pub struct StatusReport {
    pub servers: Vec<ServerStatus>,
    pub health: ReplicaHealth,
    pub healer: Option<HealerStatus>,
}

/// Every regular file's inode.
pub fn files(ns: &Namespace) -> Result<Vec<Inode>, NamespaceError> {
    Ok(ns
        .store()
        .list_prefix("/fs/inodes/")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<Inode>(&v.value).ok())
        .filter(|i| i.kind == crate::namespace::InodeKind::File)
        .collect())
}

/// Every chunk record with its file's inode number, in one scan of the store.
pub fn chunk_records(ns: &Namespace) -> Result<Vec<(u64, ChunkInfo)>, NamespaceError> {
    Ok(ns
        .store()
        .list_prefix("/fs/chunks/")?
        .into_iter()
        .filter_map(|(key, v)| {
            let ino = key["/fs/chunks/".len()..].split('/').next().and_then(|h| u64::from_str_radix(h, 16).ok())?;
            Some((ino, serde_json::from_slice::<ChunkInfo>(&v.value).ok()?))
        })
        .collect())
}

pub fn collect(ns: &Namespace, client: &ChunkClient) -> Result<StatusReport, NamespaceError> {
    let desired: HashMap<u64, u32> = files(ns)?.into_iter().map(|i| (i.ino, i.replicas)).collect();
    let records = chunk_records(ns)?.into_iter().map(|(ino, chunk)| (desired.get(&ino).copied().unwrap_or(3), chunk));
    // Counted per chunk, not per file pointing at it.
    let chunks = distinct_chunks(records);
    let mut replicas_per_server: BTreeMap<String, u64> = BTreeMap::new();
    for (_, chunk, _) in &chunks {
        for server in chunk.current_servers() {
            *replicas_per_server.entry(server).or_default() += 1;
        }
    }
    let states = ServerStates::load(ns)?;
    let now = crate::servers::unix_now_millis();
    let mut servers: Vec<ServerStatus> = states
        .records
        .values()
        .map(|record| {
            let addr = record.addr.clone();
            let capacity = match client.call(&addr, &ChunkRequest::Capacity) {
                Ok(ChunkResponse::Capacity { free, total }) => Ok((free, total)),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            let replicas = replicas_per_server.get(&addr).copied().unwrap_or(0);
            let scrub = match capacity {
                Ok(_) => match client.call(&addr, &ChunkRequest::ScrubReport) {
                    Ok(ChunkResponse::Scrub(report)) => Some(report),
                    _ => None,
                },
                Err(_) => None,
            };
            let heartbeat_age_secs = Some(now.saturating_sub(record.heartbeat_unix_millis) / 1000);
            ServerStatus { draining: states.is_draining(&addr), dead: states.is_dead(&addr), addr, capacity, replicas, scrub, heartbeat_age_secs }
        })
        .collect();
    // Servers removed from the registry that chunk records still list.
    for (addr, replicas) in &replicas_per_server {
        if !states.is_registered(addr) {
            servers.push(ServerStatus {
                addr: addr.clone(),
                capacity: Err("removed from the registry".into()),
                replicas: *replicas,
                scrub: None,
                heartbeat_age_secs: None,
                draining: false,
                dead: false,
            });
        }
    }
    let up: std::collections::HashSet<String> = servers.iter().filter(|s| s.capacity.is_ok()).map(|s| s.addr.clone()).collect();
    let health = replica_health(chunks.iter().map(|(d, c, r)| (*d, c, *r)), |s| up.contains(s), |s| states.retiring(s));
    Ok(StatusReport { servers, health, healer: HealerStatus::read(ns)? })
}

impl StatusReport {
    pub fn render(&self) -> String {
        let mut out = String::from("chunk servers:\n");
        for s in &self.servers {
            let mut notes = Vec::new();
            if s.draining {
                notes.push("draining".to_string());
            }
            if s.dead {
                notes.push("declared dead by the healer".to_string());
            }
            match (&s.capacity, s.heartbeat_age_secs) {
                (Ok(_), _) | (_, None) => {}
                (Err(_), Some(age)) => notes.push(format!("last heartbeat {age} s ago")),
            }
            let notes: String = notes.iter().map(|n| format!(", {n}")).collect();
            match &s.capacity {
                Ok((free, total)) => {
                    out.push_str(&format!("  {} up{notes}, {} MiB free of {} MiB, {} current replicas", s.addr, free >> 20, total >> 20, s.replicas));
                    match &s.scrub {
                        Some(r) if r.passes > 0 => out.push_str(&format!(", scrub: {} corrupt blocks in {} chunks\n", r.corrupt_blocks.len(), r.chunks_checked)),
                        _ => out.push_str(", scrub: no pass yet\n"),
                    }
                }
                Err(e) => out.push_str(&format!("  {} DOWN ({e}){notes}, {} current replicas\n", s.addr, s.replicas)),
            }
        }
        let h = &self.health;
        out.push_str(&format!(
            "chunks: {}, under-replicated: {}, unavailable: {}, stale replicas: {}, shared by clones: {} (`fs-agent healer` re-replicates)\n",
            h.chunks, h.under_replicated, h.unavailable, h.stale_replicas, h.shared
        ));
        match &self.healer {
            Some(healer) => out.push_str(&format!("{}\n", healer.render(crate::servers::unix_now()))),
            None => out.push_str("healer: no pass recorded (run `fs-agent healer`)\n"),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::Replica;

    fn chunk(versions: &[u64], version: u64) -> ChunkInfo {
        ChunkInfo { chunk_id: 1, version, replicas: versions.iter().enumerate().map(|(i, v)| Replica { server: format!("s{i}"), version: *v }).collect() }
    }

    #[test]
    fn counts_under_replicated_unavailable_and_stale() {
        let healthy = chunk(&[2, 2, 2], 2);
        let degraded = chunk(&[3, 3, 2], 3);
        let lost = chunk(&[1], 2);
        let h = replica_health([(3, &healthy, 1), (3, &degraded, 1), (1, &lost, 1)], |_| true, |_| false);
        assert_eq!(h, ReplicaHealth { chunks: 3, under_replicated: 2, unavailable: 1, stale_replicas: 2, shared: 0 });
        // A server that does not answer holds no copy anyone can read; one that is leaving
        // holds a readable copy that does not count.
        let h = replica_health([(3, &healthy, 1)], |s| s != "s2", |_| false);
        assert_eq!((h.under_replicated, h.unavailable), (1, 0));
        let h = replica_health([(3, &healthy, 1)], |_| true, |s| s == "s0");
        assert_eq!((h.under_replicated, h.unavailable), (1, 0));
        let h = replica_health([(1, &chunk(&[2], 2), 1)], |_| false, |_| false);
        assert_eq!((h.under_replicated, h.unavailable), (1, 1));
    }

    #[test]
    fn a_shared_chunk_counts_once_with_the_most_copies_wanted() {
        let mut other = chunk(&[1, 1], 1);
        other.chunk_id = 2;
        let distinct = distinct_chunks([(2, chunk(&[1, 1], 1)), (3, chunk(&[1, 1], 1)), (2, other)]);
        assert_eq!(distinct.iter().map(|(d, c, r)| (*d, c.chunk_id, *r)).collect::<Vec<_>>(), vec![(3, 1, 2), (2, 2, 1)]);
        let h = replica_health(distinct.iter().map(|(d, c, r)| (*d, c, *r)), |_| true, |_| false);
        assert_eq!(h, ReplicaHealth { chunks: 2, under_replicated: 1, unavailable: 0, stale_replicas: 0, shared: 1 });
    }
}
