//! Healing as a service (`fs-agent healer`; `fs-agent heal` is one pass of it).
//!
//! A pass:
//! 1. asks every registered chunk server for its capacity. A server that does not answer and
//!    has sent no heartbeat for `dead_after_secs` is declared dead (`/fs/dead/<addr>`, see
//!    [`crate::servers`]); one that does not answer for less than that is left alone, so a
//!    restart costs no copies;
//! 2. heals every file with a chunk that [`needs_healing`] and that healing can improve
//!    ([`can_improve`]), under the file's write lease ([`FileData::heal_file`]): short chunks
//!    get copies on servers that stay, then stale entries and replicas on servers that leave
//!    (dead, draining, removed) are dropped. Files someone is writing are skipped: their
//!    writer's mount heals them;
//! 3. repairs the corrupt blocks the servers' scrubs found, from a good replica;
//! 4. counts what is left and records it in `/fs/healer/status`, which `fs-agent status` shows.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::chunk_protocol::{ChunkRequest, ChunkResponse};
use crate::file_data::{DataError, FileData};
use crate::metadata_store::Mutation;
use crate::namespace::{ChunkInfo, Inode, Namespace, NamespaceError, Replica, WriteLease};
use crate::servers::{self, Liveness, ServerStates};
use crate::status;

pub const STATUS_KEY: &str = "/fs/healer/status";

/// Pure: whether healing would change `chunk`, of a file that wants `copies`: fewer current
/// copies on servers that stay, stale entries, or replicas on servers that leave.
pub fn needs_healing(chunk: &ChunkInfo, copies: u32, states: &ServerStates) -> bool {
    let current = chunk.current_servers();
    let staying = current.iter().filter(|s| !states.retiring(s)).count();
    staying < copies as usize || current.len() != chunk.replicas.len() || staying != current.len()
}

/// Pure: whether healing `chunk` now can change anything, with the servers `answering`: drop
/// stale entries, copy it to a server that stays and holds none, or drop replicas on leaving
/// servers because enough copies stay. A chunk no current replica of which answers cannot be
/// copied.
pub fn can_improve(chunk: &ChunkInfo, copies: u32, states: &ServerStates, answering: &BTreeSet<String>) -> bool {
    let current = chunk.current_servers();
    if !current.iter().any(|s| answering.contains(s)) {
        return false;
    }
    let staying = current.iter().filter(|s| !states.retiring(s)).count();
    let has_target = answering.iter().any(|s| states.placeable(s) && !current.contains(s));
    current.len() != chunk.replicas.len() || (staying < copies as usize && has_target) || (staying >= copies as usize && staying != current.len())
}

/// Pure: the record of `chunk` after copying it to `added` (at its version), and the replicas
/// dropped from it: stale entries and, once `copies` stay without them, the replicas on
/// leaving servers (kept until then: a dead server may come back).
pub fn healed_replicas(chunk: &ChunkInfo, copies: u32, states: &ServerStates, added: &[String]) -> (ChunkInfo, Vec<Replica>) {
    let current = chunk.current_servers();
    let staying = current.iter().filter(|s| !states.retiring(s)).count();
    let drop_leaving = staying + added.len() >= copies as usize;
    let kept: Vec<String> = current.iter().filter(|s| !(drop_leaving && states.retiring(s))).chain(added).cloned().collect();
    let dropped = chunk.replicas.iter().filter(|r| !kept.contains(&r.server)).cloned().collect();
    let replicas = kept.into_iter().map(|server| Replica { server, version: chunk.version }).collect();
    (ChunkInfo { chunk_id: chunk.chunk_id, version: chunk.version, replicas }, dropped)
}

#[derive(Debug, Clone)]
pub struct HealerOptions {
    /// The healer's name in write leases and in its status record. A restarted healer with
    /// the same name gets back the leases it held when it died.
    pub holder: String,
    /// A server that neither answers nor sends a heartbeat for this long is dead.
    pub dead_after_secs: u64,
    /// Also repair the corrupt blocks the servers' scrubs report.
    pub repair_scrubbed: bool,
}

/// What the last pass did and found (`/fs/healer/status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealerStatus {
    pub holder: String,
    pub finished_unix_secs: u64,
    pub pass_millis: u64,
    pub passes: u64,
    /// This pass.
    pub replicas_copied: u64,
    pub bytes_copied: u64,
    pub blocks_repaired: u64,
    /// Corrupt blocks with no good replica that answers.
    pub blocks_unrepairable: u64,
    /// Since this healer started.
    pub total_replicas_copied: u64,
    pub total_bytes_copied: u64,
    pub total_blocks_repaired: u64,
    /// Left after this pass (counted as `fs-agent status` does).
    pub under_replicated: u64,
    pub unavailable: u64,
    /// Files skipped because someone holds their write lease (their mount heals them).
    pub files_busy: u64,
    pub dead_servers: Vec<String>,
    /// Servers not answering, still within their grace period.
    pub down_servers: Vec<String>,
    /// Why files could not be healed this pass, if some could not.
    pub errors: Vec<String>,
}

impl HealerStatus {
    pub fn read(ns: &Namespace) -> Result<Option<HealerStatus>, NamespaceError> {
        Ok(ns.store().get(STATUS_KEY)?.and_then(|v| serde_json::from_slice(&v.value).ok()))
    }

    fn write(&self, ns: &Namespace) -> Result<(), NamespaceError> {
        let value = serde_json::to_vec(self).expect("healer status serializes");
        ns.store().commit(&[], &[Mutation::Put { key: STATUS_KEY.to_string(), value }])?;
        Ok(())
    }

    /// One line for `fs-agent status`.
    pub fn render(&self, now_unix_secs: u64) -> String {
        let mut line = format!(
            "healer {}: last pass {} s ago ({} ms): {} replicas copied ({} MiB), {} corrupt blocks repaired; left: {} under-replicated, {} unavailable; {} files skipped (being written); {} replicas copied ({} MiB) and {} blocks repaired in {} passes",
            self.holder,
            now_unix_secs.saturating_sub(self.finished_unix_secs),
            self.pass_millis,
            self.replicas_copied,
            self.bytes_copied >> 20,
            self.blocks_repaired,
            self.under_replicated,
            self.unavailable,
            self.files_busy,
            self.total_replicas_copied,
            self.total_bytes_copied >> 20,
            self.total_blocks_repaired,
            self.passes
        );
        if !self.dead_servers.is_empty() {
            line.push_str(&format!("; dead: {}", self.dead_servers.join(", ")));
        }
        if !self.down_servers.is_empty() {
            line.push_str(&format!("; down, within the grace period: {}", self.down_servers.join(", ")));
        }
        if self.blocks_unrepairable > 0 {
            line.push_str(&format!("; {} corrupt blocks have no good replica", self.blocks_unrepairable));
        }
        if !self.errors.is_empty() {
            line.push_str(&format!("; errors: {}", self.errors.join("; ")));
        }
        line
    }
}

/// The registered servers that answer a capacity request, asked in parallel.
pub fn answering(data: &FileData, servers: &[String]) -> BTreeSet<String> {
    let client = data.chunk_client();
    std::thread::scope(|scope| {
        let handles: Vec<_> = servers.iter().map(|s| (s, scope.spawn(move || client.call(s, &ChunkRequest::Capacity)))).collect();
        handles.into_iter().filter_map(|(s, h)| matches!(h.join().expect("capacity call thread"), Ok(ChunkResponse::Capacity { .. })).then(|| s.clone())).collect()
    })
}

/// Declares dead the servers silent for the grace period, revives those that answer again;
/// returns `(dead, down within the grace period)`.
fn judge_servers(ns: &Namespace, answering: &BTreeSet<String>, dead_after_secs: u64) -> Result<(Vec<String>, Vec<String>), NamespaceError> {
    let before = ServerStates::load(ns)?;
    let now = servers::unix_now_millis();
    let (mut dead, mut down) = (vec![], vec![]);
    for record in before.records.values() {
        let heartbeat_secs = record.heartbeat_unix_millis / 1000;
        match servers::liveness(record, answering.contains(&record.addr), now, dead_after_secs) {
            Liveness::Up => {
                if before.is_dead(&record.addr) {
                    tracing::info!(server = %record.addr, "a dead chunk server answers again");
                    servers::clear_dead(ns, &record.addr)?;
                }
            }
            Liveness::Down { silent_secs } => {
                tracing::info!(server = %record.addr, silent_secs, dead_after_secs, "chunk server down, within its grace period");
                down.push(record.addr.clone());
            }
            Liveness::Dead { silent_secs } => {
                if !before.is_dead(&record.addr) {
                    tracing::warn!(server = %record.addr, silent_secs, last_heartbeat = heartbeat_secs, "chunk server declared dead: its replicas are copied elsewhere");
                    servers::declare_dead(ns, &record.addr, record.heartbeat_unix_millis)?;
                }
                dead.push(record.addr.clone());
            }
        }
    }
    Ok((dead, down))
}

/// Gives up the write leases `holder` still holds (left by a healer that died mid-pass).
pub fn release_leftover_leases(ns: &Namespace, holder: &str) -> Result<usize, NamespaceError> {
    let mut released = 0;
    for (key, v) in ns.store().list_prefix("/fs/leases/")? {
        let Ok(lease) = serde_json::from_slice::<WriteLease>(&v.value) else { continue };
        let Some(ino) = key.rsplit('/').next().and_then(|h| u64::from_str_radix(h, 16).ok()) else { continue };
        if lease.holder.as_deref() == Some(holder) {
            ns.release_lease(&crate::namespace::HeldLease { ino, epoch: lease.epoch, revision: v.revision })?;
            released += 1;
        }
    }
    Ok(released)
}

/// One healing pass (see the module documentation). `previous`: the last pass of this healer,
/// for the totals.
pub fn pass(data: &FileData, options: &HealerOptions, previous: &HealerStatus) -> Result<HealerStatus, DataError> {
    let started = Instant::now();
    let ns = data.namespace();
    let registered = ns.servers()?;
    let up = answering(data, &registered);
    let (dead_servers, down_servers) = judge_servers(ns, &up, options.dead_after_secs)?;
    let states = ServerStates::load(ns)?;

    let files = status::files(ns)?;
    let mut chunks_of: HashMap<u64, Vec<ChunkInfo>> = HashMap::new();
    for (ino, chunk) in status::chunk_records(ns)? {
        chunks_of.entry(ino).or_default().push(chunk);
    }
    let mut outcome = HealerStatus { holder: options.holder.clone(), dead_servers, down_servers, ..HealerStatus::default() };
    for inode in &files {
        let chunks = chunks_of.get(&inode.ino).map(Vec::as_slice).unwrap_or_default();
        if !chunks.iter().any(|c| needs_healing(c, inode.replicas, &states) && can_improve(c, inode.replicas, &states, &up)) {
            continue;
        }
        match heal_one(data, options, inode) {
            Ok(Some(healed)) => {
                outcome.replicas_copied += healed.copied;
                outcome.bytes_copied += healed.bytes_copied;
            }
            Ok(None) => outcome.files_busy += 1,
            Err(e) => {
                tracing::warn!(ino = inode.ino, "cannot heal file: {e}");
                outcome.errors.push(format!("inode {}: {e}", inode.ino));
            }
        }
    }
    if options.repair_scrubbed {
        let by_id: HashMap<u64, &ChunkInfo> = chunks_of.values().flatten().map(|c| (c.chunk_id, c)).collect();
        let (repaired, unrepairable) = repair_scrubbed(data, &up, &by_id);
        outcome.blocks_repaired = repaired;
        outcome.blocks_unrepairable = unrepairable;
    }

    // What is left, counted as `fs-agent status` counts it.
    let states = ServerStates::load(ns)?;
    let desired: HashMap<u64, u32> = files.iter().map(|i| (i.ino, i.replicas)).collect();
    let records = status::chunk_records(ns)?.into_iter().map(|(ino, c)| (desired.get(&ino).copied().unwrap_or(3), c));
    let chunks = status::distinct_chunks(records);
    let health = status::replica_health(chunks.iter().map(|(d, c, r)| (*d, c, *r)), |s| up.contains(s), |s| states.retiring(s));
    outcome.under_replicated = health.under_replicated;
    outcome.unavailable = health.unavailable;
    outcome.passes = previous.passes + 1;
    outcome.total_replicas_copied = previous.total_replicas_copied + outcome.replicas_copied;
    outcome.total_bytes_copied = previous.total_bytes_copied + outcome.bytes_copied;
    outcome.total_blocks_repaired = previous.total_blocks_repaired + outcome.blocks_repaired;
    outcome.pass_millis = started.elapsed().as_millis() as u64;
    outcome.finished_unix_secs = servers::unix_now();
    outcome.write(ns)?;
    Ok(outcome)
}

/// Heals one file under its write lease; `None` if someone else holds it.
fn heal_one(data: &FileData, options: &HealerOptions, inode: &Inode) -> Result<Option<crate::file_data::HealOutcome>, DataError> {
    let ns = data.namespace();
    let lease = match ns.acquire_lease(inode.ino, &options.holder, false) {
        Ok(lease) => lease,
        Err(NamespaceError::LeaseBusy { .. }) => return Ok(None),
        Err(NamespaceError::NotFound { .. }) => return Ok(Some(Default::default())),
        Err(e) => return Err(e.into()),
    };
    // No fence: the lease was free, so whoever wrote before has let go of it or was fenced by
    // the takeover that took it. A fence would also mark servers within their grace period stale.
    // The size and copies as of now, under the lease.
    let result = ns.inode(inode.ino).map_err(DataError::from).and_then(|current| data.heal_file(&lease, current.replicas, current.size, None));
    ns.release_lease(&lease)?;
    if let Err(DataError::Namespace(NamespaceError::NotFound { .. })) = result {
        return Ok(Some(Default::default()));
    }
    let healed = result?;
    if healed.copied > 0 || healed.still_under_replicated > 0 {
        tracing::info!(ino = inode.ino, copied = healed.copied, bytes = healed.bytes_copied, short = healed.still_under_replicated, "healed a file");
    }
    Ok(Some(healed))
}

/// Repairs the corrupt blocks in the servers' scrub reports from another current replica;
/// returns `(repaired, unrepairable)`. Blocks of replicas nobody reads (stale, or of deleted
/// chunks) are left alone.
fn repair_scrubbed(data: &FileData, up: &BTreeSet<String>, chunks: &HashMap<u64, &ChunkInfo>) -> (u64, u64) {
    let (mut repaired, mut unrepairable) = (0, 0);
    for server in up {
        let report = match data.chunk_client().call(server, &ChunkRequest::ScrubReport) {
            Ok(ChunkResponse::Scrub(report)) => report,
            _ => continue,
        };
        for (chunk_id, block) in report.corrupt_blocks {
            let Some(chunk) = chunks.get(&chunk_id) else { continue };
            let current = chunk.current_servers();
            if !current.contains(server) {
                continue;
            }
            let mut outcome = None;
            for good in current.iter().filter(|s| *s != server && up.contains(*s)) {
                match data.repair_block(chunk, good, server, block) {
                    Ok(done) => {
                        outcome = Some(done);
                        break;
                    }
                    Err(_) => continue,
                }
            }
            match outcome {
                Some(true) => repaired += 1,
                Some(false) => {} // repaired since the scrub (by a reader or an earlier pass)
                None => {
                    tracing::warn!(chunk_id, block, %server, "corrupt block has no good replica that answers");
                    unrepairable += 1;
                }
            }
        }
    }
    (repaired, unrepairable)
}

/// Runs passes every `interval` until the process ends.
pub fn run(data: &FileData, options: &HealerOptions, interval: Duration) -> ! {
    match release_leftover_leases(data.namespace(), &options.holder) {
        Ok(0) => {}
        Ok(n) => tracing::info!(n, holder = %options.holder, "released write leases left by an earlier run"),
        Err(e) => tracing::warn!("cannot release write leases left by an earlier run: {e}"),
    }
    tracing::info!(holder = %options.holder, interval_secs = interval.as_secs_f64(), dead_after_secs = options.dead_after_secs, "healer running");
    let mut last = HealerStatus::default();
    loop {
        match pass(data, options, &last) {
            Ok(status) => {
                let had_work = status.replicas_copied > 0 || status.blocks_repaired > 0 || status.under_replicated > 0;
                if had_work {
                    tracing::info!(
                        copied = status.replicas_copied,
                        bytes = status.bytes_copied,
                        repaired_blocks = status.blocks_repaired,
                        under_replicated = status.under_replicated,
                        unavailable = status.unavailable,
                        busy_files = status.files_busy,
                        dead = ?status.dead_servers,
                        "healer pass"
                    );
                } else {
                    tracing::debug!(millis = status.pass_millis, "healer pass: nothing to do");
                }
                last = status;
            }
            Err(e) => {
                tracing::warn!("healer pass failed: {e}");
                let failed = HealerStatus { errors: vec![e.to_string()], finished_unix_secs: servers::unix_now(), ..last.clone() };
                if let Err(e) = failed.write(data.namespace()) {
                    tracing::warn!("cannot record the healer's status: {e}");
                }
            }
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::servers::{DeadRecord, DrainRecord, ServerRecord};
    use std::collections::BTreeMap;

    fn chunk(replicas: &[(&str, u64)], version: u64) -> ChunkInfo {
        ChunkInfo { chunk_id: 7, version, replicas: replicas.iter().map(|(s, v)| Replica { server: s.to_string(), version: *v }).collect() }
    }

    /// Servers a..e registered; `draining` and `dead` ones as given.
    fn states(draining: &[&str], dead: &[&str]) -> ServerStates {
        let records = ["a", "b", "c", "d", "e"].iter().map(|s| ServerRecord { addr: s.to_string(), heartbeat_unix_millis: 1000, heartbeat_interval_secs: 1 }).collect();
        let draining = draining.iter().map(|s| (s.to_string(), DrainRecord { since_unix_secs: 1 })).collect();
        let dead: BTreeMap<String, DeadRecord> = dead.iter().map(|s| (s.to_string(), DeadRecord { since_unix_secs: 1, last_heartbeat_unix_millis: 1000 })).collect();
        ServerStates::new(records, draining, dead)
    }

    fn set(servers: &[&str]) -> BTreeSet<String> {
        servers.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn what_needs_healing() {
        let none = states(&[], &[]);
        let healthy = chunk(&[("a", 2), ("b", 2), ("c", 2)], 2);
        assert!(!needs_healing(&healthy, 3, &none));
        assert!(needs_healing(&healthy, 4, &none), "more copies wanted");
        assert!(needs_healing(&chunk(&[("a", 2), ("b", 2), ("c", 1)], 2), 2, &none), "a stale entry to drop");
        assert!(needs_healing(&healthy, 3, &states(&["b"], &[])), "a replica on a draining server");
        assert!(needs_healing(&healthy, 3, &states(&[], &["c"])), "a replica on a dead server");
        assert!(needs_healing(&chunk(&[("a", 2), ("b", 2), ("gone", 2)], 2), 3, &none), "a replica on a removed server");
    }

    #[test]
    fn healing_can_improve_only_with_a_source_and_a_target() {
        let dead_c = states(&[], &["c"]);
        let on_c = chunk(&[("a", 2), ("b", 2), ("c", 2)], 2);
        assert!(can_improve(&on_c, 3, &dead_c, &set(&["a", "b", "d"])), "d can take a copy");
        assert!(!can_improve(&on_c, 3, &dead_c, &set(&["a", "b"])), "nowhere to copy to: the dead replica stays listed");
        assert!(can_improve(&on_c, 2, &dead_c, &set(&["a", "b"])), "enough copies stay: drop the dead one");
        assert!(!can_improve(&chunk(&[("c", 2)], 2), 3, &dead_c, &set(&["a", "b", "d"])), "no replica answers");
        assert!(can_improve(&chunk(&[("a", 2), ("b", 2), ("c", 1)], 2), 2, &states(&[], &[]), &set(&["a", "b"])), "a stale entry goes");
        // A server down within its grace period (not dead) still counts: nothing to do.
        assert!(!needs_healing(&on_c, 3, &states(&[], &[])));
    }

    #[test]
    fn leaving_replicas_go_only_once_enough_copies_stay() {
        let dead_c = states(&[], &["c"]);
        let on_c = chunk(&[("a", 2), ("b", 2), ("c", 2), ("d", 1)], 2);
        let (healed, dropped) = healed_replicas(&on_c, 3, &dead_c, &["e".to_string()]);
        assert_eq!(healed.current_servers(), vec!["a", "b", "e"]);
        assert_eq!(dropped.iter().map(|r| r.server.as_str()).collect::<Vec<_>>(), vec!["c", "d"]);
        // Nowhere to copy: the dead replica stays listed (it may come back); the stale one goes.
        let (healed, dropped) = healed_replicas(&on_c, 3, &dead_c, &[]);
        assert_eq!(healed.current_servers(), vec!["a", "b", "c"]);
        assert_eq!(dropped.iter().map(|r| r.server.as_str()).collect::<Vec<_>>(), vec!["d"]);
        // A stale entry on a server that just got a fresh copy is not dropped: it is current now.
        let (healed, dropped) = healed_replicas(&on_c, 3, &dead_c, &["d".to_string()]);
        assert_eq!(healed.current_servers(), vec!["a", "b", "d"]);
        assert_eq!(dropped.iter().map(|r| r.server.as_str()).collect::<Vec<_>>(), vec!["c"]);
        assert!(healed.replicas.iter().all(|r| r.version == 2));
    }
}
