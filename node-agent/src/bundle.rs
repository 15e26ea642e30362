//! The OCI bundle a VE runs from: its config.json, built from the VE's spec,
//! its template and the runtime's security policy. Pure: the caller writes it.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::spec::{VeSpec, CPU_PERIOD_US};
use crate::template::TemplateMeta;

/// Everything besides the spec that shapes a VE's config.json.
pub struct BundleInputs<'a> {
    pub spec: &'a VeSpec,
    pub template: &'a TemplateMeta,
    /// The idmapped root filesystem of the VE.
    pub rootfs: &'a Path,
    /// cgroup path of the VE, e.g. `/vz/web1`.
    pub cgroup_path: String,
    /// The VE's loop device (major, minor), for its block I/O weight.
    pub disk_device: Option<(u32, u32)>,
    /// Per-VE /proc and /sys views to bind over files: (host source, target).
    pub proc_views: Vec<(PathBuf, String)>,
    /// CPUs the VE runs on (cpuset list), `None` for all.
    pub cpuset: Option<String>,
}

/// CFS shares for a weight on the 1..10000 scale where 100 is the default.
fn cpu_shares(weight: u64) -> u64 {
    (weight * 1024 / 100).max(2)
}

pub fn config_json(inputs: &BundleInputs) -> Value {
    let spec = inputs.spec;
    let limits = &spec.limits;
    let id_map = json!([{ "containerID": 0, "hostID": spec.uid_base, "size": crate::config::UIDS_PER_VE }]);

    let mut mounts = serde_json::to_value(ve_runtime::policy::default_mounts()).expect("mounts serialize");
    let mounts_list = mounts.as_array_mut().expect("mounts are a list");
    for (source, target) in &inputs.proc_views {
        mounts_list.push(json!({
            "destination": target,
            "type": "bind",
            "source": source,
            "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
        }));
    }

    // Caps apply to the VE's loop device: its only block device. (This
    // kernel's cgroup v1 blkio has no proportional weight without CFQ/BFQ.)
    let mut block_io = json!({});
    if let Some((major, minor)) = inputs.disk_device {
        let io = &limits.io;
        for (key, rate) in [
            ("throttleReadBpsDevice", io.read_bytes_per_s),
            ("throttleWriteBpsDevice", io.write_bytes_per_s),
            ("throttleReadIOPSDevice", io.read_ops_per_s),
            ("throttleWriteIOPSDevice", io.write_ops_per_s),
        ] {
            if rate > 0 {
                block_io[key] = json!([{ "major": major, "minor": minor, "rate": rate }]);
            }
        }
    }

    let mut cpu = json!({
        "shares": cpu_shares(limits.cpu_weight),
        "quota": limits.cpu_quota_us(),
        "period": CPU_PERIOD_US,
    });
    if let Some(cpus) = &inputs.cpuset {
        cpu["cpus"] = json!(cpus);
    }
    let capabilities = serde_json::to_value(ve_runtime::policy::default_capabilities()).expect("capabilities serialize");
    json!({
        "ociVersion": "1.0.2",
        "root": { "path": inputs.rootfs, "readonly": false },
        "hostname": spec.hostname,
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": inputs.template.init,
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "container=vz",
                "TERM=linux",
            ],
            "cwd": "/",
            // Root in a VE gets its capabilities back from the bounding set at
            // every exec, so bounding is what limits it.
            "capabilities": {
                "bounding": capabilities,
                "permitted": capabilities,
                "effective": capabilities,
            },
            // A VE is a whole OS: su, sudo and ping need setuid to work.
            "noNewPrivileges": false,
            "oomScoreAdj": 0,
        },
        "mounts": mounts,
        "annotations": { "vz.ve.name": spec.name, "vz.ve.template": spec.template },
        "linux": {
            "namespaces": [
                { "type": "user" }, { "type": "mount" }, { "type": "pid" }, { "type": "uts" },
                { "type": "ipc" }, { "type": "network" }, { "type": "cgroup" },
            ],
            "uidMappings": id_map,
            "gidMappings": id_map,
            "cgroupsPath": inputs.cgroup_path,
            "resources": {
                "memory": {
                    "limit": limits.memory_bytes,
                    "swap": limits.memory_bytes + limits.swap_bytes,
                },
                "cpu": cpu,
                "pids": { "limit": limits.pids },
                "blockIO": block_io,
            },
            "seccomp": serde_json::to_value(ve_runtime::policy::default_seccomp()).expect("seccomp serializes"),
            "maskedPaths": ve_runtime::policy::default_masked_paths(),
            "readonlyPaths": ve_runtime::policy::default_readonly_paths(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Limits;

    #[test]
    fn config_carries_limits_map_and_views() {
        let spec = VeSpec {
            name: "web1".into(),
            hostname: "web1.example".into(),
            template: "busybox".into(),
            ipv4: vec![],
            ipv6: vec![],
            limits: Limits {
                memory_bytes: 256 << 20,
                swap_bytes: 64 << 20,
                cpus: 0.5,
                io: crate::spec::IoLimits { write_bytes_per_s: 10 << 20, ..Default::default() },
                ..Limits::default()
            },
            uid_base: 1_000_065_536,
            autostart: false,
        };
        let template = TemplateMeta {
            description: "t".into(),
            init: vec!["/sbin/init".into()],
            stop_signal: "SIGUSR2".into(),
            min_disk_bytes: 0,
            os: "busybox".into(),
        };
        let inputs = BundleInputs {
            spec: &spec,
            template: &template,
            rootfs: Path::new("/run/vz/ves/web1/rootfs"),
            cgroup_path: "/vz/web1".into(),
            disk_device: Some((7, 3)),
            proc_views: vec![(PathBuf::from("/run/vz/procfs/web1/meminfo"), "/proc/meminfo".into())],
            cpuset: Some("1".into()),
        };
        let config = config_json(&inputs);
        assert_eq!(config["linux"]["uidMappings"][0]["hostID"], 1_000_065_536u64);
        assert_eq!(config["linux"]["resources"]["memory"]["limit"], 256u64 << 20);
        assert_eq!(config["linux"]["resources"]["memory"]["swap"], 320u64 << 20);
        assert_eq!(config["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(config["linux"]["resources"]["cpu"]["cpus"], "1");
        assert_eq!(config["linux"]["resources"]["blockIO"]["throttleWriteBpsDevice"][0]["minor"], 3);
        assert_eq!(config["linux"]["resources"]["blockIO"]["throttleWriteBpsDevice"][0]["rate"], 10u64 << 20);
        assert!(config["linux"]["resources"]["blockIO"].get("throttleReadBpsDevice").is_none());
        let mounts = config["mounts"].as_array().unwrap();
        assert_eq!(mounts.last().unwrap()["destination"], "/proc/meminfo");
        // The bundle must be accepted by the OCI spec parser the runtime uses.
        let parsed: oci_spec::runtime::Spec = serde_json::from_value(config).unwrap();
        assert_eq!(parsed.hostname().as_deref(), Some("web1.example"));
    }
}
