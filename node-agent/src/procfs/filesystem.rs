//! The FUSE filesystem: `/<ve-id>/<file>` for every VE cgroup, read-only.
//!
//! Thin by design: it maps inodes to (VE, file), and hands rendering to
//! [`ProcViews`]. Files report size 0 and are opened with direct_io, so reads
//! go to the daemon whatever the size and `cat` reads the whole content (as
//! lxcfs does). The content is rendered on a read at offset 0 and kept per
//! open file for the following reads, so one `read` loop sees one consistent
//! snapshot and tools that re-read from offset 0 (top) get fresh data.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};

use super::sources::SourceError;
use super::views::{ProcViews, ViewFile};

/// Inodes per VE: its directory plus one per file, with room for more files.
const INODES_PER_VE: u64 = 16;
const FIRST_VE_INODE: u64 = 2;
const _: () = assert!(ViewFile::ALL.len() < INODES_PER_VE as usize);
/// Zero TTL: a removed VE disappears at once. Lookups only happen when a bind
/// mount is set up, so the cost is negligible.
const NO_CACHE: Duration = Duration::ZERO;

/// What an inode stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Root,
    VeDir(String),
    VeFile(String, ViewFile),
}

/// The size every view file reports: more than any rendered view.
const VIEW_FILE_SIZE: u64 = 1 << 20;

/// Stable inode numbers for VE ids: slot k owns inodes 2+16k .. 2+16k+15.
/// Slots are never reused, so a stale inode can never show another VE's data.
#[derive(Default)]
struct InodeTable {
    slot_of: HashMap<String, u64>,
    ve_of_slot: Vec<String>,
}

impl InodeTable {
    fn dir_inode(&mut self, ve_id: &str) -> u64 {
        let slot = match self.slot_of.get(ve_id) {
            Some(slot) => *slot,
            None => {
                let slot = self.ve_of_slot.len() as u64;
                self.ve_of_slot.push(ve_id.to_string());
                self.slot_of.insert(ve_id.to_string(), slot);
                slot
            }
        };
        FIRST_VE_INODE + slot * INODES_PER_VE
    }

    fn node(&self, inode: u64) -> Option<Node> {
        if inode == INodeNo::ROOT.0 {
            return Some(Node::Root);
        }
        let relative = inode.checked_sub(FIRST_VE_INODE)?;
        let ve_id = self
            .ve_of_slot
            .get((relative / INODES_PER_VE) as usize)?
            .clone();
        match relative % INODES_PER_VE {
            0 => Some(Node::VeDir(ve_id)),
            offset => ViewFile::ALL
                .get(offset as usize - 1)
                .map(|file| Node::VeFile(ve_id, *file)),
        }
    }
}

fn attr(inode: u64, kind: FileType) -> FileAttr {
    FileAttr {
        ino: INodeNo(inode),
        // sendfile/splice (busybox cat) reads through the page cache up to
        // i_size, so a size of 0 would read nothing; the kernel trims i_size
        // to the real end at the daemon's short read.
        size: if kind == FileType::RegularFile { VIEW_FILE_SIZE } else { 0 },
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: if kind == FileType::Directory {
            0o555
        } else {
            0o444
        },
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

fn errno_for(error: &SourceError) -> Errno {
    match error {
        SourceError::VeGone { .. } | SourceError::InvalidVeId { .. } => Errno::ENOENT,
        _ => Errno::EIO,
    }
}

/// The `ve-procfs` filesystem.
pub struct ProcViewFs {
    views: ProcViews,
    inodes: RwLock<InodeTable>,
    /// Rendered content per open file handle.
    open_files: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    next_handle: AtomicU64,
    /// Set once the session exists; see [`ProcViewFs::restore_size`].
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

impl ProcViewFs {
    pub fn new(views: ProcViews) -> Self {
        ProcViewFs {
            views,
            inodes: RwLock::new(InodeTable::default()),
            open_files: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            notifier: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Where the daemon hands over the session's notifier once mounted.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// A short read trims the kernel's i_size of a view to that read's
    /// end, and a file bound over /proc/<file> is never looked up again to
    /// refresh it, so the next sendfile (busybox cat) would stop at the old
    /// length. Storing one byte at the end of the advertised size grows
    /// i_size back before the opener gets its handle.
    fn restore_size(&self, inode: INodeNo) {
        if let Some(notifier) = self.notifier.get() {
            if let Err(error) = notifier.store(inode, VIEW_FILE_SIZE - 1, b"\n") {
                tracing::debug!(%error, "cannot restore the size of a view");
            }
        }
    }

    fn dir_inode(&self, ve_id: &str) -> u64 {
        self.inodes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .dir_inode(ve_id)
    }

    fn node(&self, inode: INodeNo) -> Option<Node> {
        self.inodes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .node(inode.0)
    }

    /// The node, if it still exists: a VE's inodes vanish with its cgroup.
    fn live_node(&self, inode: INodeNo) -> Result<Node, Errno> {
        let node = self.node(inode).ok_or(Errno::ENOENT)?;
        match &node {
            Node::VeDir(ve_id) | Node::VeFile(ve_id, _) if !self.views.cgroups().exists(ve_id) => {
                self.views.forget(ve_id);
                Err(Errno::ENOENT)
            }
            _ => Ok(node),
        }
    }

    fn render(&self, ve_id: &str, file: ViewFile) -> Result<Arc<Vec<u8>>, Errno> {
        match self.views.render(ve_id, file) {
            Ok(content) => Ok(Arc::new(content.into_bytes())),
            Err(error) => {
                if matches!(error, SourceError::VeGone { .. }) {
                    tracing::debug!(
                        ve_id,
                        file = file.file_name(),
                        "VE vanished while reading its view"
                    );
                } else {
                    tracing::warn!(ve_id, file = file.file_name(), %error, "cannot render view");
                }
                Err(errno_for(&error))
            }
        }
    }

    fn locked_open_files(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Vec<u8>>>> {
        self.open_files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Filesystem for ProcViewFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            reply.error(Errno::ENOENT);
            return;
        };
        match self.live_node(parent) {
            Ok(Node::Root) if self.views.cgroups().exists(name) => {
                reply.entry(
                    &NO_CACHE,
                    &attr(self.dir_inode(name), FileType::Directory),
                    Generation(0),
                );
            }
            Ok(Node::VeDir(ve_id)) => match ViewFile::from_file_name(name) {
                Some(file) => {
                    let inode = self.dir_inode(&ve_id) + 1 + file.index() as u64;
                    reply.entry(
                        &NO_CACHE,
                        &attr(inode, FileType::RegularFile),
                        Generation(0),
                    );
                }
                None => reply.error(Errno::ENOENT),
            },
            Ok(Node::VeFile(..)) => reply.error(Errno::ENOTDIR),
            Ok(Node::Root) => reply.error(Errno::ENOENT),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.live_node(ino) {
            Ok(Node::Root) | Ok(Node::VeDir(_)) => {
                reply.attr(&NO_CACHE, &attr(ino.0, FileType::Directory))
            }
            Ok(Node::VeFile(..)) => reply.attr(&NO_CACHE, &attr(ino.0, FileType::RegularFile)),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY) {
            reply.error(Errno::EACCES);
            return;
        }
        match self.live_node(ino) {
            Ok(Node::VeFile(..)) => {
                self.restore_size(ino);
                let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
                reply.opened(FileHandle(handle), FopenFlags::FOPEN_DIRECT_IO);
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(Node::VeFile(ve_id, file)) = self.node(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let cached = if offset == 0 {
            None
        } else {
            self.locked_open_files().get(&fh.0).cloned()
        };
        let content = match cached {
            Some(content) => content,
            None => match self.render(&ve_id, file) {
                Ok(content) => {
                    self.locked_open_files().insert(fh.0, content.clone());
                    content
                }
                Err(errno) => {
                    reply.error(errno);
                    return;
                }
            },
        };
        let start = (offset as usize).min(content.len());
        let end = start.saturating_add(size as usize).min(content.len());
        reply.data(&content[start..end]);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.locked_open_files().remove(&fh.0);
        reply.ok();
    }

    /// Nothing is buffered: close has nothing to flush.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.live_node(ino) {
            Ok(Node::Root) | Ok(Node::VeDir(_)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(Node::VeFile(..)) => reply.error(Errno::ENOTDIR),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino.0, FileType::Directory, ".".to_string()),
            (INodeNo::ROOT.0, FileType::Directory, "..".to_string()),
        ];
        match self.live_node(ino) {
            Ok(Node::Root) => {
                for ve_id in self.views.cgroups().list() {
                    entries.push((self.dir_inode(&ve_id), FileType::Directory, ve_id));
                }
            }
            Ok(Node::VeDir(ve_id)) => {
                let dir = self.dir_inode(&ve_id);
                for file in ViewFile::ALL {
                    entries.push((
                        dir + 1 + file.index() as u64,
                        FileType::RegularFile,
                        file.file_name().to_string(),
                    ));
                }
            }
            Ok(Node::VeFile(..)) => {
                reply.error(Errno::ENOTDIR);
                return;
            }
            Err(errno) => {
                reply.error(errno);
                return;
            }
        }
        for (index, (inode, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(inode), (index + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_table_is_stable_and_never_reuses_slots() {
        let mut table = InodeTable::default();
        let web1 = table.dir_inode("web1");
        let web2 = table.dir_inode("web2");
        assert_eq!(web1, 2);
        assert_eq!(web2, 18);
        assert_eq!(table.dir_inode("web1"), web1);
        assert_eq!(table.node(1), Some(Node::Root));
        assert_eq!(table.node(web2), Some(Node::VeDir("web2".into())));
        assert_eq!(
            table.node(web2 + 1),
            Some(Node::VeFile("web2".into(), ViewFile::Meminfo))
        );
        assert_eq!(
            table.node(web2 + 7),
            Some(Node::VeFile("web2".into(), ViewFile::Diskstats))
        );
        assert_eq!(
            table.node(web2 + 8),
            Some(Node::VeFile("web2".into(), ViewFile::CpuOnline))
        );
        assert_eq!(table.node(web2 + 9), None, "unused inode of a slot");
        assert_eq!(table.node(0), None);
        assert_eq!(table.node(34), None, "no third VE yet");
    }
}
