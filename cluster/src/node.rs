//! The Raft node loop: owns raft-rs's `RawNode`, the durable log and the state machine, on one
//! thread. Each turn it takes every queued input (proposals, reads, peer messages), proposes the
//! queued commands as one batched entry, issues one ReadIndex for all queued reads, then handles
//! one `Ready`: one fsync covers every entry and hard state in it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{Config, RawNode, ReadOnlyOption, StateRole};
use tokio::sync::oneshot;

use crate::lease_clock::LeaseClock;
use crate::protocol::{MemberStatus, Role, StatusReport, StoreError};
use crate::raft_log::{DiskStorage, RaftLogError};
use crate::state_machine::{
    ApplyError, Command, CommandResult, MemberId, MemberInfo, Op, OpResult, Revision,
    SessionCommand, StateMachine,
};
use crate::watch::EventHistory;

/// Largest batch of commands in one log entry.
const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;
/// Most inputs taken per turn, so ticks and readies are never starved.
const MAX_INPUTS_PER_TURN: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("raft log: {0}")]
    Log(#[from] RaftLogError),
    #[error("state in snapshot of {dir} cannot be decoded: {reason}")]
    BadSnapshot { dir: PathBuf, reason: String },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: MemberId,
    pub data_dir: PathBuf,
    pub tick: Duration,
    /// Election timeout in ticks (randomized between this and twice this by raft-rs).
    pub election_ticks: usize,
    /// Take a snapshot and compact the log after this many applied entries.
    pub snapshot_every: u64,
    pub fsync: bool,
}

impl NodeConfig {
    pub fn new(id: MemberId, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            data_dir,
            tick: Duration::from_millis(50),
            election_ticks: 10,
            snapshot_every: 10_000,
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    AddLearner(MemberInfo),
    Promote(MemberId),
    Remove(MemberId),
}

pub type Reply<T> = oneshot::Sender<Result<T, StoreError>>;
/// Read operations waiting for their answer (the revision read at and one result per op).
type PendingRead = (Vec<Op>, Reply<(Revision, Vec<OpResult>)>);

pub enum NodeInput {
    Propose {
        command: SessionCommand,
        reply: Reply<CommandResult>,
    },
    Read {
        ops: Vec<Op>,
        reply: Reply<(Revision, Vec<OpResult>)>,
    },
    Membership {
        change: MembershipChange,
        reply: Reply<Vec<MemberStatus>>,
    },
    Status {
        reply: oneshot::Sender<StatusReport>,
    },
    Raft(Box<Message>),
    SnapshotSent {
        to: MemberId,
        ok: bool,
    },
    Unreachable(MemberId),
}

/// Where the node's outgoing messages go (the TCP transport, in production).
pub trait PeerTransport: Send {
    fn send(&self, messages: Vec<Message>);
    fn set_members(&self, members: &BTreeMap<MemberId, MemberInfo>);
}

/// What the rest of the process shares with the node thread.
#[derive(Clone)]
pub struct NodeShared {
    pub inputs: Sender<NodeInput>,
    pub history: Arc<EventHistory>,
    /// Known members and their addresses (for leader hints).
    pub members: Arc<RwLock<BTreeMap<MemberId, MemberInfo>>>,
    /// Session of the writes this member's server makes itself (join tokens).
    pub internal_client_id: u64,
    pub next_internal_seq: Arc<std::sync::atomic::AtomicU64>,
}

struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", record.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
            slog::Level::Info => tracing::debug!(target: "raft", "{}", record.msg()),
            _ => tracing::trace!(target: "raft", "{}", record.msg()),
        }
        Ok(())
    }
}

pub struct Node<T: PeerTransport> {
    config: NodeConfig,
    raw: RawNode<DiskStorage>,
    state: StateMachine,
    transport: T,
    shared: NodeShared,
    inputs: Receiver<NodeInput>,
    /// Waiting writers by (client id, seq); several if a client retried on this member.
    pending_writes: HashMap<(u64, u64), Vec<Reply<CommandResult>>>,
    batch: Vec<SessionCommand>,
    batch_bytes: usize,
    queued_reads: Vec<PendingRead>,
    /// Reads waiting for their ReadIndex confirmation, by request context.
    read_index_batches: HashMap<u64, Vec<PendingRead>>,
    /// Confirmed reads waiting for the state machine to reach their read index.
    confirmed_reads: Vec<(u64, Vec<PendingRead>)>,
    next_read_ctx: u64,
    pending_membership: Option<(u64, Reply<Vec<MemberStatus>>)>,
    lease_clock: LeaseClock,
    was_leader: bool,
    /// Set when a member was added: its first snapshot must already list it (raft-rs refuses a
    /// snapshot whose configuration does not contain the receiver), and a new member always
    /// starts from a snapshot, never from the bootstrap state.
    snapshot_now: bool,
}

impl<T: PeerTransport> Node<T> {
    /// Opens the member's data directory and builds the node; `run` drives it.
    /// `channel` carries the node's inputs; the transport holds a clone of its sender.
    pub fn open(
        config: NodeConfig,
        transport: T,
        channel: (Sender<NodeInput>, Receiver<NodeInput>),
    ) -> Result<(Self, NodeShared), NodeError> {
        let storage = DiskStorage::open(&config.data_dir, config.fsync)?;
        let state = if storage.snapshot_data().is_empty() {
            StateMachine::default()
        } else {
            StateMachine::from_bytes(storage.snapshot_data()).map_err(|e| {
                NodeError::BadSnapshot {
                    dir: config.data_dir.clone(),
                    reason: e.to_string(),
                }
            })?
        };
        let raft_config = Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: 1,
            applied: storage.core().snapshot_index(),
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(TracingDrain, slog::o!());
        let raw = RawNode::new(&raft_config, storage, &logger)?;
        let (tx, rx) = channel;
        let shared = NodeShared {
            inputs: tx,
            history: Arc::new(EventHistory::new(state.revision())),
            members: Arc::new(RwLock::new(state.members().clone())),
            internal_client_id: rand::random::<u64>() | 1,
            next_internal_seq: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        };
        transport.set_members(state.members());
        let node = Node {
            config,
            raw,
            state,
            transport,
            shared: shared.clone(),
            inputs: rx,
            pending_writes: HashMap::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            queued_reads: Vec::new(),
            read_index_batches: HashMap::new(),
            confirmed_reads: Vec::new(),
            next_read_ctx: 1,
            pending_membership: None,
            lease_clock: LeaseClock::default(),
            was_leader: false,
            snapshot_now: false,
        };
        Ok((node, shared))
    }

    /// Runs until every sender of inputs is gone or the disk fails.
    pub fn run(mut self) -> Result<(), NodeError> {
        let mut next_tick = Instant::now() + self.config.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inputs.recv_timeout(wait) {
                Ok(input) => self.handle_input(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            for _ in 0..MAX_INPUTS_PER_TURN {
                match self.inputs.try_recv() {
                    Ok(input) => self.handle_input(input),
                    Err(_) => break,
                }
            }
            self.flush_batch();
            self.issue_read_index();
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + self.config.tick;
                self.check_leases(now);
            }
            self.handle_ready()?;
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> StoreError {
        let leader = self.raw.raft.leader_id;
        StoreError::NotLeader {
            member: self.config.id,
            leader: self.state.members().get(&leader).cloned(),
        }
    }

    fn handle_input(&mut self, input: NodeInput) {
        match input {
            NodeInput::Raft(message) => {
                if let Err(e) = self.raw.step(*message) {
                    tracing::debug!(error = %e, "dropped a raft message");
                }
            }
            NodeInput::Propose { command, reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                if let Err(e) = command.command.validate() {
                    let _ = reply.send(Err(StoreError::Rejected(e)));
                    return;
                }
                self.pending_writes
                    .entry((command.client_id, command.seq))
                    .or_default()
                    .push(reply);
                self.batch_bytes += bincode::serialized_size(&command).unwrap_or(0) as usize;
                self.batch.push(command);
                if self.batch_bytes >= MAX_BATCH_BYTES {
                    self.flush_batch();
                }
            }
            NodeInput::Read { ops, reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                self.queued_reads.push((ops, reply));
            }
            NodeInput::Membership { change, reply } => self.propose_membership(change, reply),
            NodeInput::Status { reply } => {
                let _ = reply.send(self.status());
            }
            NodeInput::SnapshotSent { to, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            NodeInput::Unreachable(to) => self.raw.report_unreachable(to),
        }
    }

    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let data = bincode::serialize(&batch).expect("commands serialize");
        if let Err(e) = self.raw.propose(vec![], data) {
            tracing::warn!(error = %e, "proposal dropped");
            for command in batch {
                for reply in self
                    .pending_writes
                    .remove(&(command.client_id, command.seq))
                    .unwrap_or_default()
                {
                    let _ = reply.send(Err(StoreError::Unavailable(format!(
                        "proposal dropped: {e}"
                    ))));
                }
            }
        }
    }

    fn issue_read_index(&mut self) {
        if self.queued_reads.is_empty() {
            return;
        }
        if !self.is_leader() {
            let error = self.not_leader();
            for (_, reply) in self.queued_reads.drain(..) {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        // raft-rs ignores ReadIndex until the leader committed an entry of its term: wait for it.
        if !self.raw.raft.commit_to_current_term() {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.read_index_batches
            .insert(ctx, std::mem::take(&mut self.queued_reads));
        self.raw.read_index(ctx.to_le_bytes().to_vec());
    }

    fn propose_membership(&mut self, change: MembershipChange, reply: Reply<Vec<MemberStatus>>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.pending_membership.is_some()
            || self.raw.raft.pending_conf_index > self.state.applied_index()
        {
            let _ = reply.send(Err(StoreError::Unavailable(
                "another membership change is in progress: retry when it is applied".into(),
            )));
            return;
        }
        let conf_state = self.raw.store().core().conf_state().clone();
        let is_voter = |id: &MemberId| conf_state.voters.contains(id);
        let is_learner = |id: &MemberId| conf_state.learners.contains(id);
        let (node_id, change_type, context) = match &change {
            MembershipChange::AddLearner(info) => {
                if is_voter(&info.id) || is_learner(&info.id) || info.id == 0 {
                    let _ =
                        reply.send(Err(StoreError::Rejected(ApplyError::MemberExists(info.id))));
                    return;
                }
                (
                    info.id,
                    ConfChangeType::AddLearnerNode,
                    bincode::serialize(info).expect("serializes"),
                )
            }
            MembershipChange::Promote(id) => {
                if !is_learner(id) {
                    let _ = reply.send(Err(StoreError::BadRequest(format!(
                        "member {id} is not a learner: add it with `member add` first, and promote it once it caught up"
                    ))));
                    return;
                }
                (*id, ConfChangeType::AddNode, vec![])
            }
            MembershipChange::Remove(id) => {
                if !is_voter(id) && !is_learner(id) {
                    let _ = reply.send(Err(StoreError::Rejected(ApplyError::MemberNotFound(*id))));
                    return;
                }
                if is_voter(id) && conf_state.voters.len() == 1 {
                    let _ = reply.send(Err(StoreError::BadRequest(format!(
                        "member {id} is the last voter: removing it would leave no cluster"
                    ))));
                    return;
                }
                if *id == self.config.id {
                    // Removing the leader itself: hand leadership to the most caught-up voter
                    // first; the client's retry then reaches the new leader, which removes us.
                    let successor = self
                        .raw
                        .raft
                        .prs()
                        .iter()
                        .filter(|(pid, _)| {
                            **pid != self.config.id && conf_state.voters.contains(pid)
                        })
                        .max_by_key(|(_, pr)| pr.matched)
                        .map(|(pid, _)| *pid);
                    if let Some(successor) = successor {
                        tracing::info!(
                            successor,
                            "transferring leadership before removing this member"
                        );
                        self.raw.transfer_leader(successor);
                    }
                    let _ = reply.send(Err(StoreError::Unavailable(format!(
                        "member {id} is the leader: leadership is being transferred, retry the removal"
                    ))));
                    return;
                }
                (*id, ConfChangeType::RemoveNode, vec![])
            }
        };
        let mut cc = ConfChange {
            node_id,
            ..Default::default()
        };
        cc.set_change_type(change_type);
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.pending_membership = Some((index, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(StoreError::Unavailable(format!(
                    "membership change dropped: {e}"
                ))));
            }
        }
    }

    fn check_leases(&mut self, now: Instant) {
        if !self.is_leader() {
            return;
        }
        self.lease_clock.sync(self.state.leases().iter(), now);
        let due = self.lease_clock.due(now, Duration::from_secs(1));
        if due.is_empty() {
            return;
        }
        tracing::info!(leases = ?due, "proposing lease expiry");
        let command = SessionCommand {
            client_id: 0,
            seq: 0,
            first_unacknowledged: 0,
            command: Command::LeaseExpire { leases: due },
        };
        self.batch.push(command);
        self.flush_batch();
    }

    fn handle_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        let read_states = ready.take_read_states();
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.mut_store().persist(ready.entries(), ready.hs())?;
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        for read_state in read_states {
            let ctx = u64::from_le_bytes(
                read_state
                    .request_ctx
                    .as_slice()
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            if let Some(batch) = self.read_index_batches.remove(&ctx) {
                self.confirmed_reads.push((read_state.index, batch));
            }
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.serve_confirmed_reads();
        self.after_role_change();
        self.maybe_compact()?;
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: raft::eraftpb::Snapshot) -> Result<(), NodeError> {
        let state =
            StateMachine::from_bytes(&snapshot.data).map_err(|e| NodeError::BadSnapshot {
                dir: self.config.data_dir.clone(),
                reason: e.to_string(),
            })?;
        self.raw.mut_store().install_snapshot(&snapshot)?;
        tracing::info!(
            index = snapshot.get_metadata().index,
            revision = state.revision(),
            "installed snapshot from leader"
        );
        self.state = state;
        self.shared.history.reset(self.state.revision());
        self.members_changed();
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        for entry in entries {
            if entry.index <= self.state.applied_index() {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry)?
                }
            }
            self.state.set_applied_index(entry.index);
            let pending_index = self.pending_membership.as_ref().map(|(index, _)| *index);
            if let Some(index) = pending_index {
                if index <= entry.index {
                    let (_, reply) = self.pending_membership.take().expect("checked");
                    let result = if index == entry.index
                        && entry.get_entry_type() != EntryType::EntryNormal
                    {
                        Ok(self.member_statuses())
                    } else {
                        Err(StoreError::Unavailable(
                            "membership change was superseded: retry".into(),
                        ))
                    };
                    let _ = reply.send(result);
                }
            }
        }
        Ok(())
    }

    fn apply_normal(&mut self, entry: &Entry) {
        if entry.data.is_empty() {
            return; // a new leader's empty entry
        }
        let batch: Vec<SessionCommand> = match bincode::deserialize(&entry.data) {
            Ok(b) => b,
            Err(e) => {
                // Cannot happen unless versions mix; skipping is deterministic on every member.
                tracing::error!(index = entry.index, error = %e, "undecodable log entry skipped");
                return;
            }
        };
        for command in batch {
            let applied = self.state.apply(entry.index, &command);
            if !applied.events.is_empty() {
                self.shared
                    .history
                    .push(applied.events, self.state.revision());
            }
            if let Some(replies) = self
                .pending_writes
                .remove(&(command.client_id, command.seq))
            {
                for reply in replies {
                    let _ = reply.send(applied.result.clone().map_err(StoreError::Rejected));
                }
            }
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), NodeError> {
        let cc: ConfChangeV2 = if entry.get_entry_type() == EntryType::EntryConfChange {
            let mut cc = ConfChange::default();
            cc.merge_from_bytes(&entry.data)
                .map_err(raft::Error::from)?;
            raft_proto::ConfChangeI::into_v2(cc)
        } else {
            let mut cc = ConfChangeV2::default();
            cc.merge_from_bytes(&entry.data)
                .map_err(raft::Error::from)?;
            cc
        };
        let conf_state = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::warn!(index = entry.index, error = %e, "membership change rejected by raft");
                return Ok(());
            }
        };
        for change in cc.get_changes() {
            match change.get_change_type() {
                ConfChangeType::AddLearnerNode | ConfChangeType::AddNode => {
                    self.snapshot_now = true;
                    if let Ok(info) = bincode::deserialize::<MemberInfo>(&entry.context) {
                        self.state.add_member(info);
                    }
                }
                ConfChangeType::RemoveNode => self.state.remove_member(change.node_id),
            }
        }
        tracing::info!(voters = ?conf_state.voters, learners = ?conf_state.learners, "membership changed");
        self.raw.mut_store().set_conf_state(conf_state)?;
        self.members_changed();
        Ok(())
    }

    fn members_changed(&mut self) {
        *self.shared.members.write().expect("members lock") = self.state.members().clone();
        self.transport.set_members(self.state.members());
    }

    fn serve_confirmed_reads(&mut self) {
        let applied = self.state.applied_index();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.confirmed_reads = waiting;
        for (_, batch) in ready {
            for (ops, reply) in batch {
                let results = ops.iter().map(|op| self.state.read(op)).collect();
                let _ = reply.send(Ok((self.state.revision(), results)));
            }
        }
    }

    fn after_role_change(&mut self) {
        let leader = self.is_leader();
        if leader && !self.was_leader {
            tracing::info!(
                id = self.config.id,
                term = self.raw.raft.term,
                "became leader"
            );
            self.lease_clock.restart_all();
        }
        if !leader && self.was_leader {
            tracing::info!(
                id = self.config.id,
                term = self.raw.raft.term,
                "lost leadership"
            );
            let error = self.not_leader();
            for (_, replies) in self.pending_writes.drain() {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
            for (_, batch) in self.read_index_batches.drain() {
                for (_, reply) in batch {
                    let _ = reply.send(Err(error.clone()));
                }
            }
            if let Some((_, reply)) = self.pending_membership.take() {
                let _ = reply.send(Err(error.clone()));
            }
        }
        self.was_leader = leader;
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let applied = self.state.applied_index();
        let snapshot_index = self.raw.store().core().snapshot_index();
        if applied >= snapshot_index + self.config.snapshot_every
            || (self.snapshot_now && applied > snapshot_index)
        {
            self.snapshot_now = false;
            let started = Instant::now();
            self.raw
                .mut_store()
                .compact(applied, self.state.to_bytes())?;
            tracing::info!(
                index = applied,
                took_ms = started.elapsed().as_millis() as u64,
                "snapshot taken, log compacted"
            );
        }
        Ok(())
    }

    fn member_statuses(&self) -> Vec<MemberStatus> {
        let conf_state = self.raw.store().core().conf_state();
        let last_index = self.raw.raft.raft_log.last_index();
        let leader = self.is_leader();
        let progress: HashMap<u64, u64> = if leader {
            self.raw
                .raft
                .prs()
                .iter()
                .map(|(id, pr)| (*id, pr.matched))
                .collect()
        } else {
            HashMap::new()
        };
        let mut ids: Vec<u64> = conf_state
            .voters
            .iter()
            .chain(conf_state.learners.iter())
            .copied()
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let info = self
                    .state
                    .members()
                    .get(&id)
                    .cloned()
                    .unwrap_or(MemberInfo {
                        id,
                        peer_addr: String::new(),
                        client_addr: String::new(),
                    });
                let matched = progress.get(&id).copied();
                MemberStatus {
                    info,
                    voter: conf_state.voters.contains(&id),
                    matched,
                    lag: matched.map(|m| last_index.saturating_sub(m)),
                }
            })
            .collect()
    }

    fn status(&self) -> StatusReport {
        let raft = &self.raw.raft;
        StatusReport {
            id: self.config.id,
            role: match raft.state {
                StateRole::Leader => Role::Leader,
                StateRole::Follower => Role::Follower,
                StateRole::Candidate => Role::Candidate,
                StateRole::PreCandidate => Role::PreCandidate,
            },
            leader: (raft.leader_id != 0).then_some(raft.leader_id),
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.state.applied_index(),
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.raw.store().core().snapshot_index(),
            revision: self.state.revision(),
            members: self.member_statuses(),
        }
    }
}
