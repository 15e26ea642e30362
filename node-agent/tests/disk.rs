//! VE disks against the real kernel: template images built by images/build,
//! loop devices, ext4 mounts, idmapped mounts, quota and online growth.
//! Needs root. Every test works in its own temp dir and cleans up (mounts,
//! loop devices) through Drop guards, also when it fails.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use node_agent::disk::{self, loop_device, AttachedDisk, DiskError};
use node_agent::idmap;
use node_agent::template::{self, Template, TemplateError};

const MIB: u64 = 1024 * 1024;
const VE_BASE: u32 = 200_000;
const VE_COUNT: u32 = 65_536;

/// A test's scratch space; on drop unmounts everything under it and
/// releases every loop device backed by a file under it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vz-disk-test-{}-", std::process::id()))
            .tempdir()
            .expect("temp dir");
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Loop devices whose backing file lives in this scratch dir.
    fn our_loop_devices(&self) -> Vec<u32> {
        let root = fs::canonicalize(self.dir.path()).unwrap();
        loop_device::attached_numbers()
            .unwrap()
            .into_iter()
            .filter(|n| loop_device::backing_file(*n).is_some_and(|b| b.starts_with(&root)))
            .collect()
    }

    /// Asserts that no loop device backs a file in this dir. The kernel
    /// finishes an autoclear release a moment after the last close (and
    /// later still when a stopped VE's mount namespace held the disk), so
    /// this waits, bounded.
    fn assert_no_loop_devices(&self) {
        wait_until(std::time::Duration::from_secs(30), || {
            self.our_loop_devices().is_empty()
        });
        assert!(
            self.our_loop_devices().is_empty(),
            "leaked loop devices: {:?}",
            self.our_loop_devices()
        );
    }

    fn our_mounts(&self) -> Vec<PathBuf> {
        let root = fs::canonicalize(self.dir.path()).unwrap();
        disk::mountinfo::read()
            .unwrap()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&root))
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for mount in self.our_mounts().into_iter().rev() {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
        for number in self.our_loop_devices() {
            let device = loop_device::LoopDevice {
                number,
                path: format!("/dev/loop{number}").into(),
                major: 7,
                minor: number,
            };
            let _ = loop_device::clear(&device);
        }
    }
}

/// Builds the busybox template with the real builder into `scratch`.
fn busybox_template(scratch: &Scratch) -> Template {
    let templates = scratch.path("templates");
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build");
    let output = Command::new(&build)
        .arg("busybox")
        .arg("--out")
        .arg(&templates)
        .output()
        .expect("run images/build");
    assert!(
        output.status.success(),
        "images/build busybox failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    template::load_template(&templates, "busybox").expect("load the built template")
}

fn create_and_attach(scratch: &Scratch, size: u64) -> (Template, PathBuf, AttachedDisk) {
    let template = busybox_template(scratch);
    let image = scratch.path("disk.img");
    disk::create_disk(&template, &image, size).expect("create disk");
    let attached = disk::attach(&image, &scratch.path("mnt")).expect("attach");
    (template, image, attached)
}

/// Writes 1 MiB chunks to `path` until the first error; returns bytes written and the error.
fn fill(path: &Path, limit: u64) -> (u64, Option<io::Error>) {
    let mut file = File::create(path).expect("create fill file");
    let chunk = vec![0xA5u8; MIB as usize];
    let mut written = 0;
    while written < limit {
        match file.write_all(&chunk).and_then(|_| file.sync_data()) {
            Ok(()) => written += MIB,
            Err(e) => return (written, Some(e)),
        }
    }
    (written, None)
}

#[test]
fn disk_lifecycle_idmap_quota_and_online_grow() {
    let scratch = Scratch::new();
    let (template, image, attached) = create_and_attach(&scratch, 64 * MIB);
    assert_eq!(template.meta.stop_signal, "SIGUSR2");
    assert_eq!(template.meta.init, vec!["/sbin/init".to_string()]);

    // A sparse file of exactly the quota.
    let meta = fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    assert!(
        meta.blocks() * 512 < 64 * MIB,
        "image is not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    assert!(matches!(
        disk::create_disk(&template, &image, 64 * MIB),
        Err(DiskError::AlreadyExists { .. })
    ));
    // Each disk gets its own filesystem UUID (superblock offset 0x68).
    let uuid = |path: &Path| {
        let mut superblock = [0u8; 2048];
        io::Read::read_exact(&mut File::open(path).unwrap(), &mut superblock).unwrap();
        superblock[1024 + 0x68..1024 + 0x78].to_vec()
    };
    assert_ne!(uuid(&image), uuid(&template.image));

    // Attach is idempotent.
    assert_eq!(
        disk::attach(&image, &attached.mount_point).unwrap(),
        attached
    );
    assert_eq!(attached.loop_major, 7);
    let raw = &attached.mount_point.clone();
    assert!(fs::read_to_string(raw.join("var/www/index.html"))
        .unwrap()
        .contains("busybox VE"));

    // The idmapped view: image uid 0 is host uid 200000.
    let rootfs = scratch.path("rootfs");
    fs::create_dir(&rootfs).unwrap();
    idmap::idmapped_bind(raw, &rootfs, VE_BASE, VE_BASE, VE_COUNT).expect("idmapped bind");
    idmap::idmapped_bind(raw, &rootfs, VE_BASE, VE_BASE, VE_COUNT)
        .expect("idmapped bind is idempotent");
    let busybox = fs::metadata(rootfs.join("bin/busybox")).unwrap();
    assert_eq!((busybox.uid(), busybox.gid()), (VE_BASE, VE_BASE));
    assert_eq!(fs::metadata(raw.join("bin/busybox")).unwrap().uid(), 0);

    // A file made by host uid 200005 through the view is uid 5 in the image.
    let status = Command::new("/bin/busybox")
        .args(["sh", "-c", "echo hello > \"$0\"/tmp/by-ve-user"])
        .arg(&rootfs)
        .uid(VE_BASE + 5)
        .gid(VE_BASE + 5)
        .status()
        .unwrap();
    assert!(status.success());
    let through_view = fs::metadata(rootfs.join("tmp/by-ve-user")).unwrap();
    assert_eq!(
        (through_view.uid(), through_view.gid()),
        (VE_BASE + 5, VE_BASE + 5)
    );
    let on_disk = fs::metadata(raw.join("tmp/by-ve-user")).unwrap();
    assert_eq!((on_disk.uid(), on_disk.gid()), (5, 5));
    // A host uid outside the VE's range cannot write through the view.
    let outsider = Command::new("/bin/busybox")
        .args(["sh", "-c", "echo x > \"$0\"/tmp/outsider"])
        .arg(&rootfs)
        .uid(1000)
        .gid(1000)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!outsider.success());
    assert!(!raw.join("tmp/outsider").exists());

    // Detach refuses while the VE view exists, and changes nothing.
    let in_use = disk::detach(&attached).unwrap_err();
    assert!(matches!(in_use, DiskError::StillInUse { .. }), "{in_use}");
    assert!(raw.join("bin/busybox").exists());

    // The quota: writing stops with ENOSPC near 64 MiB.
    let (written, error) = fill(&raw.join("fill-1"), 256 * MIB);
    let error = error.expect("the disk never filled up");
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    assert!(
        written > 8 * MIB && written <= 64 * MIB,
        "wrote {written} bytes on a 64 MiB disk"
    );
    let full = disk::usage(raw).unwrap();
    // The journal (16 MiB) and inode tables are not part of the usable space.
    assert!(
        full.total_bytes <= 64 * MIB && full.total_bytes > 40 * MIB,
        "{full:?}"
    );
    assert!(
        full.total_bytes - full.used_bytes < 2 * MIB,
        "not full: {full:?}"
    );
    assert!(
        full.used_inodes > 100 && full.total_inodes >= 8192,
        "{full:?}"
    );

    // Shrinking is refused; growing online makes room, the VE view included.
    assert!(matches!(
        disk::grow(&image, 32 * MIB, Some(&attached)),
        Err(DiskError::ShrinkRefused { .. })
    ));
    let (attached, raw) = if disk::can_resize_online() {
        disk::grow(&image, 128 * MIB, Some(&attached)).expect("online grow");
        (attached, raw.clone())
    } else {
        // This host withholds CAP_SYS_RESOURCE (sandboxed CI): online grow
        // must refuse cleanly, then the offline path does the job.
        let refused = disk::grow(&image, 128 * MIB, Some(&attached)).unwrap_err();
        assert!(
            matches!(refused, DiskError::OnlineGrowUnsupported { .. }),
            "{refused}"
        );
        assert_eq!(
            fs::metadata(&image).unwrap().len(),
            64 * MIB,
            "a refused grow changed the image"
        );
        idmap::unmount(&rootfs).unwrap();
        disk::detach(&attached).unwrap();
        disk::grow(&image, 128 * MIB, None).expect("offline grow");
        let attached = disk::attach(&image, &scratch.path("mnt")).unwrap();
        idmap::idmapped_bind(&attached.mount_point, &rootfs, VE_BASE, VE_BASE, VE_COUNT).unwrap();
        let raw = attached.mount_point.clone();
        (attached, raw)
    };
    let raw = &raw;
    assert_eq!(fs::metadata(&image).unwrap().len(), 128 * MIB);
    let grown = disk::usage(raw).unwrap();
    assert!(
        grown.total_bytes > 100 * MIB && grown.total_bytes <= 128 * MIB,
        "{grown:?}"
    );
    let (more, error) = fill(&raw.join("fill-2"), 32 * MIB);
    assert!(
        error.is_none(),
        "write after grow failed after {more} bytes: {error:?}"
    );

    // Take it all down: no mount, no loop device left.
    idmap::unmount(&rootfs).unwrap();
    idmap::unmount(&rootfs).expect("unmount is idempotent");
    disk::detach(&attached).expect("detach");
    disk::detach(&attached).expect("detach is idempotent");
    assert!(
        scratch.our_mounts().is_empty(),
        "left mounted: {:?}",
        scratch.our_mounts()
    );
    scratch.assert_no_loop_devices();
    assert_eq!(disk::find_attached(&image).unwrap(), None);
}

#[test]
fn find_attached_after_restart() {
    let scratch = Scratch::new();
    let template = busybox_template(&scratch);
    let image = scratch.path("disk.img");
    disk::create_disk(&template, &image, 64 * MIB).unwrap();
    assert_eq!(disk::find_attached(&image).unwrap(), None);

    let attached = disk::attach(&image, &scratch.path("mnt")).unwrap();
    // What an agent that just restarted knows: only the image path.
    let found = disk::find_attached(&image)
        .unwrap()
        .expect("attached disk not found");
    assert_eq!(found, attached);
    assert!(found.loop_device.to_str().unwrap().starts_with("/dev/loop"));
    let number: u32 = found.loop_device.to_str().unwrap()["/dev/loop".len()..]
        .parse()
        .unwrap();
    assert_eq!(
        loop_device::backing_file(number),
        Some(fs::canonicalize(&image).unwrap())
    );

    // Also found through another path to the same file (here a bind mount).
    let alias = scratch.path("alias");
    fs::create_dir(&alias).unwrap();
    nix::mount::mount(
        Some(scratch.dir.path()),
        &alias,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    assert_eq!(
        disk::find_attached(&alias.join("disk.img"))
            .unwrap()
            .map(|d| d.loop_device),
        Some(found.loop_device.clone())
    );
    nix::mount::umount(&alias).unwrap();

    // A second mount point for the same image is refused.
    let elsewhere = disk::attach(&image, &scratch.path("mnt2")).unwrap_err();
    assert!(
        matches!(elsewhere, DiskError::MountedElsewhere { .. }),
        "{elsewhere}"
    );
    assert!(elsewhere.to_string().contains("already mounted at"));
    assert!(
        !scratch.path("mnt2").exists(),
        "failed attach left its mount point behind"
    );
    // Offline growth of an attached image is refused.
    assert!(matches!(
        disk::grow(&image, 80 * MIB, None),
        Err(DiskError::GrowWhileAttached { .. })
    ));

    disk::detach(&found).unwrap();
    assert_eq!(disk::find_attached(&image).unwrap(), None);
    scratch.assert_no_loop_devices();

    // A restart while something else (a stopped VE's mount namespace being
    // torn down) still holds the loop device: detach leaves the release to
    // autoclear, and attach mounts the same device again.
    let again = disk::attach(&image, &scratch.path("mnt")).unwrap();
    let holder = File::open(&again.loop_device).unwrap();
    disk::detach(&again).expect("detach with the device still open elsewhere");
    assert!(!scratch.our_mounts().contains(&again.mount_point));
    let remounted = disk::attach(&image, &scratch.path("mnt")).unwrap();
    assert_eq!(remounted.loop_device, again.loop_device);
    assert!(remounted.mount_point.join("var/www/index.html").exists());
    drop(holder);
    disk::detach(&remounted).unwrap();
    scratch.assert_no_loop_devices();

    // Offline growth, then the new size shows after the next attach.
    disk::grow(&image, 96 * MIB, None).expect("offline grow");
    let again = disk::attach(&image, &scratch.path("mnt")).unwrap();
    let usage = disk::usage(&again.mount_point).unwrap();
    assert!(
        usage.total_bytes > 70 * MIB && usage.total_bytes <= 96 * MIB,
        "{usage:?}"
    );
    assert!(again.mount_point.join("var/www/index.html").exists());
    disk::detach(&again).unwrap();
    scratch.assert_no_loop_devices();
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_nothing() {
    let scratch = Scratch::new();
    let templates = scratch.path("templates");
    let missing = template::load_template(&templates, "nosuch").unwrap_err();
    assert!(
        matches!(missing, TemplateError::NotFound { .. }),
        "{missing}"
    );
    assert!(missing.to_string().contains("images/build nosuch"));

    let template = busybox_template(&scratch);
    let image = scratch.path("small.img");
    let too_small = disk::create_disk(&template, &image, 8 * MIB).unwrap_err();
    assert!(
        matches!(too_small, DiskError::TooSmall { .. }),
        "{too_small}"
    );
    assert!(too_small.to_string().contains("busybox"));
    let left: Vec<_> = fs::read_dir(scratch.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "create_disk left files behind: {left:?}");

    // Not ext4 at all: refused before any loop device exists.
    let junk = scratch.path("junk.img");
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&junk)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let mount_point = scratch.path("mnt-junk");
    let not_ext4 = disk::attach(&junk, &mount_point).unwrap_err();
    assert!(matches!(not_ext4, DiskError::NotExt4 { .. }), "{not_ext4}");
    assert!(not_ext4.to_string().contains("junk.img"));
    assert!(!mount_point.exists());

    // Ext4 magic but a truncated filesystem: the mount fails after the loop
    // device was configured; autoclear must release it.
    let truncated = scratch.path("truncated.img");
    fs::copy(&template.image, &truncated).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let broken = disk::attach(&truncated, &mount_point).unwrap_err();
    assert!(matches!(broken, DiskError::Mount { .. }), "{broken}");
    assert!(!mount_point.exists());
    scratch.assert_no_loop_devices();
    assert!(scratch.our_mounts().is_empty());

    // Missing image; idmap onto a missing target; bad mappings.
    assert!(matches!(
        disk::attach(&scratch.path("none.img"), &mount_point),
        Err(DiskError::ImageMissing { .. })
    ));
    let no_target = idmap::idmapped_bind(
        scratch.dir.path(),
        &scratch.path("none"),
        VE_BASE,
        VE_BASE,
        VE_COUNT,
    );
    assert!(matches!(
        no_target,
        Err(idmap::IdmapError::TargetMissing { .. })
    ));
    let identity = idmap::idmapped_bind(scratch.dir.path(), scratch.dir.path(), 0, 0, VE_COUNT);
    assert!(matches!(
        identity,
        Err(idmap::IdmapError::InvalidMapping { .. })
    ));
    idmap::unmount(&scratch.path("never-mounted")).expect("unmounting nothing is fine");
}

#[test]
fn usage_of_a_fresh_disk() {
    let scratch = Scratch::new();
    let (_template, _image, attached) = create_and_attach(&scratch, 100 * MIB);
    let usage = disk::usage(&attached.mount_point).unwrap();
    assert!(
        usage.total_bytes > 75 * MIB && usage.total_bytes <= 100 * MIB,
        "{usage:?}"
    );
    assert!(usage.used_bytes < usage.total_bytes / 2, "{usage:?}");
    disk::detach(&attached).unwrap();
    assert!(matches!(
        disk::usage(&scratch.path("nowhere")),
        Err(DiskError::Usage { .. })
    ));
}

/// Kills and reaps a spawned process on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `done` until it holds; gives up (returns false) after `limit`, so
/// a hang fails the test instead of blocking it.
fn wait_until(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    done()
}

/// A template booted as PID 1 of new user, PID, mount, UTS, IPC and network
/// namespaces on its idmapped disk, the way a VE runs: the VE's root is host
/// uid 200000, /dev is a tmpfs with a few host devices bound in (the disk
/// itself is nodev), /proc is the VE's own.
struct BootedTemplate {
    unshare: ChildGuard,
    init_pid: nix::unistd::Pid,
}

fn boot(template: &Template, rootfs: &Path) -> BootedTemplate {
    use std::os::fd::AsFd;
    let userns = idmap::user_namespace_fd(VE_BASE, VE_BASE, VE_COUNT, rootfs).unwrap();
    let setup = r#"
        set -e
        root=$0
        # Copied mounts are locked in a new user namespace; pivot_root needs
        # an unlocked one.
        mount --bind "$root" "$root"
        mount -t tmpfs -o mode=755,nosuid dev "$root/dev"
        for node in null zero full random urandom tty; do
            touch "$root/dev/$node"
            mount --bind "/dev/$node" "$root/dev/$node"
        done
        mkdir -p "$root/dev/pts" "$root/dev/shm"
        mount -t proc proc "$root/proc"
        # pivot_root and drop the old root, as a runtime does: a chroot would
        # keep copies of every host mount (other tests' disks included)
        # alive in this mount namespace, pinning their loop devices.
        cd "$root"
        pivot_root . mnt
        exec /bin/sh -c 'umount -l /mnt && exec "$@"' sh "$@"
    "#;
    let mut command = Command::new("unshare");
    command
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--propagation=private",
        ])
        .args(["sh", "-c", setup])
        .arg(rootfs)
        .args(&template.meta.init)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let userns_fd = userns.as_fd().try_clone_to_owned().unwrap();
    // SAFETY: between fork and exec the child only makes raw system calls
    // (setns, setresgid, setresuid) on a descriptor it inherited.
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(&userns_fd, nix::sched::CloneFlags::CLONE_NEWUSER)?;
            // The VE's root: host uid 200000.
            nix::unistd::setresgid(0.into(), 0.into(), 0.into())?;
            nix::unistd::setresuid(0.into(), 0.into(), 0.into())?;
            Ok(())
        });
    }
    let unshare = ChildGuard(command.spawn().expect("spawn unshare"));
    // The VE's PID 1 is the only child of unshare (which forked it).
    let children_file = format!("/proc/{0}/task/{0}/children", unshare.0.id());
    let mut init_pid = None;
    wait_until(std::time::Duration::from_secs(10), || {
        init_pid = fs::read_to_string(&children_file)
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok());
        init_pid.is_some()
    });
    let init_pid = nix::unistd::Pid::from_raw(init_pid.expect("the VE's init never started"));
    BootedTemplate { unshare, init_pid }
}

impl BootedTemplate {
    /// Host pids of the VE's processes named `name`.
    fn processes_named(&self, name: &str) -> Vec<i32> {
        let Ok(ve_pidns) = fs::read_link(format!("/proc/{}/ns/pid", self.init_pid)) else {
            return Vec::new();
        };
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| ns == ve_pidns)
            })
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
            })
            .collect()
    }

    /// Sends the template's stop signal to init; true when the VE exited.
    fn stop(&mut self, template: &Template) -> bool {
        let signal = template::parse_signal(&template.meta.stop_signal).unwrap();
        nix::sys::signal::kill(self.init_pid, signal).unwrap();
        let mut exited = false;
        wait_until(std::time::Duration::from_secs(60), || {
            exited = exited || self.unshare.0.try_wait().unwrap().is_some();
            exited
        })
    }
}

/// The busybox template boots, starts its services, and its stop_signal
/// runs the shutdown actions and makes init exit.
#[test]
fn busybox_template_boots_and_stops_on_its_stop_signal() {
    use std::time::Duration;
    let scratch = Scratch::new();
    let (template, _image, attached) = create_and_attach(&scratch, 64 * MIB);
    let raw = attached.mount_point.clone();
    let rootfs = scratch.path("rootfs");
    fs::create_dir(&rootfs).unwrap();
    idmap::idmapped_bind(&raw, &rootfs, VE_BASE, VE_BASE, VE_COUNT).unwrap();
    let mut ve = boot(&template, &rootfs);

    let httpd_pid = raw.join("var/run/httpd.pid");
    assert!(
        wait_until(Duration::from_secs(30), || httpd_pid.exists()),
        "httpd never started"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !ve
            .processes_named("syslogd")
            .is_empty()),
        "no syslogd"
    );
    let boot_log = fs::read_to_string(raw.join("var/log/boot.log")).unwrap();
    assert!(boot_log.contains("boot"), "{boot_log}");
    // The log was written by the VE's root: uid 0 in the image.
    assert_eq!(fs::metadata(raw.join("var/log/boot.log")).unwrap().uid(), 0);

    assert!(
        ve.stop(&template),
        "init did not exit after {}",
        template.meta.stop_signal
    );
    let boot_log = fs::read_to_string(raw.join("var/log/boot.log")).unwrap();
    assert!(
        boot_log.contains("shutdown"),
        "shutdown actions did not run: {boot_log}"
    );
    assert!(!httpd_pid.exists(), "httpd was not stopped");

    drop(ve);
    idmap::unmount(&rootfs).unwrap();
    disk::detach(&attached).unwrap();
    scratch.assert_no_loop_devices();
}

/// The debian12 template: sshd starts with host keys made at first boot,
/// and SIGINT shuts the VE down through runlevel 0.
///
/// The template is built (from deb.debian.org, about 30 s) into the node's
/// template dir, as the system tests do: images/build skips it when it is
/// up to date and serialises concurrent builds.
#[test]
fn debian12_template_boots_sshd_and_stops_on_its_stop_signal() {
    use std::time::Duration;
    let scratch = Scratch::new();
    let templates = Path::new("/var/lib/vz/templates");
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build");
    let output = Command::new(&build)
        .arg("debian12")
        .arg("--out")
        .arg(templates)
        .output()
        .expect("run images/build");
    assert!(
        output.status.success(),
        "images/build debian12 failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let template = template::load_template(templates, "debian12").unwrap();
    assert_eq!(template.meta.stop_signal, "SIGINT");
    let image = scratch.path("disk.img");
    disk::create_disk(&template, &image, 1024 * MIB).unwrap();
    let attached = disk::attach(&image, &scratch.path("mnt")).unwrap();
    let raw = attached.mount_point.clone();
    assert!(
        !raw.join("etc/ssh/ssh_host_ed25519_key").exists(),
        "the template carries sshd host keys"
    );
    let rootfs = scratch.path("rootfs");
    fs::create_dir(&rootfs).unwrap();
    idmap::idmapped_bind(&raw, &rootfs, VE_BASE, VE_BASE, VE_COUNT).unwrap();
    let mut ve = boot(&template, &rootfs);

    assert!(
        wait_until(Duration::from_secs(60), || !ve
            .processes_named("sshd")
            .is_empty()),
        "sshd never started"
    );
    let host_key =
        fs::metadata(raw.join("etc/ssh/ssh_host_ed25519_key")).expect("no host key made at boot");
    assert_eq!((host_key.uid(), host_key.mode() & 0o777), (0, 0o600));

    assert!(
        ve.stop(&template),
        "init did not exit after {}",
        template.meta.stop_signal
    );
    // sysvinit records runlevel changes in wtmp: the stop went through
    // runlevel 0 (the shutdown scripts), not a plain kill.
    let wtmp = fs::read(raw.join("var/log/wtmp")).unwrap();
    assert!(
        wtmp_runlevels(&wtmp).contains(&'0'),
        "no runlevel 0 in wtmp: {:?}",
        wtmp_runlevels(&wtmp)
    );
    drop(ve);
    idmap::unmount(&rootfs).unwrap();
    disk::detach(&attached).unwrap();
    scratch.assert_no_loop_devices();
}

/// The runlevels entered according to a wtmp file (struct utmp records of
/// 384 bytes: ut_type RUN_LVL = 1 at offset 0, ut_pid = the new runlevel's
/// character at offset 4).
fn wtmp_runlevels(wtmp: &[u8]) -> Vec<char> {
    wtmp.chunks_exact(384)
        .filter(|r| i16::from_ne_bytes([r[0], r[1]]) == 1 && &r[44..52] == b"runlevel")
        .map(|r| char::from(r[4]))
        .collect()
}
