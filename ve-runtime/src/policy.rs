//! The VE security defaults, kept as data files under `ve-runtime/policy/`.
//!
//! The node agent builds each VE's config.json from these; the runtime itself
//! only enforces what config.json says. Why each entry is there is explained
//! in docs/ve-runtime.md.

use oci_spec::runtime::{Capabilities, Capability, LinuxSeccomp, Mount};

const SECCOMP_DENY: &str = include_str!("../policy/seccomp-deny.json");
const CAPABILITIES: &str = include_str!("../policy/capabilities.json");
const MASKED_PATHS: &str = include_str!("../policy/masked-paths.json");
const READONLY_PATHS: &str = include_str!("../policy/readonly-paths.json");
const MOUNTS: &str = include_str!("../policy/mounts.json");

// The policy files are compiled into the binary and covered by unit tests, so a
// parse failure is a build defect, not a runtime condition.
fn parse<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> T {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("policy/{name} is invalid: {e}"))
}

/// Capabilities a VE's root keeps (bounding, permitted, effective): everything a
/// full OS needs inside its own namespaces, nothing that acts on the host kernel
/// (modules, raw I/O, clock, syslog, MAC, audit control, BPF, perfmon).
pub fn default_capabilities() -> Capabilities {
    parse::<Vec<Capability>>("capabilities.json", CAPABILITIES)
        .into_iter()
        .collect()
}

/// The seccomp deny list: syscalls that reach host-global kernel state, all
/// answered with EPERM; everything else is allowed.
pub fn default_seccomp() -> LinuxSeccomp {
    parse("seccomp-deny.json", SECCOMP_DENY)
}

/// /proc and /sys paths hidden from the VE (a tmpfs over directories, /dev/null over files).
pub fn default_masked_paths() -> Vec<String> {
    parse("masked-paths.json", MASKED_PATHS)
}

/// /proc paths made read-only inside the VE.
pub fn default_readonly_paths() -> Vec<String> {
    parse("readonly-paths.json", READONLY_PATHS)
}

/// The standard mounts of a VE: proc, read-only sysfs, a tmpfs /dev with its own
/// devpts instance, /dev/shm, /dev/mqueue and a tmpfs /run.
pub fn default_mounts() -> Vec<Mount> {
    parse("mounts.json", MOUNTS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp;

    #[test]
    fn policy_files_parse() {
        assert!(default_capabilities().contains(&Capability::SysAdmin));
        assert!(!default_capabilities().contains(&Capability::SysModule));
        assert!(!default_capabilities().contains(&Capability::SysRawio));
        assert!(!default_capabilities().contains(&Capability::SysTime));
        assert!(default_masked_paths().iter().any(|p| p == "/proc/kcore"));
        assert!(default_readonly_paths().iter().any(|p| p == "/proc/sys"));
        let mounts = default_mounts();
        assert_eq!(mounts[0].destination().to_str(), Some("/proc"));
    }

    #[test]
    fn default_seccomp_compiles_and_names_real_syscalls() {
        let profile = default_seccomp();
        let names: Vec<&String> = profile
            .syscalls()
            .iter()
            .flatten()
            .flat_map(|s| s.names())
            .collect();
        assert!(names.iter().any(|n| *n == "init_module"));
        assert!(names.iter().any(|n| *n == "open_by_handle_at"));
        seccomp::compile(&profile).expect("default profile compiles");
    }
}
