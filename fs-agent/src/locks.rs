//! POSIX byte-range locks (fcntl F_SETLK/F_SETLKW/F_GETLK) that hold across nodes: each
//! file's locks are one record in the metadata store, changed with compare-and-commit.
//! The range arithmetic here is pure; [`crate::namespace::Namespace`] stores the records.

use serde::{Deserialize, Serialize};

/// One lock held by `owner` (the kernel's lock owner: a process's file table) on `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLock {
    pub node: String,
    pub owner: u64,
    pub pid: u32,
    /// First and last byte, inclusive (u64::MAX: to the end of the file).
    pub start: u64,
    pub end: u64,
    pub exclusive: bool,
}

impl RangeLock {
    fn same_owner(&self, node: &str, owner: u64) -> bool {
        self.node == node && self.owner == owner
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// The first lock of another owner that a lock on `[start, end]` would conflict with.
pub fn find_conflict<'a>(locks: &'a [RangeLock], node: &str, owner: u64, start: u64, end: u64, exclusive: bool) -> Option<&'a RangeLock> {
    locks.iter().find(|l| !l.same_owner(node, owner) && l.overlaps(start, end) && (exclusive || l.exclusive))
}

/// The locks after `owner` unlocks `[start, end]`: its ranges there are removed or cut.
pub fn unlock(locks: Vec<RangeLock>, node: &str, owner: u64, start: u64, end: u64) -> Vec<RangeLock> {
    let mut out = Vec::with_capacity(locks.len());
    for l in locks {
        if !l.same_owner(node, owner) || !l.overlaps(start, end) {
            out.push(l);
            continue;
        }
        if l.start < start {
            out.push(RangeLock { end: start - 1, ..l.clone() });
        }
        if l.end > end {
            out.push(RangeLock { start: end + 1, ..l.clone() });
        }
    }
    out
}

/// The locks after `owner` takes `[start, end]` (its own overlapping ranges are replaced,
/// as POSIX converts them). The caller checked for conflicts.
pub fn lock(locks: Vec<RangeLock>, node: &str, owner: u64, pid: u32, start: u64, end: u64, exclusive: bool) -> Vec<RangeLock> {
    let mut out = unlock(locks, node, owner, start, end);
    out.push(RangeLock { node: node.to_string(), owner, pid, start, end, exclusive });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_locks_coexist_exclusive_ones_conflict() {
        let locks = lock(vec![], "a", 1, 10, 0, 99, false);
        assert!(find_conflict(&locks, "b", 2, 50, 60, false).is_none());
        assert_eq!(find_conflict(&locks, "b", 2, 50, 60, true).map(|l| l.pid), Some(10));
        assert!(find_conflict(&locks, "b", 2, 100, 200, true).is_none());
        // The same owner on another node is another owner.
        assert!(find_conflict(&locks, "b", 1, 0, 0, true).is_some());
        // An owner never conflicts with itself.
        assert!(find_conflict(&locks, "a", 1, 0, 0, true).is_none());
    }

    #[test]
    fn unlocking_the_middle_splits_a_range() {
        let locks = lock(vec![], "a", 1, 10, 0, 99, true);
        let locks = unlock(locks, "a", 1, 40, 59);
        let ranges: Vec<(u64, u64)> = locks.iter().map(|l| (l.start, l.end)).collect();
        assert_eq!(ranges, vec![(0, 39), (60, 99)]);
        assert!(find_conflict(&locks, "b", 2, 40, 59, true).is_none());
        let locks = unlock(locks, "a", 1, 0, u64::MAX);
        assert!(locks.is_empty());
    }

    #[test]
    fn relocking_converts_the_overlap() {
        let locks = lock(vec![], "a", 1, 10, 0, 99, true);
        let locks = lock(locks, "a", 1, 10, 50, 149, false);
        assert!(find_conflict(&locks, "b", 2, 60, 60, false).is_none());
        assert!(find_conflict(&locks, "b", 2, 10, 10, false).is_some());
    }
}
