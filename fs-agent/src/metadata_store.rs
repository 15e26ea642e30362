//! The narrow interface the filesystem needs from its metadata store: revisioned keys, prefix
//! listing and an atomic compare-and-commit. [`ClusterMetadata`] runs it on the Raft cluster
//! store (`cluster::Client`); [`MemoryMetadata`] is an in-process store for unit tests of the
//! namespace logic.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    #[error("metadata store refused the request: {0}")]
    Refused(String),
    #[error("metadata key {key} holds malformed data: {reason}")]
    Malformed { key: String, reason: String },
}

/// A value with the store revision of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// `key`'s last-change revision must equal `revision` (0: the key must be absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

pub trait MetadataStore: Send + Sync {
    fn get(&self, key: &str) -> Result<Option<Versioned>, MetadataError>;
    /// Every key starting with `prefix`, in key order.
    fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, MetadataError>;
    /// Applies all `mutations` atomically if every condition holds; returns whether it did.
    fn commit(&self, conditions: &[Condition], mutations: &[Mutation]) -> Result<bool, MetadataError> {
        Ok(self.commit_at(conditions, mutations)?.is_some())
    }
    /// [`MetadataStore::commit`], returning the revision of the commit (every key it put has
    /// it as its revision), or `None` if a condition did not hold: saves reading a key back.
    fn commit_at(&self, conditions: &[Condition], mutations: &[Mutation]) -> Result<Option<u64>, MetadataError>;
}

/// In-process store with the same semantics (one revision per commit).
#[derive(Default)]
pub struct MemoryMetadata {
    state: Mutex<(u64, BTreeMap<String, Versioned>)>,
}

impl MemoryMetadata {
    pub fn new() -> MemoryMetadata {
        MemoryMetadata::default()
    }
}

impl MetadataStore for MemoryMetadata {
    fn get(&self, key: &str) -> Result<Option<Versioned>, MetadataError> {
        Ok(self.state.lock().expect("memory metadata").1.get(key).cloned())
    }

    fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, MetadataError> {
        let state = self.state.lock().expect("memory metadata");
        Ok(state.1.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn commit_at(&self, conditions: &[Condition], mutations: &[Mutation]) -> Result<Option<u64>, MetadataError> {
        // The cluster store's limit, so unit tests catch a commit it would refuse.
        let count = conditions.len() + mutations.len();
        if count > cluster::state_machine::MAX_TXN_OPS {
            return Err(MetadataError::Refused(format!("transaction has {count} operations, the limit is {}", cluster::state_machine::MAX_TXN_OPS)));
        }
        let mut state = self.state.lock().expect("memory metadata");
        let holds = conditions.iter().all(|c| state.1.get(&c.key).map(|v| v.revision).unwrap_or(0) == c.revision);
        if !holds {
            return Ok(None);
        }
        state.0 += 1;
        let revision = state.0;
        for m in mutations {
            match m {
                Mutation::Put { key, value } => {
                    state.1.insert(key.clone(), Versioned { value: value.clone(), revision });
                }
                Mutation::Delete { key } => {
                    state.1.remove(key);
                }
            }
        }
        Ok(Some(revision))
    }
}

/// The filesystem metadata on the Raft cluster store. The store's client is async; this
/// adapter owns a small runtime and blocks on it, so FUSE threads can call it directly.
pub struct ClusterMetadata {
    runtime: tokio::runtime::Runtime,
    client: cluster::Client,
}

impl ClusterMetadata {
    /// `tls_ca_pem`: the cluster CA, to talk TLS to a TLS cluster and check its members.
    pub fn connect(endpoints: Vec<String>, tls_ca_pem: Option<String>) -> Result<ClusterMetadata, MetadataError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fs-meta")
            .enable_all()
            .build()
            .map_err(|e| MetadataError::Unavailable(format!("cannot start the metadata client runtime: {e}")))?;
        let options = cluster::client::ClientOptions { total_timeout: Duration::from_secs(15), tls_ca_pem, ..Default::default() };
        let client = {
            let _enter = runtime.enter();
            cluster::Client::with_options(endpoints, options).map_err(|e| MetadataError::Unavailable(e.to_string()))?
        };
        Ok(ClusterMetadata { runtime, client })
    }
}

fn map_error(e: cluster::ClientError) -> MetadataError {
    match e {
        cluster::ClientError::Store(s) => MetadataError::Refused(s.to_string()),
        other => MetadataError::Unavailable(other.to_string()),
    }
}

impl MetadataStore for ClusterMetadata {
    fn get(&self, key: &str) -> Result<Option<Versioned>, MetadataError> {
        let kv = self.runtime.block_on(self.client.get(key)).map_err(map_error)?;
        Ok(kv.map(|kv| Versioned { value: kv.value, revision: kv.mod_revision }))
    }

    fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, MetadataError> {
        let (_, kvs) = self.runtime.block_on(self.client.list_prefix(prefix, 0)).map_err(map_error)?;
        Ok(kvs.into_iter().map(|kv| (kv.key, Versioned { value: kv.value, revision: kv.mod_revision })).collect())
    }

    fn commit_at(&self, conditions: &[Condition], mutations: &[Mutation]) -> Result<Option<u64>, MetadataError> {
        let txn = cluster::Txn {
            compare: conditions.iter().map(|c| cluster::Compare::ModRevision { key: c.key.clone(), equals: c.revision }).collect(),
            success: mutations
                .iter()
                .map(|m| match m {
                    Mutation::Put { key, value } => cluster::Op::Put { key: key.clone(), value: value.clone(), lease: None },
                    Mutation::Delete { key } => cluster::Op::Delete { key: key.clone() },
                })
                .collect(),
            failure: vec![],
        };
        let result = self.runtime.block_on(self.client.txn(txn)).map_err(map_error)?;
        // One revision per transaction: the mod revision of every key it put.
        Ok(result.succeeded.then_some(result.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_commit_checks_revisions() {
        let store = MemoryMetadata::new();
        let put = |v: &str| vec![Mutation::Put { key: "/fs/a".into(), value: v.as_bytes().to_vec() }];
        assert!(store.commit(&[Condition { key: "/fs/a".into(), revision: 0 }], &put("1")).unwrap());
        assert!(!store.commit(&[Condition { key: "/fs/a".into(), revision: 0 }], &put("2")).unwrap());
        let rev = store.get("/fs/a").unwrap().unwrap().revision;
        assert!(store.commit(&[Condition { key: "/fs/a".into(), revision: rev }], &put("3")).unwrap());
        assert_eq!(store.get("/fs/a").unwrap().unwrap().value, b"3");
        assert_eq!(store.list_prefix("/fs/").unwrap().len(), 1);
        assert!(store.list_prefix("/fs/b").unwrap().is_empty());
    }
}
