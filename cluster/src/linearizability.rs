//! A linearizability checker for per-key register histories (Wing & Gong's search with Lowe's
//! memoization of (linearized set, register state)).
//!
//! Keys are independent registers, so a history is checked key by key (P-compositionality).
//! An operation whose outcome is unknown (the client gave up) may or may not have taken effect:
//! it may be linearized anywhere after its call, or never.

use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RegisterOp {
    Write {
        value: u64,
    },
    /// Read that saw `value` (`None` = key absent).
    Read {
        value: Option<u64>,
    },
    /// Compare-and-swap that `succeeded` or not.
    Cas {
        expected: Option<u64>,
        new: u64,
        succeeded: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub key: String,
    pub op: RegisterOp,
    /// Monotonic times (any unit) of invocation and answer; `returned: None` = outcome unknown.
    pub called: u64,
    pub returned: Option<u64>,
    pub client: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("history of key {key:?} is not linearizable ({operations} operations); the shortest unexplained prefix ends at time {stuck_at}")]
    Violation {
        key: String,
        operations: usize,
        stuck_at: u64,
    },
    #[error("history of key {key:?} is too large to check within {limit} search states")]
    TooLarge { key: String, limit: usize },
}

/// Search states explored per key before giving up.
pub const SEARCH_LIMIT: usize = 5_000_000;

/// Checks every key's history.
pub fn check(history: &[Operation]) -> Result<(), CheckError> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        // A read with no answer says nothing.
        if op.returned.is_none() && matches!(op.op, RegisterOp::Read { .. }) {
            continue;
        }
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        check_register(key, &ops)?;
    }
    Ok(())
}

fn apply(state: Option<u64>, op: &RegisterOp, completed: bool) -> Option<Option<u64>> {
    match op {
        RegisterOp::Write { value } => Some(Some(*value)),
        RegisterOp::Read { value } => (state == *value).then_some(state),
        RegisterOp::Cas {
            expected,
            new,
            succeeded,
        } => {
            let matches = state == *expected;
            if !completed {
                // Unknown outcome: if it took effect, it succeeded.
                return matches.then_some(Some(*new));
            }
            match (matches, succeeded) {
                (true, true) => Some(Some(*new)),
                (false, false) => Some(state),
                _ => None,
            }
        }
    }
}

struct Search<'a> {
    ops: &'a [&'a Operation],
    seen: HashSet<(Vec<u64>, Option<u64>)>,
    best_prefix: usize,
    stuck_at: u64,
}

fn check_register(key: &str, ops: &[&Operation]) -> Result<(), CheckError> {
    let mut ops: Vec<&Operation> = ops.to_vec();
    ops.sort_by_key(|o| o.called);
    let mut search = Search {
        ops: &ops,
        seen: HashSet::new(),
        best_prefix: 0,
        stuck_at: 0,
    };
    let mut done = vec![0u64; ops.len().div_ceil(64)];
    match search.explore(&mut done, None, 0) {
        Some(true) => Ok(()),
        Some(false) => Err(CheckError::Violation {
            key: key.into(),
            operations: ops.len(),
            stuck_at: search.stuck_at,
        }),
        None => Err(CheckError::TooLarge {
            key: key.into(),
            limit: SEARCH_LIMIT,
        }),
    }
}

impl Search<'_> {
    /// Some(true) if the remaining operations linearize from `state`; None if over the limit.
    fn explore(
        &mut self,
        done: &mut Vec<u64>,
        state: Option<u64>,
        linearized: usize,
    ) -> Option<bool> {
        let is_done = |done: &Vec<u64>, i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // Every completed operation linearized: success (unknown ones may never have happened).
        let earliest_return = (0..self.ops.len())
            .filter(|i| !is_done(done, *i))
            .filter_map(|i| self.ops[i].returned)
            .min();
        let Some(earliest_return) = earliest_return else {
            return Some(true);
        };
        if !self.seen.insert((done.clone(), state)) {
            return Some(false);
        }
        if self.seen.len() > SEARCH_LIMIT {
            return None;
        }
        if linearized >= self.best_prefix {
            self.best_prefix = linearized;
            self.stuck_at = earliest_return;
        }
        // Candidates: not yet linearized and called before the earliest pending answer.
        for i in 0..self.ops.len() {
            if is_done(done, i) {
                continue;
            }
            let op = self.ops[i];
            if op.called > earliest_return {
                break; // sorted by call time
            }
            if let Some(next) = apply(state, &op.op, op.returned.is_some()) {
                done[i / 64] |= 1 << (i % 64);
                let result = self.explore(done, next, linearized + 1);
                done[i / 64] &= !(1 << (i % 64));
                match result {
                    Some(true) => return Some(true),
                    None => return None,
                    Some(false) => {}
                }
            }
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, op: RegisterOp, called: u64, returned: Option<u64>) -> Operation {
        Operation {
            key: "k".into(),
            op,
            called,
            returned,
            client,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(1, RegisterOp::Write { value: 1 }, 0, Some(1)),
            op(1, RegisterOp::Read { value: Some(1) }, 2, Some(3)),
            op(
                2,
                RegisterOp::Cas {
                    expected: Some(1),
                    new: 2,
                    succeeded: true,
                },
                4,
                Some(5),
            ),
            op(
                2,
                RegisterOp::Cas {
                    expected: Some(1),
                    new: 3,
                    succeeded: false,
                },
                6,
                Some(7),
            ),
            op(1, RegisterOp::Read { value: Some(2) }, 8, Some(9)),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn stale_read_is_a_violation() {
        let h = vec![
            op(1, RegisterOp::Write { value: 1 }, 0, Some(1)),
            op(1, RegisterOp::Write { value: 2 }, 2, Some(3)),
            op(2, RegisterOp::Read { value: Some(1) }, 4, Some(5)),
        ];
        assert!(matches!(check(&h), Err(CheckError::Violation { .. })));
    }

    #[test]
    fn concurrent_operations_may_take_any_order() {
        let h = vec![
            op(1, RegisterOp::Write { value: 1 }, 0, Some(10)),
            op(2, RegisterOp::Write { value: 2 }, 1, Some(9)),
            op(3, RegisterOp::Read { value: Some(1) }, 11, Some(12)),
            op(4, RegisterOp::Read { value: None }, 0, Some(2)),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn unknown_outcome_may_apply_late_or_never() {
        // The write of 5 never answered: a read may see it...
        let h = vec![
            op(1, RegisterOp::Write { value: 5 }, 0, None),
            op(2, RegisterOp::Read { value: None }, 1, Some(2)),
            op(2, RegisterOp::Read { value: Some(5) }, 3, Some(4)),
        ];
        assert_eq!(check(&h), Ok(()));
        // ...but once seen it cannot be unseen.
        let h = vec![
            op(1, RegisterOp::Write { value: 5 }, 0, None),
            op(2, RegisterOp::Read { value: Some(5) }, 3, Some(4)),
            op(2, RegisterOp::Read { value: None }, 5, Some(6)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn lost_acknowledged_write_is_a_violation() {
        let h = vec![
            op(1, RegisterOp::Write { value: 1 }, 0, Some(1)),
            op(2, RegisterOp::Read { value: None }, 2, Some(3)),
        ];
        assert!(check(&h).is_err());
    }
}
