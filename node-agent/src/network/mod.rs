//! VE networking on a node: one bridge with the gateway addresses of the
//! VE subnets, a veth pair per VE (host end `vz<hash>` on the bridge, VE end
//! `eth0` in the VE's netns), a MAC derived from the VE id, nftables
//! anti-spoofing per VE, optional outbound NAT, and a gratuitous ARP /
//! unsolicited NA when a VE's network comes up. See docs/networking.md.
//!
//! Everything is synchronous and works in the network namespace of the
//! calling thread (the node's); the VE side is configured from a thread
//! that entered the VE's netns ([`run_in_netns`]).

mod announce;
mod identity;
mod links;
mod netns;
mod nftables;
mod rtnetlink;
mod rules;
mod stats;
mod tools;
mod validate;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use announce::send_frames;
pub use identity::{host_ifname_for_ve, link_local_for_mac, mac_for_ve, VE_IFNAME};
pub use netns::{run_in_netns, NetnsError};
pub use nftables::NftError;
pub use tools::ToolError;
pub use validate::{validate_bridge, validate_ve, InvalidConfig};

use identity::{host_mac_for_ve, mac_for_bridge};
use rules::VeIdentity;

/// The node's bridge. Its name also names its nft tables (`bridge`, `ip`
/// and `ip6` families), so several bridges never share rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    /// Gateway address and prefix of the VEs' IPv4 subnet, set on the bridge.
    pub ipv4_gateway: Option<(Ipv4Addr, u8)>,
    /// Gateway address and prefix of the VEs' IPv6 subnet, set on the bridge.
    pub ipv6_gateway: Option<(Ipv6Addr, u8)>,
    /// Masquerade VE traffic leaving the node through its other interfaces.
    pub nat_outbound: bool,
}

impl BridgeConfig {
    /// The default bridge name.
    pub const DEFAULT_NAME: &'static str = "vzbr0";
}

/// A VE's network configuration: static addresses from the cluster's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeNetwork {
    pub ve_id: String,
    pub ipv4: Vec<(Ipv4Addr, u8)>,
    pub ipv6: Vec<(Ipv6Addr, u8)>,
    pub ipv4_gateway: Option<Ipv4Addr>,
    pub ipv6_gateway: Option<Ipv6Addr>,
    pub mtu: Option<u32>,
}

/// Errors of VE networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid configuration of bridge {bridge:?}: {reason}")]
    InvalidBridge {
        bridge: String,
        reason: InvalidConfig,
    },
    #[error("invalid network configuration of VE {ve_id:?}: {reason}")]
    InvalidVe {
        ve_id: String,
        reason: InvalidConfig,
    },
    #[error(
        "cannot attach network of VE {ve_id}: netns {path} does not exist (is the VE running?)"
    )]
    NetnsMissing { ve_id: String, path: PathBuf },
    #[error("bridge {bridge} does not exist: run ensure_bridge first")]
    BridgeMissing { bridge: String },
    #[error(
        "interface {name} exists but is not a bridge: delete it or configure another bridge name"
    )]
    NotABridge { name: String },
    #[error("no interface {ifname} of VE {ve_id} on this node: is its network attached?")]
    NotAttached { ve_id: String, ifname: String },
    #[error("cannot {action}: {source}")]
    Tool { action: String, source: ToolError },
    #[error("cannot {action}: {source}")]
    Netns { action: String, source: NetnsError },
    #[error("cannot {action}: {source}")]
    Netlink {
        action: String,
        source: std::io::Error,
    },
    #[error("cannot {action}: {source}")]
    Nft { action: String, source: NftError },
    #[error("cannot enable forwarding for bridge {bridge} ({path}): {source}")]
    Forwarding {
        bridge: String,
        path: &'static str,
        source: std::io::Error,
    },
    #[error(
        "cannot announce addresses of VE {ve_id} (gratuitous ARP / NA on {VE_IFNAME}): {source}"
    )]
    Announce {
        ve_id: String,
        source: std::io::Error,
    },
    #[error(
        "cannot read interface counters of VE {ve_id} from /proc/thread-self/net/dev: {source}"
    )]
    Stats {
        ve_id: String,
        source: std::io::Error,
    },
}

/// Linkwatch enables a port within microseconds; a bridge with STP on
/// would take far longer, and then the announcement goes out regardless.
const PORT_FORWARDING_TIMEOUT: Duration = Duration::from_secs(2);

fn tool_error(action: impl Into<String>) -> impl FnOnce(ToolError) -> NetworkError {
    let action = action.into();
    move |source| NetworkError::Tool { action, source }
}

fn nft_error(action: impl Into<String>) -> impl FnOnce(NftError) -> NetworkError {
    let action = action.into();
    move |source| NetworkError::Nft { action, source }
}

/// Creates the bridge if needed, sets its gateway addresses, enables
/// forwarding and installs the node-wide nft tables. Idempotent.
pub fn ensure_bridge(cfg: &BridgeConfig) -> Result<(), NetworkError> {
    validate_bridge(cfg).map_err(|reason| NetworkError::InvalidBridge {
        bridge: cfg.name.clone(),
        reason,
    })?;
    let name = &cfg.name;
    if interface_exists(name) {
        if !is_bridge(name)? {
            return Err(NetworkError::NotABridge { name: name.clone() });
        }
    } else {
        tools::ip_batch(&links::create_bridge(name, mac_for_bridge(name)))
            .map_err(tool_error(format!("create bridge {name}")))?;
        tracing::info!(bridge = %name, "created bridge");
    }
    tools::ip_batch(&links::configure_bridge(cfg)).map_err(tool_error(format!(
        "configure gateway addresses of bridge {name}"
    )))?;
    if cfg.ipv4_gateway.is_some() {
        enable_forwarding(name, "/proc/sys/net/ipv4/ip_forward")?;
    }
    if cfg.ipv6_gateway.is_some() {
        enable_forwarding(name, "/proc/sys/net/ipv6/conf/all/forwarding")?;
    }
    nftables::run(&rules::bridge_tables(cfg))
        .map_err(nft_error(format!("install nft tables of bridge {name}")))?;
    Ok(())
}

/// Removes the bridge and its nft tables. Idempotent. VE veths still
/// plugged into it are released, not deleted (detach them first).
pub fn remove_bridge(cfg: &BridgeConfig) -> Result<(), NetworkError> {
    validate::validate_bridge_name(&cfg.name).map_err(|reason| NetworkError::InvalidBridge {
        bridge: cfg.name.clone(),
        reason,
    })?;
    let name = &cfg.name;
    if interface_exists(name) {
        if !is_bridge(name)? {
            return Err(NetworkError::NotABridge { name: name.clone() });
        }
        tools::ip_batch(&format!("link del {name}\n"))
            .map_err(tool_error(format!("delete bridge {name}")))?;
    }
    nftables::run(&rules::remove_bridge_tables(name))
        .map_err(nft_error(format!("remove nft tables of bridge {name}")))?;
    Ok(())
}

/// Connects a VE to the bridge: veth pair, MAC, addresses, routes,
/// anti-spoofing rules, then announces its addresses from inside its netns.
/// Re-attaching a VE replaces its previous veth. On failure nothing of the
/// VE's network is left behind.
pub fn attach(bridge: &BridgeConfig, ve: &VeNetwork, netns: &Path) -> Result<(), NetworkError> {
    attach_with(bridge, ve, netns, RulesStep::Install)
}

/// [`attach`] for a VE whose rules [`install_ve_rules`] already put in place.
pub fn attach_after_rules(bridge: &BridgeConfig, ve: &VeNetwork, netns: &Path) -> Result<(), NetworkError> {
    attach_with(bridge, ve, netns, RulesStep::AlreadyInstalled)
}

/// The part of an attach that needs only the VE's identity, not its netns:
/// its anti-spoofing rules (one libnftables transaction, the most CPU of an
/// attach). A start installs them while the VE's container is being
/// created, then calls [`attach_after_rules`]. The rules name the port, which
/// does not exist yet: until then they match nothing.
pub fn install_ve_rules(bridge: &BridgeConfig, ve: &VeNetwork) -> Result<(), NetworkError> {
    check_identity(bridge, ve)?;
    install_rules(bridge, ve, &host_ifname_for_ve(&ve.ve_id))
}

/// The bridge's name and the VE's addresses are valid.
fn check_identity(bridge: &BridgeConfig, ve: &VeNetwork) -> Result<(), NetworkError> {
    validate::validate_bridge_name(&bridge.name).map_err(|reason| NetworkError::InvalidBridge {
        bridge: bridge.name.clone(),
        reason,
    })?;
    validate_ve(ve).map_err(|reason| NetworkError::InvalidVe {
        ve_id: ve.ve_id.clone(),
        reason,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RulesStep {
    Install,
    AlreadyInstalled,
}

fn attach_with(bridge: &BridgeConfig, ve: &VeNetwork, netns: &Path, rules: RulesStep) -> Result<(), NetworkError> {
    let started = Instant::now();
    check_attach_input(bridge, ve, netns)?;
    let ifname = host_ifname_for_ve(&ve.ve_id);
    if interface_exists(&ifname) {
        tracing::warn!(ve = %ve.ve_id, %ifname, "replacing a leftover veth");
        delete_link(&ve.ve_id, &ifname)?;
    }
    let result = configure_attach(bridge, ve, netns, &ifname, rules);
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = delete_link(&ve.ve_id, &ifname);
        let _ = remove_rules(&bridge.name, &ve.ve_id, &ifname);
    }
    result?;
    tracing::debug!(ve = %ve.ve_id, %ifname, elapsed_us = started.elapsed().as_micros() as u64, "attached VE network");
    Ok(())
}

fn check_attach_input(
    bridge: &BridgeConfig,
    ve: &VeNetwork,
    netns: &Path,
) -> Result<(), NetworkError> {
    check_identity(bridge, ve)?;
    validate::validate_netns_path(netns).map_err(|reason| NetworkError::InvalidVe {
        ve_id: ve.ve_id.clone(),
        reason,
    })?;
    if !netns.exists() {
        return Err(NetworkError::NetnsMissing {
            ve_id: ve.ve_id.clone(),
            path: netns.to_owned(),
        });
    }
    if !interface_exists(&bridge.name) {
        return Err(NetworkError::BridgeMissing {
            bridge: bridge.name.clone(),
        });
    }
    Ok(())
}

fn configure_attach(
    bridge: &BridgeConfig,
    ve: &VeNetwork,
    netns: &Path,
    ifname: &str,
    rules_step: RulesStep,
) -> Result<(), NetworkError> {
    // The rules name the port by ifname, so they are installed while the
    // veth is being created (the scoped thread inherits this thread's
    // netns); the VE end only comes up after both are done.
    let (rules, host_side) = std::thread::scope(|scope| {
        let rules = scope.spawn(|| match rules_step {
            RulesStep::Install => install_rules(bridge, ve, ifname),
            RulesStep::AlreadyInstalled => Ok(()),
        });
        let host_side = create_host_side(bridge, ve, netns, ifname);
        (rules.join(), host_side)
    });
    let host_socket = host_side?;
    rules.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    let ve_id = ve.ve_id.clone();
    let netns_text = netns.display().to_string();
    configure_inside(ve, netns, ifname, Some(host_socket), move || {
        let failed = |source| NetworkError::Netlink {
            action: format!("configure {VE_IFNAME} of VE {ve_id} in netns {netns_text}"),
            source,
        };
        let socket = rtnetlink::RouteSocket::open().map_err(failed)?;
        let lo = interface_index("lo");
        let eth0 = interface_index(VE_IFNAME);
        links::apply(&socket, links::ve_side_requests(ve, lo, eth0)).map_err(failed)
    })
}

/// Creates the veth with its VE end in the VE's netns, sets the port's
/// flags and pins the VE's MAC. Returns the rtnetlink socket (node netns)
/// for watching the port.
fn create_host_side(
    bridge: &BridgeConfig,
    ve: &VeNetwork,
    netns: &Path,
    ifname: &str,
) -> Result<rtnetlink::RouteSocket, NetworkError> {
    let ve_mac = mac_for_ve(&ve.ve_id);
    let failed = |action: String| move |source| NetworkError::Netlink { action, source };
    let socket = rtnetlink::RouteSocket::open().map_err(failed(format!(
        "open an rtnetlink socket for VE {}",
        ve.ve_id
    )))?;
    let netns_file = std::fs::File::open(netns).map_err(failed(format!(
        "open netns {} of VE {}",
        netns.display(),
        ve.ve_id
    )))?;
    let bridge_ifindex = interface_index(&bridge.name);
    if bridge_ifindex == 0 {
        return Err(NetworkError::BridgeMissing {
            bridge: bridge.name.clone(),
        });
    }
    let plan = links::VethPlan {
        bridge_ifindex,
        host_ifname: ifname,
        host_mac: host_mac_for_ve(&ve.ve_id),
        ve_mac,
        mtu: ve.mtu,
        netns: &netns_file,
    };
    socket
        .request(links::create_veth_request(&plan))
        .map_err(failed(format!(
            "create veth {ifname} of VE {} on bridge {} with its peer in netns {}",
            ve.ve_id,
            bridge.name,
            netns.display()
        )))?;
    let host_ifindex = interface_index(ifname);
    socket
        .request(links::port_flags_request(host_ifindex))
        .map_err(failed(format!(
            "turn off learning and flooding on port {ifname} of bridge {} (VE {})",
            bridge.name, ve.ve_id
        )))?;
    socket
        .request(links::static_fdb_request(host_ifindex, ve_mac))
        .map_err(failed(format!(
            "pin MAC of VE {} to port {ifname} of bridge {}",
            ve.ve_id, bridge.name
        )))?;
    Ok(socket)
}

fn rules_script(bridge: &BridgeConfig, ve: &VeNetwork, ifname: &str) -> String {
    let identity = VeIdentity {
        host_ifname: ifname,
        mac: mac_for_ve(&ve.ve_id),
        ipv4: ve.ipv4.iter().map(|&(address, _)| address).collect(),
        ipv6: ve.ipv6.iter().map(|&(address, _)| address).collect(),
    };
    rules::ve_chain(&bridge.name, &identity)
}

fn rules_action(bridge: &BridgeConfig, ve: &VeNetwork) -> String {
    format!(
        "install anti-spoofing rules of VE {} in nft table bridge {} (does it exist? run ensure_bridge)",
        ve.ve_id, bridge.name
    )
}

fn install_rules(bridge: &BridgeConfig, ve: &VeNetwork, ifname: &str) -> Result<(), NetworkError> {
    nftables::run(&rules_script(bridge, ve, ifname))
        .map(drop)
        .map_err(nft_error(rules_action(bridge, ve)))
}

/// Runs `configure` on a thread inside the VE's netns, then, once the VE's
/// bridge port forwards, announces the VE's addresses from there.
fn configure_inside(
    ve: &VeNetwork,
    netns: &Path,
    host_ifname: &str,
    host_socket: Option<rtnetlink::RouteSocket>,
    configure: impl FnOnce() -> Result<(), NetworkError> + Send,
) -> Result<(), NetworkError> {
    // Opened in the node's netns, so it reports on the host end of the veth
    // even when used from the VE's thread.
    let port_watch = host_socket
        .map_or_else(rtnetlink::RouteSocket::open, Ok)
        .map(|socket| (socket, interface_index(host_ifname)))
        .map_err(|error| tracing::warn!(ve = %ve.ve_id, %error, "cannot watch the bridge port"))
        .ok();
    let mac = mac_for_ve(&ve.ve_id);
    let (has_ipv4, has_ipv6) = (!ve.ipv4.is_empty(), !ve.ipv6.is_empty());
    let inside = run_in_netns(netns, move || {
        configure()?;
        if let Some((socket, ifindex)) = &port_watch {
            match socket.wait_until_forwarding(*ifindex, PORT_FORWARDING_TIMEOUT) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(ve = %ve.ve_id, host_ifname, "bridge port not forwarding yet; announcing anyway")
                }
                Err(error) => {
                    tracing::warn!(ve = %ve.ve_id, host_ifname, %error, "cannot read bridge port state")
                }
            }
        }
        rtnetlink::RouteSocket::open()
            .and_then(|socket| {
                let eth0 = interface_index(VE_IFNAME);
                announce::announce_addresses(&socket, VE_IFNAME, eth0, mac, has_ipv4, has_ipv6)
            })
            .map_err(|source| NetworkError::Announce {
                ve_id: ve.ve_id.clone(),
                source,
            })
    });
    inside.map_err(|source| NetworkError::Netns {
        action: format!("configure network of VE {}", ve.ve_id),
        source,
    })?
}

/// Disconnects a VE: deletes its veth (if the VE's netns is already gone,
/// so is the veth) and its nft rules. Idempotent.
pub fn detach(bridge: &BridgeConfig, ve_id: &str) -> Result<(), NetworkError> {
    check_detach_input(bridge, ve_id)?;
    let ifname = host_ifname_for_ve(ve_id);
    if interface_exists(&ifname) {
        delete_link(ve_id, &ifname)?;
    }
    remove_rules(&bridge.name, ve_id, &ifname)?;
    tracing::debug!(ve = %ve_id, %ifname, "detached VE network");
    Ok(())
}

fn check_detach_input(bridge: &BridgeConfig, ve_id: &str) -> Result<(), NetworkError> {
    validate::validate_bridge_name(&bridge.name).map_err(|reason| NetworkError::InvalidBridge {
        bridge: bridge.name.clone(),
        reason,
    })?;
    validate::validate_ve_id(ve_id).map_err(|reason| NetworkError::InvalidVe {
        ve_id: ve_id.to_owned(),
        reason,
    })?;
    Ok(())
}

/// Removes only a VE's rules, for a VE whose processes are all gone: its
/// veth then goes away with its network namespace, in the kernel's own
/// (batched, asynchronous) namespace cleanup, instead of the caller waiting
/// ~30 ms for a synchronous link delete. A new attach replaces a veth that
/// has not gone yet.
pub fn detach_rules(bridge: &BridgeConfig, ve_id: &str) -> Result<(), NetworkError> {
    check_detach_input(bridge, ve_id)?;
    let ifname = host_ifname_for_ve(ve_id);
    remove_rules(&bridge.name, ve_id, &ifname)?;
    tracing::debug!(ve = %ve_id, %ifname, "removed VE network rules");
    Ok(())
}

/// Changes the addresses of an attached, running VE: its rules are
/// replaced atomically, then its `eth0` is reconfigured (briefly down) and
/// the new addresses announced.
pub fn update_addresses(
    bridge: &BridgeConfig,
    ve: &VeNetwork,
    netns: &Path,
) -> Result<(), NetworkError> {
    check_attach_input(bridge, ve, netns)?;
    let ifname = host_ifname_for_ve(&ve.ve_id);
    if !interface_exists(&ifname) {
        return Err(NetworkError::NotAttached {
            ve_id: ve.ve_id.clone(),
            ifname,
        });
    }
    install_rules(bridge, ve, &ifname)?;
    let script = links::reconfigure_ve_side(ve);
    let action = format!(
        "configure {VE_IFNAME} of VE {} in netns {}",
        ve.ve_id,
        netns.display()
    );
    configure_inside(ve, netns, &ifname, None, move || {
        tools::ip_batch(&script).map_err(tool_error(action))
    })
}

/// `(rx_bytes, tx_bytes)`: bytes received and sent by the VE, read from
/// its host veth end (which counts the opposite directions).
pub fn interface_stats(ve_id: &str) -> Result<(u64, u64), NetworkError> {
    let ifname = host_ifname_for_ve(ve_id);
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").map_err(|source| {
        NetworkError::Stats {
            ve_id: ve_id.to_owned(),
            source,
        }
    })?;
    let host_end =
        stats::parse_net_dev(&text, &ifname).ok_or_else(|| NetworkError::NotAttached {
            ve_id: ve_id.to_owned(),
            ifname: ifname.clone(),
        })?;
    Ok((host_end.transmitted, host_end.received))
}

fn delete_link(ve_id: &str, ifname: &str) -> Result<(), NetworkError> {
    let failed = |source| NetworkError::Netlink {
        action: format!("delete veth {ifname} of VE {ve_id}"),
        source,
    };
    let ifindex = interface_index(ifname);
    if ifindex == 0 {
        return Ok(());
    }
    let socket = rtnetlink::RouteSocket::open().map_err(failed)?;
    match socket.request(links::delete_link_request(ifindex)) {
        // Gone meanwhile (e.g. the VE's netns was just destroyed): fine.
        Err(error) if error.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other.map_err(failed),
    }
}

fn remove_rules(bridge: &str, ve_id: &str, ifname: &str) -> Result<(), NetworkError> {
    match nftables::run(&rules::remove_ve_chain(bridge, ifname)) {
        // No table, no rules (the bridge was removed).
        Err(_) if !bridge_table_exists(bridge) => Ok(()),
        other => other.map(drop).map_err(nft_error(format!(
            "remove anti-spoofing rules of VE {ve_id} from nft table bridge {bridge}"
        ))),
    }
}

/// Whether the bridge and its nft tables exist in the calling thread's
/// netns: cheap (no process spawned), for a start path that only needs to
/// know whether [`ensure_bridge`] must run.
pub fn bridge_ready(bridge: &str) -> bool {
    interface_exists(bridge) && bridge_table_exists(bridge)
}

fn bridge_table_exists(bridge: &str) -> bool {
    nftables::table_exists(nftables::NFPROTO_BRIDGE, bridge).unwrap_or(false)
}

/// Whether an interface exists in the calling thread's netns (sysfs would
/// show the netns sysfs was mounted in instead).
fn interface_exists(name: &str) -> bool {
    interface_index(name) != 0
}

fn interface_index(name: &str) -> u32 {
    let Ok(name) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: name is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

fn is_bridge(name: &str) -> Result<bool, NetworkError> {
    let details = tools::run(
        "ip",
        &["-details", "-oneline", "link", "show", "dev", name],
        "",
    )
    .map_err(tool_error(format!("inspect interface {name}")))?;
    Ok(details.split_whitespace().any(|word| word == "bridge"))
}

fn enable_forwarding(bridge: &str, path: &'static str) -> Result<(), NetworkError> {
    let current = std::fs::read_to_string(path).unwrap_or_default();
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|source| NetworkError::Forwarding {
        bridge: bridge.to_owned(),
        path,
        source,
    })?;
    tracing::info!(bridge, path, "enabled forwarding");
    Ok(())
}
