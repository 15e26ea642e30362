//! Loading config.json and refusing what the runtime does not honour.
//!
//! Every field the runtime does not implement is an error naming the field,
//! never silently ignored: a VE that silently runs without a limit or a
//! security setting is worse than one that does not start.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::{mounts, namespaces, seccomp};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid OCI config: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config.json: {0} is not supported")]
    Unsupported(String),
    #[error("config.json: {0}")]
    Invalid(String),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Namespaces(#[from] namespaces::NamespaceError),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
}

/// Keys the runtime understands, per object; anything else is refused.
const TOP_KEYS: &[&str] = &[
    "ociVersion",
    "root",
    "mounts",
    "process",
    "hostname",
    "domainname",
    "annotations",
    "linux",
];
const PROCESS_KEYS: &[&str] = &[
    "terminal",
    "consoleSize",
    "user",
    "args",
    "env",
    "cwd",
    "capabilities",
    "rlimits",
    "noNewPrivileges",
    "oomScoreAdj",
];
const LINUX_KEYS: &[&str] = &[
    "uidMappings",
    "gidMappings",
    "sysctl",
    "resources",
    "cgroupsPath",
    "namespaces",
    "devices",
    "seccomp",
    "rootfsPropagation",
    "maskedPaths",
    "readonlyPaths",
];
const RESOURCES_KEYS: &[&str] = &["devices", "memory", "cpu", "pids", "blockIO"];
const MEMORY_KEYS: &[&str] = &[
    "limit",
    "reservation",
    "swap",
    "swappiness",
    "disableOOMKiller",
];
const CPU_KEYS: &[&str] = &["shares", "quota", "period", "cpus", "mems"];
const BLOCK_IO_KEYS: &[&str] = &[
    "weight",
    "throttleReadBpsDevice",
    "throttleWriteBpsDevice",
    "throttleReadIOPSDevice",
    "throttleWriteIOPSDevice",
    "throttleReadIopsDevice",
    "throttleWriteIopsDevice",
];

/// oci-spec 0.7 spells the OCI keys throttle{Read,Write}IOPSDevice as
/// ...IopsDevice; rename them so a standard config is not silently ignored.
pub fn normalize_resources(resources: &mut serde_json::Value) {
    if let Some(block_io) = resources.get_mut("blockIO").and_then(|b| b.as_object_mut()) {
        for (oci, ours) in [
            ("throttleReadIOPSDevice", "throttleReadIopsDevice"),
            ("throttleWriteIOPSDevice", "throttleWriteIopsDevice"),
        ] {
            if let Some(value) = block_io.remove(oci) {
                block_io.insert(ours.to_string(), value);
            }
        }
    }
}
const USER_KEYS: &[&str] = &["uid", "gid", "umask", "additionalGids"];

fn check_keys(value: &serde_json::Value, prefix: &str, allowed: &[&str]) -> Result<(), SpecError> {
    if let Some(object) = value.as_object() {
        for key in object.keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(SpecError::Unsupported(format!("{prefix}{key}")));
            }
        }
    }
    Ok(())
}

/// Refuses keys the runtime does not implement (pure).
pub fn check_known_fields(raw: &serde_json::Value) -> Result<(), SpecError> {
    check_keys(raw, "", TOP_KEYS)?;
    if let Some(process) = raw.get("process") {
        check_keys(process, "process.", PROCESS_KEYS)?;
        if let Some(user) = process.get("user") {
            check_keys(user, "process.user.", USER_KEYS)?;
        }
    }
    if let Some(linux) = raw.get("linux") {
        check_keys(linux, "linux.", LINUX_KEYS)?;
        if let Some(resources) = linux.get("resources") {
            check_resource_keys(resources)?;
        }
    }
    Ok(())
}

/// Refuses resource keys the runtime does not implement (also used by `update`).
pub fn check_resource_keys(resources: &serde_json::Value) -> Result<(), SpecError> {
    check_keys(resources, "linux.resources.", RESOURCES_KEYS)?;
    if let Some(memory) = resources.get("memory") {
        check_keys(memory, "linux.resources.memory.", MEMORY_KEYS)?;
    }
    if let Some(cpu) = resources.get("cpu") {
        check_keys(cpu, "linux.resources.cpu.", CPU_KEYS)?;
    }
    if let Some(block_io) = resources.get("blockIO") {
        check_keys(block_io, "linux.resources.blockIO.", BLOCK_IO_KEYS)?;
    }
    Ok(())
}

/// Refuses keys that parsing dropped (a misspelling, or a name oci-spec
/// spells differently): whatever the input says must survive a round trip.
fn check_nothing_ignored(
    raw: &serde_json::Value,
    parsed: &serde_json::Value,
    path: &str,
) -> Result<(), SpecError> {
    match (raw, parsed) {
        (serde_json::Value::Object(raw), serde_json::Value::Object(parsed)) => {
            for (key, value) in raw {
                if value.is_null() {
                    continue;
                }
                match parsed.get(key) {
                    Some(parsed_value) => {
                        check_nothing_ignored(value, parsed_value, &format!("{path}{key}."))?
                    }
                    None => return Err(SpecError::Unsupported(format!("{path}{key}"))),
                }
            }
            Ok(())
        }
        (serde_json::Value::Array(raw), serde_json::Value::Array(parsed))
            if raw.len() == parsed.len() =>
        {
            for (i, (r, p)) in raw.iter().zip(parsed).enumerate() {
                check_nothing_ignored(r, p, &format!("{}[{i}].", path.trim_end_matches('.')))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Reads, parses and validates `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        SpecError::Parse { reason, .. } => SpecError::Parse { path, reason },
        other => other,
    })
}

/// Parses and validates config.json contents (pure).
pub fn parse(text: &[u8]) -> Result<Spec, SpecError> {
    let parse_error = |reason: String| SpecError::Parse {
        path: PathBuf::from("config.json"),
        reason,
    };
    let mut raw: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| parse_error(e.to_string()))?;
    check_known_fields(&raw)?;
    if let Some(resources) = raw.get_mut("linux").and_then(|l| l.get_mut("resources")) {
        normalize_resources(resources);
    }
    let spec: Spec = serde_json::from_value(raw.clone()).map_err(|e| parse_error(e.to_string()))?;
    let reparsed = serde_json::to_value(&spec).map_err(|e| parse_error(e.to_string()))?;
    check_nothing_ignored(&raw, &reparsed, "")?;
    validate(&spec)?;
    Ok(spec)
}

/// Semantic checks on a parsed spec (pure).
pub fn validate(spec: &Spec) -> Result<(), SpecError> {
    let invalid = |m: &str| SpecError::Invalid(m.to_string());
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid("root.path is required"))?;
    if root.path().as_os_str().is_empty() {
        return Err(invalid("root.path is empty"));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("process is required"))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid("process.args must name the program to run"));
    }
    if !process.cwd().is_absolute() {
        return Err(invalid("process.cwd must be an absolute path"));
    }
    if process.console_size().is_some() && process.terminal() != Some(true) {
        return Err(invalid("process.consoleSize needs process.terminal: true"));
    }
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| invalid("linux is required"))?;
    namespaces::NamespacePlan::from_spec(linux)?;
    let has_ns = |t: LinuxNamespaceType| linux.namespaces().iter().flatten().any(|n| n.typ() == t);
    if spec.hostname().is_some() && !has_ns(LinuxNamespaceType::Uts) {
        return Err(invalid(
            "hostname needs a uts namespace (it would rename the host)",
        ));
    }
    if let Some(propagation) = linux.rootfs_propagation() {
        mounts::parse_propagation(propagation)?;
    }
    for mount in spec.mounts().iter().flatten() {
        mounts::MountSpec::from_oci(mount)?;
    }
    if let Some(profile) = linux.seccomp() {
        seccomp::validate(profile)?;
    }
    for device in linux.devices().iter().flatten() {
        if !device.path().starts_with("/dev/") {
            return Err(SpecError::Invalid(format!(
                "linux.devices: {} is outside /dev",
                device.path().display()
            )));
        }
    }
    for capability_set in process.capabilities().iter() {
        let _ = capability_set; // capability names are checked by oci-spec's parser
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn minimal() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["/bin/sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "hostname": "ve1",
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "user"}],
                "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
                "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]
            }
        })
    }

    fn parse_value(v: &serde_json::Value) -> Result<Spec, SpecError> {
        parse(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn minimal_config_is_accepted() {
        parse_value(&minimal()).unwrap();
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut v = minimal();
        v["linux"]["intelRdt"] = serde_json::json!({"closID": "x"});
        let e = parse_value(&v).unwrap_err().to_string();
        assert_eq!(e, "config.json: linux.intelRdt is not supported");
        let mut v = minimal();
        v["hooks"] = serde_json::json!({});
        assert_eq!(
            parse_value(&v).unwrap_err().to_string(),
            "config.json: hooks is not supported"
        );
        let mut v = minimal();
        v["linux"]["resources"] = serde_json::json!({"hugepageLimits": []});
        assert!(parse_value(&v)
            .unwrap_err()
            .to_string()
            .contains("linux.resources.hugepageLimits"));
    }

    #[test]
    fn oci_iops_keys_are_understood() {
        let mut v = minimal();
        v["linux"]["resources"] = serde_json::json!({"blockIO": {"throttleWriteIOPSDevice": [{"major": 7, "minor": 0, "rate": 100}]}});
        let spec = parse_value(&v).unwrap();
        let resources = spec.linux().as_ref().unwrap().resources().clone().unwrap();
        let block_io = resources.block_io().clone().unwrap();
        assert_eq!(
            block_io.throttle_write_iops_device().as_ref().unwrap()[0].rate(),
            100
        );
    }

    #[test]
    fn a_misspelled_nested_key_is_not_silently_ignored() {
        let mut v = minimal();
        v["process"]["user"]["uid"] = serde_json::json!(0);
        v["linux"]["resources"] =
            serde_json::json!({"memory": {"limit": 1000000, "swap": 2000000}});
        parse_value(&v).unwrap();
        v["linux"]["namespaces"][0]["pathh"] = serde_json::json!("/x");
        let e = parse_value(&v).unwrap_err().to_string();
        assert_eq!(e, "config.json: linux.namespaces[0].pathh is not supported");
    }

    #[test]
    fn missing_args_and_bad_json_are_errors() {
        let mut v = minimal();
        v["process"]["args"] = serde_json::json!([]);
        assert!(parse_value(&v)
            .unwrap_err()
            .to_string()
            .contains("process.args"));
        assert!(matches!(parse(b"{not json"), Err(SpecError::Parse { .. })));
    }

    #[test]
    fn hostname_without_uts_namespace_is_refused() {
        let mut v = minimal();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}]);
        v["linux"].as_object_mut().unwrap().remove("uidMappings");
        v["linux"].as_object_mut().unwrap().remove("gidMappings");
        assert!(parse_value(&v)
            .unwrap_err()
            .to_string()
            .contains("uts namespace"));
    }
}
