//! A node's VEs through their whole life: create from a template, start,
//! stop, restart, destroy, list with live usage, exec, change limits.
//!
//! State lives in two places, and everything can be rebuilt from them:
//! `<state_dir>/ves/<name>/` (ve.json, disk.img: persistent) and the
//! runtime's state dir under `<run_dir>` (volatile). No process stays
//! resident per VE, so `vectl` and the node agent can exit or restart at any
//! time: the next call finds every VE again from these files.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::NodeConfig;
use crate::spec::{Ipv4Cidr, Ipv6Cidr, Limits, SpecError, VeSpec};
use crate::{bundle, daemons, disk, guest_files, idmap, network, procfs, template};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("VE {0} does not exist")]
    NotFound(String),
    #[error("VE {0} already exists")]
    AlreadyExists(String),
    #[error("VE {0} is running: stop it first")]
    Running(String),
    #[error("VE {0} is not running")]
    NotRunning(String),
    #[error("address {address} is already used by VE {owner}")]
    AddressInUse { address: String, owner: String },
    #[error("address {address} is not in the node's VE subnet {subnet}")]
    AddressOutsideSubnet { address: String, subnet: String },
    #[error("no free address left in the node's VE subnet {0}")]
    NoFreeAddress(String),
    #[error("no free uid range left on this node ({0} in use)")]
    NoFreeUidRange(u32),
    #[error("disk of VE {name} cannot shrink from {from} to {to} bytes")]
    DiskShrink { name: String, from: u64, to: u64 },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error(transparent)]
    Idmap(#[from] idmap::IdmapError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    GuestFile(#[from] guest_files::GuestFileError),
    #[error(transparent)]
    Runtime(#[from] ve_runtime::RuntimeError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("VE {name}: {message}")]
    Other { name: String, message: String },
}

type Result<T> = std::result::Result<T, LifecycleError>;

fn io_context(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LifecycleError {
    let context = context.into();
    move |source| LifecycleError::Io { context, source }
}

/// What `create` needs beyond what the spec holds.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub template: String,
    /// Defaults to the name.
    pub hostname: Option<String>,
    /// Empty: one address is allocated from the node's VE subnet.
    pub ipv4: Vec<Ipv4Cidr>,
    pub ipv6: Vec<Ipv6Cidr>,
    pub limits: Limits,
    pub root_password: Option<String>,
    pub ssh_keys: Vec<String>,
    pub autostart: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VeStatus {
    Stopped,
    Running,
}

/// A halt or reboot the OS inside a VE asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownRequest {
    Halt,
    Reboot,
}

/// One line of `vectl list`.
#[derive(Debug, Clone, Serialize)]
pub struct VeInfo {
    pub spec: VeSpec,
    pub status: VeStatus,
    /// Host pid of the VE's init while running.
    pub init_pid: Option<i32>,
    pub usage: Option<VeUsage>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VeUsage {
    pub memory_bytes: u64,
    pub cpu_usage_ns: u64,
    pub pids: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// The node's VEs. Cheap to build: all state is on disk.
pub struct Node {
    pub config: NodeConfig,
    runtime: ve_runtime::Runtime,
}

/// An exclusive lock on one VE, held for the length of an operation so two
/// `vectl` calls never start, stop or change the same VE at once.
struct VeLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl Node {
    pub fn new(config: NodeConfig) -> Node {
        let runtime = ve_runtime::Runtime::new(config.runtime_root());
        Node { config, runtime }
    }

    pub fn runtime(&self) -> &ve_runtime::Runtime {
        &self.runtime
    }

    fn spec_path(&self, name: &str) -> PathBuf {
        self.config.ve_dir(name).join("ve.json")
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.config.ve_dir(name).join("disk.img")
    }

    fn disk_mount(&self, name: &str) -> PathBuf {
        self.config.ve_run_dir(name).join("disk")
    }

    fn rootfs(&self, name: &str) -> PathBuf {
        self.config.ve_run_dir(name).join("rootfs")
    }

    fn cgroup_path(&self, name: &str) -> String {
        format!("/{}/{}", self.config.cgroup_parent, name)
    }

    /// Sets up the node's bridge, its gateway addresses and nft tables.
    pub fn ensure_network(&self) -> Result<()> {
        Ok(network::ensure_bridge(&self.bridge())?)
    }

    fn bridge(&self) -> network::BridgeConfig {
        let net = &self.config.network;
        network::BridgeConfig {
            name: net.bridge.clone(),
            ipv4_gateway: net.ipv4_gateway.map(|c| (c.address, c.prefix)),
            ipv6_gateway: net.ipv6_gateway.map(|c| (c.address, c.prefix)),
            nat_outbound: net.nat_outbound,
        }
    }

    fn lock(&self, name: &str) -> Result<VeLock> {
        let dir = self.config.ve_dir(name);
        let file = File::open(&dir).map_err(|_| LifecycleError::NotFound(name.into()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
            LifecycleError::Io { context: format!("cannot lock VE {name}"), source: errno.into() }
        })?;
        Ok(VeLock(lock))
    }

    /// The spec of an existing VE.
    pub fn spec(&self, name: &str) -> Result<VeSpec> {
        crate::spec::validate_name(name)?;
        let path = self.spec_path(name);
        let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LifecycleError::NotFound(name.into()),
            _ => LifecycleError::Io { context: format!("cannot read {}", path.display()), source: e },
        })?;
        serde_json::from_str(&text).map_err(|e| LifecycleError::Other {
            name: name.into(),
            message: format!("{} is corrupt: {e}", path.display()),
        })
    }

    fn save_spec(&self, spec: &VeSpec) -> Result<()> {
        let path = self.spec_path(&spec.name);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(spec).expect("spec serializes");
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            std::io::Write::write_all(&mut file, text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(path.parent().expect("spec has a dir"))?.sync_all()
        };
        write().map_err(io_context(format!("cannot save {}", path.display())))
    }

    fn desired_path(&self, name: &str) -> PathBuf {
        self.config.ve_dir(name).join("desired")
    }

    /// Whether the VE should be running, as its last start or stop said.
    /// The node agent restarts a VE that should run but does not.
    pub fn desired(&self, name: &str) -> VeStatus {
        match fs::read_to_string(self.desired_path(name)) {
            Ok(text) if text.trim() == "running" => VeStatus::Running,
            _ => VeStatus::Stopped,
        }
    }

    pub fn set_desired(&self, name: &str, desired: VeStatus) -> Result<()> {
        let text = match desired {
            VeStatus::Running => "running\n",
            VeStatus::Stopped => "stopped\n",
        };
        let path = self.desired_path(name);
        fs::write(&path, text).map_err(io_context(format!("cannot write {}", path.display())))
    }

    /// Names of every VE on this node, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let dir = self.config.ves_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_context(format!("cannot list {}", dir.display()))(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("ve.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn all_specs(&self) -> Result<Vec<VeSpec>> {
        self.names()?.iter().map(|n| self.spec(n)).collect()
    }

    fn host_cpus() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    /// Creates a VE: validates everything first, then builds its disk from
    /// the template. On any error nothing is left behind.
    pub fn create(&self, request: CreateRequest) -> Result<VeSpec> {
        crate::spec::validate_name(&request.name)?;
        for key in &request.ssh_keys {
            crate::spec::validate_ssh_key(key)?;
        }
        let template = template::load_template(&self.config.templates_dir, &request.template)?;
        let existing = self.all_specs()?;
        if existing.iter().any(|s| s.name == request.name) || self.config.ve_dir(&request.name).exists() {
            return Err(LifecycleError::AlreadyExists(request.name));
        }
        let ipv4 = if request.ipv4.is_empty() && request.ipv6.is_empty() {
            vec![self.allocate_ipv4(&existing)?]
        } else {
            request.ipv4.clone()
        };
        let spec = VeSpec {
            name: request.name.clone(),
            hostname: request.hostname.clone().unwrap_or_else(|| request.name.clone()),
            template: request.template.clone(),
            ipv4,
            ipv6: request.ipv6.clone(),
            limits: request.limits.clone(),
            uid_base: self.allocate_uid_base(&existing)?,
            autostart: request.autostart,
        };
        spec.validate(Self::host_cpus())?;
        self.check_addresses(&spec, &existing)?;
        if spec.limits.disk_bytes < template.meta.min_disk_bytes {
            return Err(LifecycleError::Spec(SpecError::Limit(format!(
                "disk must be at least {} for template {}",
                crate::spec::format_size(template.meta.min_disk_bytes),
                template.name
            ))));
        }

        let dir = self.config.ve_dir(&spec.name);
        fs::create_dir_all(self.config.ves_dir()).map_err(io_context("cannot create the VE directory"))?;
        fs::create_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => LifecycleError::AlreadyExists(spec.name.clone()),
            _ => io_context(format!("cannot create {}", dir.display()))(e),
        })?;
        let result = self.build_disk(&spec, &template, &request).and_then(|_| self.save_spec(&spec));
        if let Err(error) = result {
            let _ = fs::remove_dir_all(&dir);
            return Err(error);
        }
        tracing::info!(ve = %spec.name, template = %spec.template, "created");
        Ok(spec)
    }

    fn build_disk(&self, spec: &VeSpec, template: &template::Template, request: &CreateRequest) -> Result<()> {
        let image = self.image_path(&spec.name);
        disk::create_disk(template, &image, spec.limits.disk_bytes)?;
        let mount = self.disk_mount(&spec.name);
        fs::create_dir_all(&mount).map_err(io_context(format!("cannot create {}", mount.display())))?;
        let attached = disk::attach(&image, &mount)?;
        let result = self.personalize(&attached.mount_point, spec, request);
        disk::detach(&attached)?;
        result
    }

    /// Writes the VE's identity into its fresh root filesystem.
    fn personalize(&self, root: &Path, spec: &VeSpec, request: &CreateRequest) -> Result<()> {
        guest_files::write_file(root, "/etc/hostname", format!("{}\n", spec.hostname).as_bytes(), 0o644)?;
        let addresses: Vec<String> = spec
            .ipv4
            .iter()
            .map(|c| c.address.to_string())
            .chain(spec.ipv6.iter().map(|c| c.address.to_string()))
            .collect();
        guest_files::write_file(root, "/etc/hosts", guest_files::hosts_file(&spec.hostname, &addresses).as_bytes(), 0o644)?;
        guest_files::write_file(root, "/etc/resolv.conf", self.resolv_conf().as_bytes(), 0o644)?;
        if let Some(password) = &request.root_password {
            guest_files::set_root_password(root, password)?;
        }
        if !request.ssh_keys.is_empty() {
            guest_files::set_root_ssh_keys(root, &request.ssh_keys)?;
        }
        Ok(())
    }

    fn resolv_conf(&self) -> String {
        let servers = &self.config.network.dns_servers;
        if servers.is_empty() {
            fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
        } else {
            servers.iter().map(|s| format!("nameserver {s}\n")).collect()
        }
    }

    fn allocate_uid_base(&self, existing: &[VeSpec]) -> Result<u32> {
        let used: std::collections::HashSet<u32> =
            existing.iter().filter_map(|s| self.config.slot_for_uid_base(s.uid_base)).collect();
        (0..self.config.uid_range_slots)
            .find(|slot| !used.contains(slot))
            .map(|slot| self.config.uid_base_for_slot(slot))
            .ok_or(LifecycleError::NoFreeUidRange(used.len() as u32))
    }

    fn allocate_ipv4(&self, existing: &[VeSpec]) -> Result<Ipv4Cidr> {
        let gateway = self.config.network.ipv4_gateway.ok_or_else(|| {
            LifecycleError::NoFreeAddress("none (the node has no IPv4 gateway configured; give --ip)".into())
        })?;
        let used: std::collections::HashSet<Ipv4Addr> =
            existing.iter().flat_map(|s| s.ipv4.iter().map(|c| c.address)).collect();
        let first = u32::from(gateway.network()) + 1;
        let last = u32::from(gateway.broadcast());
        (first..last)
            .map(Ipv4Addr::from)
            .find(|a| *a != gateway.address && !used.contains(a))
            .map(|address| Ipv4Cidr { address, prefix: gateway.prefix })
            .ok_or_else(|| LifecycleError::NoFreeAddress(gateway.to_string()))
    }

    fn check_addresses(&self, spec: &VeSpec, others: &[VeSpec]) -> Result<()> {
        let net = &self.config.network;
        for cidr in &spec.ipv4 {
            if let Some(gateway) = net.ipv4_gateway {
                if !gateway.contains(cidr.address) || cidr.address == gateway.address {
                    return Err(LifecycleError::AddressOutsideSubnet { address: cidr.to_string(), subnet: gateway.to_string() });
                }
            }
            if let Some(owner) = others.iter().find(|o| o.name != spec.name && o.ipv4.iter().any(|c| c.address == cidr.address)) {
                return Err(LifecycleError::AddressInUse { address: cidr.address.to_string(), owner: owner.name.clone() });
            }
        }
        for cidr in &spec.ipv6 {
            if let Some(gateway) = net.ipv6_gateway {
                if !gateway.contains(cidr.address) || cidr.address == gateway.address {
                    return Err(LifecycleError::AddressOutsideSubnet { address: cidr.to_string(), subnet: gateway.to_string() });
                }
            }
            if let Some(owner) = others.iter().find(|o| o.name != spec.name && o.ipv6.iter().any(|c| c.address == cidr.address)) {
                return Err(LifecycleError::AddressInUse { address: cidr.address.to_string(), owner: owner.name.clone() });
            }
        }
        Ok(())
    }

    /// Whether the VE's init is alive, and its host pid.
    pub fn running_pid(&self, name: &str) -> Option<i32> {
        match self.runtime.state(name) {
            Ok(state)
                if state.pid > 0
                    && (state.status == ve_runtime::Status::Running || state.status == ve_runtime::Status::Created) =>
            {
                Some(state.pid)
            }
            _ => None,
        }
    }

    pub fn status(&self, name: &str) -> Result<VeStatus> {
        self.spec(name)?;
        Ok(if self.running_pid(name).is_some() { VeStatus::Running } else { VeStatus::Stopped })
    }

    /// Starts a stopped VE: disk, idmapped rootfs, container, network, init.
    pub fn start(&self, name: &str) -> Result<()> {
        let spec = self.spec(name)?;
        let _lock = self.lock(name)?;
        if self.running_pid(name).is_some() {
            return Err(LifecycleError::Running(name.into()));
        }
        // Leftovers of a VE that died on its own (or a node that crashed).
        if self.has_leftovers(name) {
            self.teardown(&spec)?;
        }
        let template = template::load_template(&self.config.templates_dir, &spec.template)?;
        // The agent sets the bridge up fully when it starts; a start only
        // creates it if it is missing (ensure_bridge runs `ip` and nft).
        if !network::bridge_ready(&self.config.network.bridge) {
            network::ensure_bridge(&self.bridge())?;
        }
        let procfs_ready = daemons::ensure_procfs(&self.config).unwrap_or_else(|error| {
            tracing::warn!(ve = name, %error, "VE starts without its /proc views");
            false
        });
        if let Err(error) = self.start_steps(&spec, &template, procfs_ready) {
            tracing::warn!(ve = name, %error, "start failed, undoing");
            if let Err(undo) = self.teardown(&spec) {
                tracing::warn!(ve = name, error = %undo, "cleanup after failed start");
            }
            return Err(error);
        }
        self.set_desired(name, VeStatus::Running)?;
        crate::agent::record_boot(&self.config);
        tracing::info!(ve = name, "started");
        Ok(())
    }

    fn start_steps(&self, spec: &VeSpec, template: &template::Template, procfs_ready: bool) -> Result<()> {
        // The VE's nft rules need only its identity: they are installed on
        // another thread while the disk is mounted and the container made.
        let bridge = self.bridge();
        let ve_network = self.ve_network(spec);
        std::thread::scope(|scope| {
            let rules = scope.spawn(|| network::install_ve_rules(&bridge, &ve_network));
            let pid = self.create_container(spec, template, procfs_ready);
            let rules = rules.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let pid = pid?;
            rules?;
            network::attach_after_rules(&bridge, &ve_network, Path::new(&format!("/proc/{pid}/ns/net")))?;
            self.runtime.start(&spec.name)?;
            Ok(())
        })
    }

    /// Mounts the VE's disk and creates its container (init waits for
    /// `start`); returns init's pid.
    fn create_container(&self, spec: &VeSpec, template: &template::Template, procfs_ready: bool) -> Result<i32> {
        let name = &spec.name;
        let run_dir = self.config.ve_run_dir(name);
        let mount = self.disk_mount(name);
        let rootfs = self.rootfs(name);
        for dir in [&mount, &rootfs] {
            fs::create_dir_all(dir).map_err(io_context(format!("cannot create {}", dir.display())))?;
        }
        let attached = disk::attach(&self.image_path(name), &mount)?;
        idmap::idmapped_bind(&attached.mount_point, &rootfs, spec.uid_base, spec.uid_base, crate::config::UIDS_PER_VE)?;

        let proc_views = if procfs_ready {
            let root = &self.config.procfs_mountpoint;
            procfs::proc_view_mounts(root, name)
                .into_iter()
                .chain(procfs::sys_view_mounts(root, name))
                .map(|(source, target)| (source, target.to_string()))
                .collect()
        } else {
            Vec::new()
        };
        let config = bundle::config_json(&bundle::BundleInputs {
            spec,
            template: &template.meta,
            rootfs: &rootfs,
            cgroup_path: self.cgroup_path(name),
            disk_device: Some((attached.loop_major, attached.loop_minor)),
            proc_views,
            cpuset: self.cpuset(spec),
        });
        let config_path = run_dir.join("config.json");
        fs::write(&config_path, serde_json::to_vec_pretty(&config).expect("config serializes"))
            .map_err(io_context(format!("cannot write {}", config_path.display())))?;

        let options = ve_runtime::CreateOptions {
            output: Some(self.config.ve_dir(name).join("console.log")),
            ..Default::default()
        };
        let state = self.runtime.create(name, &run_dir, &options)?;
        Ok(state.pid)
    }

    fn cpuset(&self, spec: &VeSpec) -> Option<String> {
        let slot = self.config.slot_for_uid_base(spec.uid_base).unwrap_or(0);
        crate::spec::cpuset_for(spec.limits.cpus, Self::host_cpus(), slot)
    }

    fn ve_network(&self, spec: &VeSpec) -> network::VeNetwork {
        let net = &self.config.network;
        network::VeNetwork {
            ve_id: spec.name.clone(),
            ipv4: spec.ipv4.iter().map(|c| (c.address, c.prefix)).collect(),
            ipv6: spec.ipv6.iter().map(|c| (c.address, c.prefix)).collect(),
            ipv4_gateway: net.ipv4_gateway.map(|c| c.address),
            ipv6_gateway: net.ipv6_gateway.map(|c| c.address),
            mtu: None,
        }
    }

    /// Whether anything of a previous run of the VE is still on the node:
    /// runtime state, its mounts, its veth. Cheap, so a clean start skips
    /// the teardown (which loads nftables and scans loop devices).
    fn has_leftovers(&self, name: &str) -> bool {
        if self.runtime.state(name).is_ok() {
            return true;
        }
        let run_dir = self.config.ve_run_dir(name);
        let mounts = disk::mountinfo::read().unwrap_or_default();
        if mounts.iter().any(|m| m.mount_point.starts_with(&run_dir)) {
            return true;
        }
        let ifname = std::ffi::CString::new(network::host_ifname_for_ve(name)).expect("interface names have no NUL");
        // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
        unsafe { libc::if_nametoindex(ifname.as_ptr()) != 0 }
    }

    /// Removes everything a VE holds on this node while it runs: container,
    /// network, mounts, loop device. Idempotent.
    fn teardown(&self, spec: &VeSpec) -> Result<()> {
        let name = &spec.name;
        let had_container = match self.runtime.delete(name, true) {
            Ok(()) => true,
            Err(ve_runtime::RuntimeError::State(ve_runtime::state::StateError::NotFound(..))) => false,
            Err(error) => return Err(error.into()),
        };
        // Its processes are dead, so nothing can use the network any more:
        // the rules go (an nft transaction, a few ms) while the disk is
        // unmounted (ext4's unmount, a few ms more).
        let bridge = self.bridge();
        let (network, disk) = std::thread::scope(|scope| {
            let network = scope.spawn(|| {
                if had_container {
                    // The veth goes with the VE's netns.
                    network::detach_rules(&bridge, name)
                } else {
                    network::detach(&bridge, name)
                }
            });
            let disk = self.unmount_disk(name);
            (network.join(), disk)
        });
        network.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        disk
    }

    fn unmount_disk(&self, name: &str) -> Result<()> {
        idmap::unmount(&self.rootfs(name))?;
        if let Some(attached) = disk::find_attached_at(&self.image_path(name), &self.disk_mount(name))? {
            disk::detach(&attached)?;
        }
        Ok(())
    }

    /// Stops a VE: its init gets the template's shutdown signal, and
    /// everything left is killed after `timeout`.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<()> {
        let spec = self.spec(name)?;
        let _lock = self.lock(name)?;
        self.set_desired(name, VeStatus::Stopped)?;
        if self.running_pid(name).is_none() {
            self.teardown(&spec)?;
            return Err(LifecycleError::NotRunning(name.into()));
        }
        let template = template::load_template(&self.config.templates_dir, &spec.template).ok();
        let signal = template
            .as_ref()
            .and_then(|t| t.meta.stop_signal.parse::<nix::sys::signal::Signal>().ok())
            .unwrap_or(nix::sys::signal::Signal::SIGTERM);
        if timeout > Duration::ZERO {
            match self.runtime.kill(name, signal) {
                Ok(()) => self.wait_stopped(name, timeout),
                Err(error) => tracing::warn!(ve = name, %error, "shutdown signal not delivered, killing"),
            }
        }
        self.teardown(&spec)?;
        tracing::info!(ve = name, "stopped");
        Ok(())
    }

    /// What the VE's OS asked for once its shutdown scripts finished: its
    /// init cannot halt or reboot the kernel, so it writes `/run/vz-shutdown`.
    pub fn shutdown_request(&self, name: &str) -> Option<ShutdownRequest> {
        let pid = self.running_pid(name)?;
        let text = fs::read_to_string(format!("/proc/{pid}/root/run/vz-shutdown")).ok()?;
        match text.trim() {
            "halt" => Some(ShutdownRequest::Halt),
            "reboot" => Some(ShutdownRequest::Reboot),
            _ => None,
        }
    }

    fn wait_stopped(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        while Instant::now() < deadline {
            if self.running_pid(name).is_none() {
                return;
            }
            if self.shutdown_request(name).is_some() {
                tracing::debug!(ve = name, "the VE's OS finished its shutdown");
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        tracing::warn!(ve = name, ?timeout, "did not shut down in time, killing");
    }

    pub fn restart(&self, name: &str, timeout: Duration) -> Result<()> {
        match self.stop(name, timeout) {
            Ok(()) | Err(LifecycleError::NotRunning(_)) => {}
            Err(error) => return Err(error),
        }
        self.start(name)
    }

    /// Destroys a VE and its disk. A running VE needs `force`.
    pub fn destroy(&self, name: &str, force: bool) -> Result<()> {
        let spec = self.spec(name)?;
        if self.running_pid(name).is_some() {
            if !force {
                return Err(LifecycleError::Running(name.into()));
            }
            self.stop(name, Duration::ZERO)?;
        }
        let _lock = self.lock(name)?;
        self.teardown(&spec)?;
        let run_dir = self.config.ve_run_dir(name);
        let _ = fs::remove_dir_all(&run_dir);
        let dir = self.config.ve_dir(name);
        fs::remove_dir_all(&dir).map_err(io_context(format!("cannot remove {}", dir.display())))?;
        tracing::info!(ve = name, "destroyed");
        Ok(())
    }

    pub fn info(&self, name: &str) -> Result<VeInfo> {
        let spec = self.spec(name)?;
        let init_pid = self.running_pid(name);
        let usage = init_pid.map(|_| self.usage(&spec));
        Ok(VeInfo {
            status: if init_pid.is_some() { VeStatus::Running } else { VeStatus::Stopped },
            init_pid,
            usage,
            spec,
        })
    }

    pub fn list(&self) -> Result<Vec<VeInfo>> {
        self.names()?.iter().map(|n| self.info(n)).collect()
    }

    fn usage(&self, spec: &VeSpec) -> VeUsage {
        let mut usage = VeUsage::default();
        if let Ok(stats) = self.runtime.stats(&spec.name) {
            usage.memory_bytes = stats.memory_usage_bytes;
            usage.cpu_usage_ns = stats.cpu_usage_ns;
            usage.pids = stats.pids_current;
        }
        if let Ok(disk) = disk::usage(&self.disk_mount(&spec.name)) {
            usage.disk_used_bytes = disk.used_bytes;
            usage.disk_total_bytes = disk.total_bytes;
        }
        if let Ok((rx, tx)) = network::interface_stats(&spec.name) {
            usage.net_rx_bytes = rx;
            usage.net_tx_bytes = tx;
        }
        usage
    }

    /// Runs a command inside a running VE, as its root; returns its exit code.
    pub fn exec(&self, name: &str, args: Vec<String>, tty: bool) -> Result<i32> {
        self.spec(name)?;
        if self.running_pid(name).is_none() {
            return Err(LifecycleError::NotRunning(name.into()));
        }
        let options = ve_runtime::ExecOptions { args, tty, ..Default::default() };
        let status = self.runtime.exec(name, &options)?;
        Ok(status.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
    }

    /// Changes a VE's limits; a running VE gets them at once.
    pub fn set_limits(&self, name: &str, limits: Limits) -> Result<VeSpec> {
        let mut spec = self.spec(name)?;
        let _lock = self.lock(name)?;
        let old = spec.limits.clone();
        spec.limits = limits;
        spec.validate(Self::host_cpus())?;
        if spec.limits.disk_bytes < old.disk_bytes {
            return Err(LifecycleError::DiskShrink { name: name.into(), from: old.disk_bytes, to: spec.limits.disk_bytes });
        }
        let running = self.running_pid(name).is_some();
        let attached = if running { disk::find_attached_at(&self.image_path(name), &self.disk_mount(name))? } else { None };
        if spec.limits.disk_bytes > old.disk_bytes {
            disk::grow(&self.image_path(name), spec.limits.disk_bytes, attached.as_ref())?;
        }
        if running {
            let template = template::load_template(&self.config.templates_dir, &spec.template)?;
            let config = bundle::config_json(&bundle::BundleInputs {
                spec: &spec,
                template: &template.meta,
                rootfs: &self.rootfs(name),
                cgroup_path: self.cgroup_path(name),
                disk_device: attached.as_ref().map(|d| (d.loop_major, d.loop_minor)),
                proc_views: Vec::new(),
                cpuset: self.cpuset(&spec),
            });
            let resources: oci_spec::runtime::LinuxResources =
                serde_json::from_value(config["linux"]["resources"].clone()).map_err(|e| LifecycleError::Other {
                    name: name.into(),
                    message: format!("cannot build resources: {e}"),
                })?;
            self.runtime.update(name, &resources)?;
        }
        self.save_spec(&spec)?;
        Ok(spec)
    }

    pub fn set_autostart(&self, name: &str, autostart: bool) -> Result<VeSpec> {
        let mut spec = self.spec(name)?;
        let _lock = self.lock(name)?;
        spec.autostart = autostart;
        self.save_spec(&spec)?;
        Ok(spec)
    }

    /// Starts every VE marked autostart that is not running; returns the
    /// errors of those that failed, by name.
    pub fn start_autostart(&self) -> Vec<(String, LifecycleError)> {
        let mut failures = Vec::new();
        for spec in self.all_specs().unwrap_or_default() {
            if spec.autostart && self.running_pid(&spec.name).is_none() {
                if let Err(error) = self.start(&spec.name) {
                    failures.push((spec.name.clone(), error));
                }
            }
        }
        failures
    }
}
