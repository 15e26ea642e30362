//! Raft cluster store: the replicated source of truth of the VE platform.
//!
//! - [`state_machine`]: the typed, deterministic store (keys with revisions, transactions,
//!   leases, sessions, members): what every member applies.
//! - [`raft_log`]: the durable Raft log and snapshots on disk.
//! - [`node`]: the Raft loop (raft-rs) with batching, ReadIndex reads and lease expiry.
//! - [`transport`], [`server`], [`protocol`]: members and clients over TCP.
//! - [`client`]: the client library (leader discovery, retries, exactly-once writes).
//! - [`linearizability`]: a checker for recorded histories, used by the fault tests.

pub mod client;
pub mod lease_clock;
pub mod linearizability;
pub mod node;
pub mod protocol;
pub mod raft_log;
pub mod server;
pub mod state_machine;
pub mod tls;
pub mod transport;
pub mod watch;

pub use client::{Client, ClientError};
pub use protocol::{StatusReport, StoreError};
pub use state_machine::{Compare, Event, EventKind, KeyValue, LeaseId, Op, Revision, Txn};
