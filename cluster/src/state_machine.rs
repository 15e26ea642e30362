//! The replicated state machine: a revisioned key-value map with transactions,
//! TTL leases, client sessions (exactly-once writes) and cluster membership.
//!
//! Pure logic: no I/O, no clocks. Every member applies the same committed
//! commands in the same order and reaches the same state, so anything that
//! depends on time (lease expiry) arrives here as a command decided by the
//! leader.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A store revision: increases by one with every transaction that changes keys.
pub type Revision = u64;
/// Identifier of a TTL lease.
pub type LeaseId = u64;
/// Identifier of a store member (the Raft node id).
pub type MemberId = u64;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most operations in one transaction.
pub const MAX_TXN_OPS: usize = 1024;
/// A client session unused for this many log entries is forgotten (bounded memory). A client
/// retrying one request across that many entries would get `SessionExpired`, never a double
/// apply.
pub const SESSION_IDLE_ENTRIES: u64 = 1_000_000;
/// How often (in log entries) idle sessions are swept.
const SESSION_SWEEP_EVERY: u64 = 10_000;
/// Shortest and longest lease TTL accepted, in milliseconds.
pub const MIN_LEASE_TTL_MS: u64 = 100;
pub const MAX_LEASE_TTL_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("key is empty: every key needs at least one byte")]
    EmptyKey,
    #[error("key {key_prefix:?}... is {len} bytes, the limit is {MAX_KEY_BYTES}")]
    KeyTooLong { key_prefix: String, len: usize },
    #[error("value of key {key:?} is {len} bytes, the limit is {MAX_VALUE_BYTES}: store large data elsewhere and keep a reference here")]
    ValueTooLarge { key: String, len: usize },
    #[error("transaction has {count} operations, the limit is {MAX_TXN_OPS}: split it")]
    TooManyOps { count: usize },
    #[error("lease {0} does not exist (it expired or was revoked): grant a new lease")]
    LeaseNotFound(LeaseId),
    #[error("lease ttl {ttl_ms} ms is outside {MIN_LEASE_TTL_MS}..={MAX_LEASE_TTL_MS} ms")]
    BadLeaseTtl { ttl_ms: u64 },
    #[error("request {seq} of client {client_id:x} was already acknowledged and forgotten: use a new sequence number")]
    SequenceAlreadyAcknowledged { client_id: u64, seq: u64 },
    #[error("session of client {client_id:x} expired (idle for {SESSION_IDLE_ENTRIES} log entries) and request {seq} was not applied: retry it under a new client id")]
    SessionExpired { client_id: u64, seq: u64 },
    #[error("member {0} is already part of the cluster")]
    MemberExists(MemberId),
    #[error("member {0} is not part of the cluster")]
    MemberNotFound(MemberId),
}

/// One stored key with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last transaction that changed this key.
    pub mod_revision: Revision,
    /// Number of puts since creation (1 after the first put).
    pub version: u64,
    pub lease: Option<LeaseId>,
}

/// A guard of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key's mod revision equals this one; 0 means "the key does not exist".
    ModRevision {
        key: String,
        equals: Revision,
    },
    /// The key exists and holds exactly this value.
    Value {
        key: String,
        equals: Vec<u8>,
    },
    Exists {
        key: String,
    },
    Missing {
        key: String,
    },
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Get {
        key: String,
    },
    /// Keys in `[start, end)` in key order (`end: None` = no upper bound), at most `limit` (0 = no limit).
    Range {
        start: String,
        end: Option<String>,
        limit: usize,
    },
    Delete {
        key: String,
    },
    /// Deletes keys in `[start, end)`.
    DeleteRange {
        start: String,
        end: Option<String>,
    },
}

impl Op {
    pub fn is_read_only(&self) -> bool {
        matches!(self, Op::Get { .. } | Op::Range { .. })
    }
}

/// The upper bound of a prefix scan: the smallest string greater than every key with this prefix.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = char::from_u32(last as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Put { prev: Option<KeyValue> },
    Get(Option<KeyValue>),
    Range { kvs: Vec<KeyValue>, more: bool },
    Delete { deleted: Vec<KeyValue> },
}

/// If every compare holds, run `success`, else `failure`, atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResult {
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: Revision,
    pub results: Vec<OpResult>,
}

/// Addresses of a member, replicated so every member and client can find the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: MemberId,
    pub peer_addr: String,
    pub client_addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Txn(Txn),
    LeaseGrant {
        ttl_ms: u64,
    },
    LeaseKeepAlive {
        id: LeaseId,
    },
    LeaseRevoke {
        id: LeaseId,
    },
    /// Decided by the leader from its monotonic clock. Each lease is expired only if it was not
    /// refreshed since the leader saw it (`refreshed_index`), so a racing keep-alive wins.
    LeaseExpire {
        leases: Vec<(LeaseId, u64)>,
    },
}

impl Command {
    /// Rejects malformed commands before they are proposed (and again at apply, deterministically).
    pub fn validate(&self) -> Result<(), ApplyError> {
        match self {
            Command::Txn(txn) => {
                let count = txn.compare.len() + txn.success.len() + txn.failure.len();
                if count > MAX_TXN_OPS {
                    return Err(ApplyError::TooManyOps { count });
                }
                for compare in &txn.compare {
                    let key = match compare {
                        Compare::ModRevision { key, .. }
                        | Compare::Value { key, .. }
                        | Compare::Exists { key }
                        | Compare::Missing { key } => key,
                    };
                    validate_key(key)?;
                }
                for op in txn.success.iter().chain(&txn.failure) {
                    validate_op(op)?;
                }
                Ok(())
            }
            Command::LeaseGrant { ttl_ms } => {
                if !(MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(ttl_ms) {
                    return Err(ApplyError::BadLeaseTtl { ttl_ms: *ttl_ms });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

pub fn validate_key(key: &str) -> Result<(), ApplyError> {
    if key.is_empty() {
        return Err(ApplyError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        let key_prefix: String = key.chars().take(32).collect();
        return Err(ApplyError::KeyTooLong {
            key_prefix,
            len: key.len(),
        });
    }
    Ok(())
}

pub fn validate_op(op: &Op) -> Result<(), ApplyError> {
    match op {
        Op::Put { key, value, .. } => {
            validate_key(key)?;
            if value.len() > MAX_VALUE_BYTES {
                return Err(ApplyError::ValueTooLarge {
                    key: key.clone(),
                    len: value.len(),
                });
            }
            Ok(())
        }
        Op::Get { key } | Op::Delete { key } => validate_key(key),
        Op::Range { start, .. } | Op::DeleteRange { start, .. } => {
            if start.len() > MAX_KEY_BYTES {
                validate_key(start)?;
            }
            Ok(())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Txn(TxnResult),
    LeaseGranted { id: LeaseId, ttl_ms: u64 },
    LeaseKeptAlive { id: LeaseId, ttl_ms: u64 },
    LeaseRevoked { id: LeaseId, deleted_keys: usize },
    LeasesExpired { expired: Vec<LeaseId> },
}

/// A client command as it travels through the log: the session fields make retries exactly-once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCommand {
    /// Random per client process; 0 = internal command with no deduplication.
    pub client_id: u64,
    /// Increases per command of this client.
    pub seq: u64,
    /// Every sequence number below this one has its answer delivered: the store may forget them.
    pub first_unacknowledged: u64,
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change of one key, as seen by watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: Revision,
    pub kind: EventKind,
    /// For a delete: the key with its last value and metadata.
    pub kv: KeyValue,
    /// Set when the key was deleted because this lease expired.
    pub expired_lease: Option<LeaseId>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ttl_ms: u64,
    pub keys: BTreeSet<String>,
    /// Log index of the grant or last keep-alive.
    pub refreshed_index: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Answers not yet acknowledged by the client, by sequence number.
    answers: BTreeMap<u64, Result<CommandResult, ApplyError>>,
    /// Sequence numbers below this were acknowledged and forgotten.
    acknowledged_below: u64,
    /// Log index of the session's last command.
    last_used_index: u64,
}

/// The whole replicated state. Serialized as is into snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    revision: Revision,
    applied_index: u64,
    keys: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, Lease>,
    next_lease_id: LeaseId,
    sessions: BTreeMap<u64, Session>,
    /// Log index at which idle sessions are swept next.
    next_session_sweep: u64,
    members: BTreeMap<MemberId, MemberInfo>,
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub result: Result<CommandResult, ApplyError>,
    pub events: Vec<Event>,
    /// True when the command was a retry answered from the session, not applied again.
    pub duplicate: bool,
}

impl StateMachine {
    pub fn with_members(members: Vec<MemberInfo>) -> Self {
        StateMachine {
            members: members.into_iter().map(|m| (m.id, m)).collect(),
            next_lease_id: 1,
            ..Default::default()
        }
    }

    /// The state of a new cluster: its members and initial keys (e.g. the cluster CA).
    pub fn bootstrap(members: Vec<MemberInfo>, keys: Vec<(String, Vec<u8>)>) -> Self {
        let mut state = Self::with_members(members);
        if !keys.is_empty() {
            state.revision = 1;
            for (key, value) in keys {
                let kv = KeyValue {
                    key: key.clone(),
                    value,
                    create_revision: 1,
                    mod_revision: 1,
                    version: 1,
                    lease: None,
                };
                state.keys.insert(key, kv);
            }
        }
        state
    }

    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn members(&self) -> &BTreeMap<MemberId, MemberInfo> {
        &self.members
    }

    pub fn leases(&self) -> &BTreeMap<LeaseId, Lease> {
        &self.leases
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        bincode::serialize(self).expect("state machine serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, bincode::Error> {
        bincode::deserialize(bytes)
    }

    /// Records that the log up to `index` is applied (entries with no command, conf changes).
    pub fn set_applied_index(&mut self, index: u64) {
        self.applied_index = self.applied_index.max(index);
        if index >= self.next_session_sweep {
            self.sessions
                .retain(|_, s| s.last_used_index + SESSION_IDLE_ENTRIES > index);
            self.next_session_sweep = index + SESSION_SWEEP_EVERY;
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn add_member(&mut self, member: MemberInfo) {
        self.members.insert(member.id, member);
    }

    pub fn remove_member(&mut self, id: MemberId) {
        self.members.remove(&id);
    }

    /// Applies one committed command at log `index`, deduplicating retries by session.
    pub fn apply(&mut self, index: u64, cmd: &SessionCommand) -> Applied {
        self.set_applied_index(index);
        if cmd.client_id == 0 {
            return self.apply_command(index, &cmd.command);
        }
        // A client that already had answers acknowledged but has no session here lost it to
        // the idle sweep: its request may be a retry of one applied before, so refuse it.
        if !self.sessions.contains_key(&cmd.client_id) && cmd.first_unacknowledged > 1 {
            return Applied {
                result: Err(ApplyError::SessionExpired {
                    client_id: cmd.client_id,
                    seq: cmd.seq,
                }),
                events: vec![],
                duplicate: false,
            };
        }
        let session = self.sessions.entry(cmd.client_id).or_default();
        session.last_used_index = index;
        if cmd.first_unacknowledged > session.acknowledged_below {
            session.acknowledged_below = cmd.first_unacknowledged;
            let keep = session.answers.split_off(&cmd.first_unacknowledged);
            session.answers = keep;
        }
        if cmd.seq < session.acknowledged_below {
            return Applied {
                result: Err(ApplyError::SequenceAlreadyAcknowledged {
                    client_id: cmd.client_id,
                    seq: cmd.seq,
                }),
                events: vec![],
                duplicate: true,
            };
        }
        if let Some(answer) = session.answers.get(&cmd.seq) {
            return Applied {
                result: answer.clone(),
                events: vec![],
                duplicate: true,
            };
        }
        let applied = self.apply_command(index, &cmd.command);
        self.sessions
            .get_mut(&cmd.client_id)
            .expect("session created above")
            .answers
            .insert(cmd.seq, applied.result.clone());
        applied
    }

    fn apply_command(&mut self, index: u64, command: &Command) -> Applied {
        if let Err(e) = command.validate() {
            return Applied {
                result: Err(e),
                events: vec![],
                duplicate: false,
            };
        }
        let mut events = Vec::new();
        let result = match command {
            Command::Txn(txn) => self.apply_txn(txn, &mut events).map(CommandResult::Txn),
            Command::LeaseGrant { ttl_ms } => {
                let id = self.next_lease_id.max(1);
                self.next_lease_id = id + 1;
                self.leases.insert(
                    id,
                    Lease {
                        ttl_ms: *ttl_ms,
                        keys: BTreeSet::new(),
                        refreshed_index: index,
                    },
                );
                Ok(CommandResult::LeaseGranted {
                    id,
                    ttl_ms: *ttl_ms,
                })
            }
            Command::LeaseKeepAlive { id } => match self.leases.get_mut(id) {
                Some(lease) => {
                    lease.refreshed_index = index;
                    Ok(CommandResult::LeaseKeptAlive {
                        id: *id,
                        ttl_ms: lease.ttl_ms,
                    })
                }
                None => Err(ApplyError::LeaseNotFound(*id)),
            },
            Command::LeaseRevoke { id } => match self.leases.contains_key(id) {
                true => {
                    let deleted_keys = self.drop_lease(*id, None, &mut events);
                    Ok(CommandResult::LeaseRevoked {
                        id: *id,
                        deleted_keys,
                    })
                }
                false => Err(ApplyError::LeaseNotFound(*id)),
            },
            Command::LeaseExpire { leases } => {
                let mut expired = Vec::new();
                for (id, refreshed_index) in leases {
                    let still_stale = self
                        .leases
                        .get(id)
                        .is_some_and(|l| l.refreshed_index == *refreshed_index);
                    if still_stale {
                        self.drop_lease(*id, Some(*id), &mut events);
                        expired.push(*id);
                    }
                }
                Ok(CommandResult::LeasesExpired { expired })
            }
        };
        Applied {
            result,
            events,
            duplicate: false,
        }
    }

    /// Removes a lease and its keys in one new revision; returns how many keys went.
    fn drop_lease(
        &mut self,
        id: LeaseId,
        expired: Option<LeaseId>,
        events: &mut Vec<Event>,
    ) -> usize {
        let lease = self.leases.remove(&id).unwrap_or_default();
        if lease.keys.is_empty() {
            return 0;
        }
        self.revision += 1;
        let revision = self.revision;
        for key in &lease.keys {
            if let Some(kv) = self.keys.remove(key) {
                events.push(Event {
                    revision,
                    kind: EventKind::Delete,
                    kv,
                    expired_lease: expired,
                });
            }
        }
        lease.keys.len()
    }

    fn compare_holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::ModRevision { key, equals } => {
                self.keys.get(key).map(|kv| kv.mod_revision).unwrap_or(0) == *equals
            }
            Compare::Value { key, equals } => {
                self.keys.get(key).is_some_and(|kv| &kv.value == equals)
            }
            Compare::Exists { key } => self.keys.contains_key(key),
            Compare::Missing { key } => !self.keys.contains_key(key),
        }
    }

    fn apply_txn(&mut self, txn: &Txn, events: &mut Vec<Event>) -> Result<TxnResult, ApplyError> {
        let succeeded = txn.compare.iter().all(|c| self.compare_holds(c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        // Check every lease first so a failing op changes nothing.
        for op in ops {
            if let Op::Put {
                lease: Some(id), ..
            } = op
            {
                if !self.leases.contains_key(id) {
                    return Err(ApplyError::LeaseNotFound(*id));
                }
            }
        }
        let writes = ops.iter().any(|op| !op.is_read_only());
        let revision = if writes {
            self.revision + 1
        } else {
            self.revision
        };
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                Op::Put { key, value, lease } => {
                    let prev = self.keys.get(key).cloned();
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev
                            .as_ref()
                            .map(|p| p.create_revision)
                            .unwrap_or(revision),
                        mod_revision: revision,
                        version: prev.as_ref().map(|p| p.version).unwrap_or(0) + 1,
                        lease: *lease,
                    };
                    if let Some(old) = prev.as_ref().and_then(|p| p.lease) {
                        if Some(old) != *lease {
                            if let Some(l) = self.leases.get_mut(&old) {
                                l.keys.remove(key);
                            }
                        }
                    }
                    if let Some(id) = lease {
                        self.leases
                            .get_mut(id)
                            .expect("checked above")
                            .keys
                            .insert(key.clone());
                    }
                    self.keys.insert(key.clone(), kv.clone());
                    events.push(Event {
                        revision,
                        kind: EventKind::Put,
                        kv,
                        expired_lease: None,
                    });
                    OpResult::Put { prev }
                }
                Op::Delete { key } => {
                    let deleted: Vec<KeyValue> =
                        self.delete_key(key, revision, events).into_iter().collect();
                    OpResult::Delete { deleted }
                }
                Op::DeleteRange { start, end } => {
                    let doomed: Vec<String> = self.range_keys(start, end.as_deref(), 0).0;
                    let deleted = doomed
                        .iter()
                        .filter_map(|k| self.delete_key(k, revision, events))
                        .collect();
                    OpResult::Delete { deleted }
                }
                read => self.read(read),
            });
        }
        self.revision = revision;
        Ok(TxnResult {
            succeeded,
            revision,
            results,
        })
    }

    fn delete_key(
        &mut self,
        key: &str,
        revision: Revision,
        events: &mut Vec<Event>,
    ) -> Option<KeyValue> {
        let kv = self.keys.remove(key)?;
        if let Some(id) = kv.lease {
            if let Some(l) = self.leases.get_mut(&id) {
                l.keys.remove(key);
            }
        }
        events.push(Event {
            revision,
            kind: EventKind::Delete,
            kv: kv.clone(),
            expired_lease: None,
        });
        Some(kv)
    }

    fn range_keys(&self, start: &str, end: Option<&str>, limit: usize) -> (Vec<String>, bool) {
        use std::ops::Bound;
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_string()),
            None => Bound::Unbounded,
        };
        if end.is_some_and(|e| e <= start) {
            return (vec![], false);
        }
        let mut keys = Vec::new();
        for (k, _) in self
            .keys
            .range::<String, _>((Bound::Included(start.to_string()), upper))
        {
            if limit != 0 && keys.len() == limit {
                return (keys, true);
            }
            keys.push(k.clone());
        }
        (keys, false)
    }

    /// Runs a read-only operation against the current state.
    pub fn read(&self, op: &Op) -> OpResult {
        match op {
            Op::Get { key } => OpResult::Get(self.keys.get(key).cloned()),
            Op::Range { start, end, limit } => {
                let (keys, more) = self.range_keys(start, end.as_deref(), *limit);
                OpResult::Range {
                    kvs: keys.iter().map(|k| self.keys[k].clone()).collect(),
                    more,
                }
            }
            other => panic!("read() called with a write operation {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    fn cmd(client_id: u64, seq: u64, command: Command) -> SessionCommand {
        SessionCommand {
            client_id,
            seq,
            first_unacknowledged: seq,
            command,
        }
    }

    fn txn(ops: Vec<Op>) -> Command {
        Command::Txn(Txn {
            compare: vec![],
            success: ops,
            failure: vec![],
        })
    }

    #[test]
    fn put_get_delete_track_revisions() {
        let mut sm = StateMachine::with_members(vec![]);
        let a = sm.apply(1, &cmd(1, 1, txn(vec![put("a", "1")])));
        assert_eq!(a.events.len(), 1);
        sm.apply(2, &cmd(1, 2, txn(vec![put("a", "2")])));
        let OpResult::Get(Some(kv)) = sm.read(&Op::Get { key: "a".into() }) else {
            panic!()
        };
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
        assert_eq!(kv.value, b"2");
        let d = sm.apply(3, &cmd(1, 3, txn(vec![Op::Delete { key: "a".into() }])));
        assert_eq!(d.events[0].kind, EventKind::Delete);
        assert_eq!(sm.read(&Op::Get { key: "a".into() }), OpResult::Get(None));
        assert_eq!(sm.revision(), 3);
    }

    #[test]
    fn compare_and_swap_takes_one_branch() {
        let mut sm = StateMachine::with_members(vec![]);
        sm.apply(1, &cmd(1, 1, txn(vec![put("k", "old")])));
        let cas = |expect: &str, new: &str| {
            Command::Txn(Txn {
                compare: vec![Compare::Value {
                    key: "k".into(),
                    equals: expect.into(),
                }],
                success: vec![put("k", new)],
                failure: vec![Op::Get { key: "k".into() }],
            })
        };
        let r = sm.apply(2, &cmd(1, 2, cas("wrong", "x"))).result.unwrap();
        let CommandResult::Txn(t) = r else { panic!() };
        assert!(!t.succeeded);
        assert_eq!(
            sm.revision(),
            1,
            "a failed compare with reads does not bump the revision"
        );
        let CommandResult::Txn(t) = sm.apply(3, &cmd(1, 3, cas("old", "new"))).result.unwrap()
        else {
            panic!()
        };
        assert!(t.succeeded);
        let OpResult::Get(Some(kv)) = sm.read(&Op::Get { key: "k".into() }) else {
            panic!()
        };
        assert_eq!(kv.value, b"new");
    }

    #[test]
    fn retried_command_is_applied_once() {
        let mut sm = StateMachine::with_members(vec![]);
        let c = cmd(7, 1, txn(vec![put("n", "1")]));
        let first = sm.apply(1, &c);
        let again = sm.apply(2, &c);
        assert!(again.duplicate);
        assert_eq!(first.result, again.result);
        assert_eq!(sm.revision(), 1);
        // After the client acknowledges seq 1, a stray retry of it is refused, not applied.
        sm.apply(
            3,
            &SessionCommand {
                client_id: 7,
                seq: 2,
                first_unacknowledged: 2,
                command: txn(vec![put("m", "1")]),
            },
        );
        let stray = sm.apply(4, &c);
        assert!(matches!(
            stray.result,
            Err(ApplyError::SequenceAlreadyAcknowledged { .. })
        ));
        assert_eq!(sm.revision(), 2);
    }

    #[test]
    fn idle_sessions_expire_and_their_clients_are_refused_not_reapplied() {
        let mut sm = StateMachine::with_members(vec![]);
        sm.apply(1, &cmd(7, 1, txn(vec![put("a", "1")])));
        sm.apply(
            2,
            &SessionCommand {
                client_id: 8,
                seq: 1,
                first_unacknowledged: 1,
                command: txn(vec![put("b", "1")]),
            },
        );
        sm.set_applied_index(SESSION_IDLE_ENTRIES / 2);
        sm.apply(
            SESSION_IDLE_ENTRIES / 2 + 1,
            &SessionCommand {
                client_id: 8,
                seq: 2,
                first_unacknowledged: 2,
                command: txn(vec![]),
            },
        );
        sm.set_applied_index(SESSION_IDLE_ENTRIES + 1);
        assert_eq!(
            sm.session_count(),
            1,
            "only the recently used session is left"
        );
        let revision = sm.revision();
        let late = sm.apply(
            SESSION_IDLE_ENTRIES + 2,
            &SessionCommand {
                client_id: 7,
                seq: 2,
                first_unacknowledged: 2,
                command: txn(vec![put("a", "2")]),
            },
        );
        assert!(matches!(
            late.result,
            Err(ApplyError::SessionExpired {
                client_id: 7,
                seq: 2
            })
        ));
        assert_eq!(sm.revision(), revision);
    }

    #[test]
    fn range_scans_respect_bounds_and_limit() {
        let mut sm = StateMachine::with_members(vec![]);
        sm.apply(
            1,
            &cmd(
                1,
                1,
                txn(vec![
                    put("/ve/a", "1"),
                    put("/ve/b", "2"),
                    put("/vf", "3"),
                    put("/ve/c", "4"),
                ]),
            ),
        );
        let OpResult::Range { kvs, more } = sm.read(&Op::Range {
            start: "/ve/".into(),
            end: prefix_end("/ve/"),
            limit: 2,
        }) else {
            panic!()
        };
        assert_eq!(
            kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
            ["/ve/a", "/ve/b"]
        );
        assert!(more);
        let d = sm.apply(
            2,
            &cmd(
                1,
                2,
                txn(vec![Op::DeleteRange {
                    start: "/ve/".into(),
                    end: prefix_end("/ve/"),
                }]),
            ),
        );
        assert_eq!(d.events.len(), 3);
        assert!(d.events.iter().all(|e| e.revision == 2));
    }

    #[test]
    fn lease_expiry_deletes_keys_unless_refreshed() {
        let mut sm = StateMachine::with_members(vec![]);
        let CommandResult::LeaseGranted { id, .. } = sm
            .apply(1, &cmd(1, 1, Command::LeaseGrant { ttl_ms: 1000 }))
            .result
            .unwrap()
        else {
            panic!()
        };
        sm.apply(
            2,
            &cmd(
                1,
                2,
                txn(vec![Op::Put {
                    key: "node/1".into(),
                    value: vec![1],
                    lease: Some(id),
                }]),
            ),
        );
        // The leader saw refreshed_index 1, but a keep-alive at index 3 raced in: no expiry.
        sm.apply(3, &cmd(1, 3, Command::LeaseKeepAlive { id }));
        let internal = |c| SessionCommand {
            client_id: 0,
            seq: 0,
            first_unacknowledged: 0,
            command: c,
        };
        let r = sm.apply(
            4,
            &internal(Command::LeaseExpire {
                leases: vec![(id, 1)],
            }),
        );
        assert_eq!(
            r.result,
            Ok(CommandResult::LeasesExpired { expired: vec![] })
        );
        let r = sm.apply(
            5,
            &internal(Command::LeaseExpire {
                leases: vec![(id, 3)],
            }),
        );
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].expired_lease, Some(id));
        assert_eq!(
            sm.read(&Op::Get {
                key: "node/1".into()
            }),
            OpResult::Get(None)
        );
        assert!(matches!(
            sm.apply(6, &cmd(1, 4, Command::LeaseKeepAlive { id }))
                .result,
            Err(ApplyError::LeaseNotFound(_))
        ));
    }

    #[test]
    fn bad_input_changes_nothing() {
        let mut sm = StateMachine::with_members(vec![]);
        let before = sm.clone();
        let big = Op::Put {
            key: "k".into(),
            value: vec![0; MAX_VALUE_BYTES + 1],
            lease: None,
        };
        assert!(matches!(
            sm.apply(1, &cmd(1, 1, txn(vec![put("ok", "1"), big])))
                .result,
            Err(ApplyError::ValueTooLarge { .. })
        ));
        let bad_lease = Op::Put {
            key: "k".into(),
            value: vec![],
            lease: Some(99),
        };
        assert!(matches!(
            sm.apply(2, &cmd(1, 2, txn(vec![put("ok", "1"), bad_lease])))
                .result,
            Err(ApplyError::LeaseNotFound(99))
        ));
        assert!(matches!(
            sm.apply(3, &cmd(1, 3, txn(vec![put("", "1")]))).result,
            Err(ApplyError::EmptyKey)
        ));
        assert_eq!(sm.keys, before.keys);
        assert_eq!(sm.revision, before.revision);
    }

    #[test]
    fn snapshot_round_trips() {
        let mut sm = StateMachine::with_members(vec![MemberInfo {
            id: 1,
            peer_addr: "a".into(),
            client_addr: "b".into(),
        }]);
        sm.apply(1, &cmd(1, 1, txn(vec![put("a", "1")])));
        assert_eq!(StateMachine::from_bytes(&sm.to_bytes()).unwrap(), sm);
    }
}
