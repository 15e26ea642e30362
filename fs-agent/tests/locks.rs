//! fcntl byte-range locks hold across nodes (two mounts of the same filesystem).

mod common;

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::TestFs;

fn flock_struct(typ: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = typ as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = start;
    l.l_len = len;
    l
}

fn set_lock(file: &fs::File, typ: i32, start: i64, len: i64, wait: bool) -> Result<(), i32> {
    let l = flock_struct(typ, start, len);
    // SAFETY: a valid descriptor and a pointer to a live flock struct.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), if wait { libc::F_SETLKW } else { libc::F_SETLK }, &l) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn get_lock(file: &fs::File, typ: i32, start: i64, len: i64) -> i32 {
    let mut l = flock_struct(typ, start, len);
    // SAFETY: a valid descriptor and a pointer to a live flock struct, filled in by the kernel.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut l) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    l.l_type as i32
}

#[test]
fn fcntl_locks_hold_across_nodes() {
    let mut fs = TestFs::start("locks", 3);
    let node_a = fs.mount();
    let node_b = fs.mount();
    fs::write(node_a.join("f"), vec![0u8; 1000]).unwrap();

    let on_a = OpenOptions::new().read(true).write(true).open(node_a.join("f")).unwrap();
    let on_b = Arc::new(OpenOptions::new().read(true).open(node_b.join("f")).unwrap());
    set_lock(&on_a, libc::F_WRLCK, 0, 100, false).unwrap();

    // Node B sees node A's lock and cannot take an overlapping one.
    assert_eq!(set_lock(&on_b, libc::F_RDLCK, 50, 10, false), Err(libc::EAGAIN));
    assert_eq!(get_lock(&on_b, libc::F_RDLCK, 0, 10), libc::F_WRLCK);
    set_lock(&on_b, libc::F_RDLCK, 200, 10, false).unwrap();
    assert_eq!(get_lock(&on_b, libc::F_RDLCK, 150, 10), libc::F_UNLCK);

    // A waiting lock on node B is granted once node A's process closes the file.
    let waiter = {
        let on_b = on_b.clone();
        std::thread::spawn(move || set_lock(&on_b, libc::F_RDLCK, 0, 100, true))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(on_a);
    assert_eq!(waiter.join().unwrap(), Ok(()));
    let again = OpenOptions::new().read(true).write(true).open(node_a.join("f")).unwrap();
    assert_eq!(set_lock(&again, libc::F_WRLCK, 0, 10, false), Err(libc::EAGAIN), "node B's read lock now blocks writers on A");
    set_lock(&on_b, libc::F_UNLCK, 0, 0, false).unwrap();
    set_lock(&again, libc::F_WRLCK, 0, 10, false).unwrap();
}
