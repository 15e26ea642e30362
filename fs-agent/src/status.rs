//! Replica health for operators (`fs-agent status`): which chunk servers answer, how much
//! space they have, and how many chunks lack copies.

use std::collections::{BTreeMap, HashMap};

use crate::chunk_client::ChunkClient;
use crate::chunk_protocol::{ChunkRequest, ChunkResponse};
use crate::chunk_store::ScrubReport;
use crate::namespace::{ChunkInfo, Inode, Namespace, NamespaceError};

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
/// it)`; pure.
pub fn replica_health<'a>(chunks: impl IntoIterator<Item = (u32, &'a ChunkInfo, u32)>) -> ReplicaHealth {
    let mut health = ReplicaHealth::default();
    for (desired, chunk, references) in chunks {
        let current = chunk.current_servers().len();
        health.chunks += 1;
        if references > 1 {
            health.shared += 1;
        }
        if current < desired as usize {
            health.under_replicated += 1;
        }
        if current == 0 {
            health.unavailable += 1;
        }
        health.stale_replicas += (chunk.replicas.len() - current) as u64;
    }
    health
}

pub struct ServerStatus {
    pub addr: String,
    /// `(free, total)` bytes, or why the server did not answer.
    pub capacity: Result<(u64, u64), String>,
    pub replicas: u64,
    pub scrub: Option<ScrubReport>,
}

pub struct StatusReport {
    pub servers: Vec<ServerStatus>,
    pub health: ReplicaHealth,
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

pub fn collect(ns: &Namespace) -> Result<StatusReport, NamespaceError> {
    let inodes: HashMap<u64, u32> = ns
        .store()
        .list_prefix("/fs/inodes/")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<Inode>(&v.value).ok())
        .map(|i| (i.ino, i.replicas))
        .collect();
    let mut records: Vec<(u32, ChunkInfo)> = Vec::new();
    for (key, v) in ns.store().list_prefix("/fs/chunks/")? {
        let ino = key["/fs/chunks/".len()..].split('/').next().and_then(|h| u64::from_str_radix(h, 16).ok()).unwrap_or(0);
        if let Ok(chunk) = serde_json::from_slice::<ChunkInfo>(&v.value) {
            records.push((inodes.get(&ino).copied().unwrap_or(3), chunk));
        }
    }
    // Counted per chunk, not per file pointing at it.
    let chunks = distinct_chunks(records);
    let mut replicas_per_server: BTreeMap<String, u64> = BTreeMap::new();
    for (_, chunk, _) in &chunks {
        for server in chunk.current_servers() {
            *replicas_per_server.entry(server).or_default() += 1;
        }
    }
    let client = ChunkClient::new();
    let servers = ns
        .servers()?
        .into_iter()
        .map(|addr| {
            let capacity = match client.call(&addr, &ChunkRequest::Capacity) {
                Ok(ChunkResponse::Capacity { free, total }) => Ok((free, total)),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            let replicas = replicas_per_server.get(&addr).copied().unwrap_or(0);
            let scrub = match client.call(&addr, &ChunkRequest::ScrubReport) {
                Ok(ChunkResponse::Scrub(report)) => Some(report),
                _ => None,
            };
            ServerStatus { addr, capacity, replicas, scrub }
        })
        .collect();
    Ok(StatusReport { servers, health: replica_health(chunks.iter().map(|(d, c, r)| (*d, c, *r))) })
}

impl StatusReport {
    pub fn render(&self) -> String {
        let mut out = String::from("chunk servers:\n");
        for s in &self.servers {
            match &s.capacity {
                Ok((free, total)) => {
                    out.push_str(&format!("  {} up, {} MiB free of {} MiB, {} current replicas", s.addr, free >> 20, total >> 20, s.replicas));
                    match &s.scrub {
                        Some(r) if r.passes > 0 => out.push_str(&format!(", scrub: {} corrupt blocks in {} chunks\n", r.corrupt_blocks.len(), r.chunks_checked)),
                        _ => out.push_str(", scrub: no pass yet\n"),
                    }
                }
                Err(e) => out.push_str(&format!("  {} DOWN ({e}), {} current replicas\n", s.addr, s.replicas)),
            }
        }
        let h = &self.health;
        out.push_str(&format!(
            "chunks: {}, under-replicated: {}, unavailable: {}, stale replicas: {}, shared by clones: {} (`fs-agent heal` re-replicates)\n",
            h.chunks, h.under_replicated, h.unavailable, h.stale_replicas, h.shared
        ));
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
        let h = replica_health([(3, &healthy, 1), (3, &degraded, 1), (1, &lost, 1)]);
        assert_eq!(h, ReplicaHealth { chunks: 3, under_replicated: 2, unavailable: 1, stale_replicas: 2, shared: 0 });
    }

    #[test]
    fn a_shared_chunk_counts_once_with_the_most_copies_wanted() {
        let mut other = chunk(&[1, 1], 1);
        other.chunk_id = 2;
        let distinct = distinct_chunks([(2, chunk(&[1, 1], 1)), (3, chunk(&[1, 1], 1)), (2, other)]);
        assert_eq!(distinct.iter().map(|(d, c, r)| (*d, c.chunk_id, *r)).collect::<Vec<_>>(), vec![(3, 1, 2), (2, 2, 1)]);
        let h = replica_health(distinct.iter().map(|(d, c, r)| (*d, c, *r)));
        assert_eq!(h, ReplicaHealth { chunks: 2, under_replicated: 1, unavailable: 0, stale_replicas: 0, shared: 1 });
    }
}
