//! Test helper: performs one escape attempt from inside a container and
//! reports the result. Exit 0 means the attempt SUCCEEDED (a security bug),
//! 1 means it was refused, 2 means bad usage. The security tests copy it into
//! a container's rootfs; it is not used by the runtime itself.
//!
//! Usage: ve-attack ATTACK [ARG]

use std::ffi::CString;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a raw syscall result into Ok or the errno.
fn check(rc: i64) -> Result<(), i32> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn arg_number(arg: Option<&String>) -> i64 {
    arg.and_then(|a| a.parse().ok()).unwrap_or(0)
}

fn attack(name: &str, arg: Option<&String>) -> Result<(), i32> {
    let empty = CString::new("").unwrap();
    // SAFETY: each arm calls one syscall with arguments that are
    // valid for it (zeroed buffers we own, NUL-terminated strings); the point
    // of the program is to see whether the kernel refuses them.
    unsafe {
        match name {
            "init_module" => {
                let image = [0u8; 64];
                check(libc::syscall(
                    libc::SYS_init_module,
                    image.as_ptr(),
                    image.len(),
                    empty.as_ptr(),
                ))
            }
            "finit_module" => {
                let path = CString::new("/bin/busybox").unwrap();
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                check(libc::syscall(libc::SYS_finit_module, fd, empty.as_ptr(), 0))
            }
            "delete_module" => {
                let module = CString::new("ext4").unwrap();
                check(libc::syscall(
                    libc::SYS_delete_module,
                    module.as_ptr(),
                    libc::O_NONBLOCK,
                ))
            }
            "kexec_load" => check(libc::syscall(
                libc::SYS_kexec_load,
                0,
                0,
                std::ptr::null::<u8>(),
                0,
            )),
            "open_by_handle_at" => {
                let root = CString::new("/").unwrap();
                let mount_fd = libc::open(root.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[8] }:
                // inode 2 of an ext4 filesystem is its root: the "shocker" attack.
                let mut handle = [0u32; 4];
                handle[0] = 8;
                handle[1] = 1;
                handle[2] = 2;
                check(libc::syscall(
                    libc::SYS_open_by_handle_at,
                    mount_fd,
                    handle.as_mut_ptr(),
                    libc::O_RDONLY,
                ))
            }
            "keyctl" => check(libc::syscall(libc::SYS_keyctl, 0, -3i64, 1)),
            "add_key" => {
                let kind = CString::new("user").unwrap();
                let desc = CString::new("ve-attack").unwrap();
                check(libc::syscall(
                    libc::SYS_add_key,
                    kind.as_ptr(),
                    desc.as_ptr(),
                    b"x".as_ptr(),
                    1,
                    -3i64,
                ))
            }
            "bpf" => {
                // BPF_MAP_CREATE of a small array map.
                let mut attr = [0u32; 32];
                attr[0] = 2; // BPF_MAP_TYPE_ARRAY
                attr[1] = 4;
                attr[2] = 4;
                attr[3] = 1;
                check(libc::syscall(
                    libc::SYS_bpf,
                    0,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr),
                ))
            }
            "perf_event_open" => {
                let mut attr = [0u8; 128];
                attr[0] = 1; // type = PERF_TYPE_SOFTWARE, config 0 = cpu-clock
                attr[4] = 128; // size
                check(libc::syscall(
                    libc::SYS_perf_event_open,
                    attr.as_mut_ptr(),
                    0,
                    -1,
                    -1,
                    0,
                ))
            }
            "settimeofday" => {
                let mut now: libc::timeval = std::mem::zeroed();
                libc::gettimeofday(&mut now, std::ptr::null_mut());
                check(libc::settimeofday(&now, std::ptr::null()) as i64)
            }
            "clock_settime" => {
                let mut now: libc::timespec = std::mem::zeroed();
                libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
                check(libc::clock_settime(libc::CLOCK_REALTIME, &now) as i64)
            }
            "swapon" => {
                let path = CString::new("/dev/null").unwrap();
                check(libc::syscall(libc::SYS_swapon, path.as_ptr(), 0))
            }
            "userfaultfd" => check(libc::syscall(libc::SYS_userfaultfd, 0)),
            "iopl" => check(libc::syscall(libc::SYS_iopl, 3)),
            "syslog" => {
                let mut buf = [0u8; 256];
                check(libc::syscall(
                    libc::SYS_syslog,
                    3,
                    buf.as_mut_ptr(),
                    buf.len(),
                ))
            }
            "personality" => check(libc::personality(0x0400000) as i64), // READ_IMPLIES_EXEC
            // A nested user namespace gives full capabilities inside it, but
            // none over the host: module loading must still fail.
            "userns_init_module" => {
                check(libc::unshare(libc::CLONE_NEWUSER) as i64)?;
                attack("init_module", None)
            }
            // mknod of a block device (e.g. the host's disk) and reading it.
            "mknod_block" => {
                let (major, minor) = arg
                    .and_then(|a| a.split_once(':'))
                    .map(|(a, b)| (a.parse().unwrap_or(8), b.parse().unwrap_or(0)))
                    .unwrap_or((8, 0));
                let path = CString::new("/tmp/ve-attack-blk").unwrap();
                libc::unlink(path.as_ptr());
                check(libc::mknod(
                    path.as_ptr(),
                    libc::S_IFBLK | 0o600,
                    libc::makedev(major, minor),
                ) as i64)?;
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                check(fd as i64)?;
                let mut buf = [0u8; 512];
                check(libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) as i64)
            }
            "kill" => check(libc::kill(arg_number(arg) as i32, 0) as i64),
            "ptrace" => check(libc::ptrace(
                libc::PTRACE_ATTACH,
                arg_number(arg) as i32,
                0,
                0,
            )),
            "write_file" => {
                // Write "0" into a file (e.g. /proc/sys/vm/drop_caches, /proc/sysrq-trigger).
                let path =
                    CString::new(arg.map(String::as_str).unwrap_or("/proc/sysrq-trigger")).unwrap();
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                check(fd as i64)?;
                check(libc::write(fd, b"0".as_ptr().cast(), 1) as i64)
            }
            "read_file" => {
                // Reading at least one byte counts as success.
                let path = CString::new(arg.map(String::as_str).unwrap_or("/proc/kcore")).unwrap();
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                check(fd as i64)?;
                let mut buf = [0u8; 16];
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                check(n as i64)?;
                if n == 0 {
                    Err(libc::ENODATA)
                } else {
                    Ok(())
                }
            }
            "remount_rw" => {
                let path = CString::new(arg.map(String::as_str).unwrap_or("/proc/sys")).unwrap();
                check(libc::mount(
                    std::ptr::null(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND,
                    std::ptr::null(),
                ) as i64)
            }
            "umount" => {
                let path = CString::new(arg.map(String::as_str).unwrap_or("/proc/kcore")).unwrap();
                check(libc::umount2(path.as_ptr(), libc::MNT_DETACH) as i64)
            }
            _ => {
                eprintln!("unknown attack {name:?}");
                std::process::exit(2)
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(name) = args.get(1) else {
        eprintln!("usage: ve-attack ATTACK [ARG]");
        std::process::exit(2)
    };
    match attack(name, args.get(2)) {
        Ok(()) => {
            println!("{name}: SUCCEEDED");
            std::process::exit(0)
        }
        Err(errno) => {
            println!(
                "{name}: refused errno={errno} ({})",
                std::io::Error::from_raw_os_error(errno)
            );
            std::process::exit(1)
        }
    }
}
