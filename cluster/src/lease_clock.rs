//! Lease deadlines on the leader's monotonic clock.
//!
//! The replicated state holds each lease's TTL and the log index of its last refresh; only the
//! leader keeps deadlines, measured with `Instant` (monotonic, never wall time). A new leader
//! restarts every deadline at a full TTL from its election, so a lease can outlive its TTL by a
//! leader change but never expires before its holder stopped refreshing it for a full TTL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::state_machine::{Lease, LeaseId};

#[derive(Debug, Default)]
pub struct LeaseClock {
    /// lease -> (refreshed_index seen, deadline)
    deadlines: HashMap<LeaseId, (u64, Instant)>,
    /// Expiries proposed and not yet applied, with when they were proposed (to retry).
    proposed: HashMap<LeaseId, Instant>,
}

impl LeaseClock {
    /// Brings deadlines in line with the replicated leases: a new or refreshed lease gets a full
    /// TTL from `now`, a vanished one is forgotten.
    pub fn sync<'a>(
        &mut self,
        leases: impl Iterator<Item = (&'a LeaseId, &'a Lease)>,
        now: Instant,
    ) {
        let mut seen = HashMap::with_capacity(self.deadlines.len());
        for (id, lease) in leases {
            let entry = match self.deadlines.get(id) {
                Some((refreshed, deadline)) if *refreshed == lease.refreshed_index => {
                    (*refreshed, *deadline)
                }
                _ => {
                    self.proposed.remove(id);
                    (
                        lease.refreshed_index,
                        now + Duration::from_millis(lease.ttl_ms),
                    )
                }
            };
            seen.insert(*id, entry);
        }
        self.proposed.retain(|id, _| seen.contains_key(id));
        self.deadlines = seen;
    }

    /// On becoming leader: forget every deadline, so the next `sync` gives each lease a full
    /// TTL from then (the previous leader's clock is not ours to trust).
    pub fn restart_all(&mut self) {
        self.deadlines.clear();
        self.proposed.clear();
    }

    /// Leases past their deadline that need an expiry proposal, as (id, refreshed_index).
    /// An expiry proposed less than `retry_after` ago is not proposed again.
    pub fn due(&mut self, now: Instant, retry_after: Duration) -> Vec<(LeaseId, u64)> {
        let mut due = Vec::new();
        for (id, (refreshed, deadline)) in &self.deadlines {
            if *deadline <= now {
                let recently = self
                    .proposed
                    .get(id)
                    .is_some_and(|at| now.duration_since(*at) < retry_after);
                if !recently {
                    due.push((*id, *refreshed));
                }
            }
        }
        for (id, _) in &due {
            self.proposed.insert(*id, now);
        }
        due.sort();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn lease(ttl_ms: u64, refreshed_index: u64) -> Lease {
        Lease {
            ttl_ms,
            refreshed_index,
            ..Default::default()
        }
    }

    #[test]
    fn expires_after_ttl_unless_refreshed() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        let mut leases = BTreeMap::from([(1, lease(1000, 5)), (2, lease(3000, 6))]);
        clock.sync(leases.iter(), t0);
        assert!(clock
            .due(t0 + Duration::from_millis(999), Duration::from_secs(1))
            .is_empty());
        assert_eq!(
            clock.due(t0 + Duration::from_millis(1000), Duration::from_secs(1)),
            vec![(1, 5)]
        );
        // Not proposed twice within the retry interval.
        assert!(clock
            .due(t0 + Duration::from_millis(1500), Duration::from_secs(1))
            .is_empty());
        // A refresh (new index) restarts the TTL.
        leases.insert(1, lease(1000, 9));
        clock.sync(leases.iter(), t0 + Duration::from_millis(1600));
        assert!(clock
            .due(t0 + Duration::from_millis(2500), Duration::from_secs(1))
            .is_empty());
        assert_eq!(
            clock.due(t0 + Duration::from_millis(3000), Duration::from_secs(1)),
            vec![(1, 9), (2, 6)]
        );
    }

    #[test]
    fn new_leader_restarts_deadlines() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        let leases = BTreeMap::from([(1, lease(1000, 5))]);
        clock.sync(leases.iter(), t0);
        clock.restart_all();
        clock.sync(leases.iter(), t0 + Duration::from_millis(900));
        assert!(clock
            .due(t0 + Duration::from_millis(1800), Duration::from_secs(1))
            .is_empty());
        assert_eq!(
            clock
                .due(t0 + Duration::from_millis(1900), Duration::from_secs(1))
                .len(),
            1
        );
    }
}
