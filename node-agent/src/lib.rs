//! Node side of the VE platform: everything one node does to run its VEs.
//!
//! - [`config`]: the node's configuration file (`/etc/vz/node.toml`).
//! - [`spec`]: a VE's specification (name, template, addresses, limits) and its validation.
//! - [`template`], [`disk`], [`idmap`]: VE templates, ext4 disk images on loop devices,
//!   idmapped mounts into the VE's uid range.
//! - [`network`]: the node bridge, a veth per VE, anti-spoofing rules.
//! - [`procfs`]: per-VE /proc views served by the node's `ve-procfs` daemon.
//! - [`bundle`]: the OCI bundle (config.json) a VE runs from.
//! - [`lifecycle`]: create, start, stop, destroy, list, exec, limits; used by `vectl`.

pub mod config;
pub mod spec;
pub mod template;
pub mod disk;
pub mod idmap;
pub mod network;
pub mod procfs;
pub mod guest_files;
pub mod bundle;
pub mod daemons;
pub mod agent;
pub mod lifecycle;
