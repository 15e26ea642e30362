//! fs-agent: the shared replicated filesystem every node mounts through FUSE.
//!
//! - [`chunk_store`]: chunk replicas as local files, crc32c per block, fencing epochs;
//! - [`chunk_protocol`], [`chunk_server`], [`chunk_client`]: the chunk server over TCP;
//! - [`chunk_transport`]: plain TCP or mutual TLS under it;
//! - [`metadata_store`]: the narrow interface to the metadata store (the Raft cluster store);
//! - [`namespace`]: inodes, directories, chunk map and its sharing by clones, write leases on
//!   that store;
//! - [`placement`]: where replicas go;
//! - [`servers`]: the chunk server registry: heartbeats, draining, dead servers;
//! - [`healer`]: healing as a service: re-replication, dead servers, scrub repairs;
//! - [`file_data`]: the replicated read, write and fencing paths;
//! - [`fuse_mount`]: the FUSE filesystem;
//! - [`locks`]: POSIX byte-range locks across nodes;
//! - [`status`]: replica health for operators.
//!
//! See docs/fs-agent.md.

pub mod aligned_buffer;
pub mod chunk_client;
pub mod chunk_protocol;
pub mod chunk_server;
pub mod chunk_store;
pub mod chunk_transport;
pub mod file_data;
pub mod fuse_mount;
pub mod healer;
pub mod locks;
pub mod metadata_store;
pub mod namespace;
pub mod placement;
pub mod servers;
pub mod status;
