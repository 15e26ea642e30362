//! nftables transactions through libnftables, in-process.
//!
//! The `nft` binary costs ~3 ms per call (exec, loading its libraries);
//! the same transaction through libnftables takes ~0.3 ms, and an attach
//! runs one per VE start. The library is loaded at runtime (it ships with
//! the `nftables` package as libnftables.so.1), so building needs no
//! headers and a missing library is an error at use, not at link time.
//!
//! Every call creates its own context: a context opens its netlink socket
//! in the network namespace of the thread that creates it, and callers
//! (tests, several nodes in one process) use different namespaces. Calls
//! are serialized because libnftables does not promise thread safety.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use super::rtnetlink::{parse_ack, Message, RouteSocket};

const LIBRARY: &str = "libnftables.so.1";

/// A failed nftables transaction.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NftError {
    #[error("cannot load {LIBRARY}: {0} (install the nftables package)")]
    Load(String),
    #[error("nft script contains a NUL byte")]
    NulInScript,
    #[error("nftables refused the transaction: {0}")]
    Refused(String),
}

type CtxNew = unsafe extern "C" fn(flags: c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(ctx: *mut c_void);
type CtxBuffer = unsafe extern "C" fn(ctx: *mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(ctx: *mut c_void) -> *const c_char;
type RunFromBuffer = unsafe extern "C" fn(ctx: *mut c_void, buffer: *const c_char) -> c_int;

struct Library {
    // Keeps the symbols below valid.
    _library: libloading::Library,
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxBuffer,
    buffer_error: CtxBuffer,
    get_output: CtxGetBuffer,
    get_error: CtxGetBuffer,
    run_from_buffer: RunFromBuffer,
}

fn library() -> Result<&'static Library, NftError> {
    static LIBRARY_HANDLE: OnceLock<Result<Library, NftError>> = OnceLock::new();
    LIBRARY_HANDLE
        .get_or_init(|| {
            // SAFETY: libnftables' initializers have no preconditions.
            let library = unsafe { libloading::Library::new(LIBRARY) }
                .map_err(|error| NftError::Load(error.to_string()))?;
            let load = |name: &[u8]| -> Result<*const c_void, NftError> {
                // SAFETY: the symbol is used with the signature declared in
                // <nftables/libnftables.h>, see the types above.
                unsafe { library.get::<*const c_void>(name) }
                    .map(|symbol| *symbol)
                    .map_err(|error| NftError::Load(error.to_string()))
            };
            // SAFETY: each pointer is the named libnftables function, whose C
            // signature matches the Rust type it is transmuted to; `library`
            // is stored alongside and never unloaded.
            unsafe {
                Ok(Library {
                    ctx_new: std::mem::transmute::<*const c_void, CtxNew>(load(b"nft_ctx_new\0")?),
                    ctx_free: std::mem::transmute::<*const c_void, CtxFree>(load(
                        b"nft_ctx_free\0",
                    )?),
                    buffer_output: std::mem::transmute::<*const c_void, CtxBuffer>(load(
                        b"nft_ctx_buffer_output\0",
                    )?),
                    buffer_error: std::mem::transmute::<*const c_void, CtxBuffer>(load(
                        b"nft_ctx_buffer_error\0",
                    )?),
                    get_output: std::mem::transmute::<*const c_void, CtxGetBuffer>(load(
                        b"nft_ctx_get_output_buffer\0",
                    )?),
                    get_error: std::mem::transmute::<*const c_void, CtxGetBuffer>(load(
                        b"nft_ctx_get_error_buffer\0",
                    )?),
                    run_from_buffer: std::mem::transmute::<*const c_void, RunFromBuffer>(load(
                        b"nft_run_cmd_from_buffer\0",
                    )?),
                    _library: library,
                })
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs an nft script (what `nft -f -` reads) as one transaction in the
/// calling thread's network namespace; returns what it printed.
pub fn run(script: &str) -> Result<String, NftError> {
    static SERIALIZE: Mutex<()> = Mutex::new(());
    let library = library()?;
    let script = CString::new(script).map_err(|_| NftError::NulInScript)?;
    let _serialized = SERIALIZE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tracing::trace!(script = ?script, "nft transaction");
    // SAFETY: the functions come from libnftables with matching signatures;
    // ctx is checked for NULL, used only here and freed exactly once; the
    // buffers it returns are copied before the ctx is freed.
    unsafe {
        let ctx = (library.ctx_new)(0);
        if ctx.is_null() {
            return Err(NftError::Refused(
                "cannot create an nftables context".into(),
            ));
        }
        (library.buffer_output)(ctx);
        (library.buffer_error)(ctx);
        let status = (library.run_from_buffer)(ctx, script.as_ptr());
        let text = |pointer: *const c_char| {
            if pointer.is_null() {
                String::new()
            } else {
                CStr::from_ptr(pointer).to_string_lossy().into_owned()
            }
        };
        let output = text((library.get_output)(ctx));
        let errors = text((library.get_error)(ctx));
        (library.ctx_free)(ctx);
        if status == 0 {
            Ok(output)
        } else {
            Err(NftError::Refused(first_error(&errors)))
        }
    }
}

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE` and `NFT_MSG_NEWTABLE`
/// (linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h).
const NFT_MSG_GETTABLE: u16 = 10 << 8 | 1;
const NFT_MSG_NEWTABLE: u16 = 10 << 8;
const NFTA_TABLE_NAME: u16 = 1;
pub const NFPROTO_BRIDGE: u8 = 7;

/// Whether table `name` of `family` exists in the calling thread's netns.
///
/// Asked with one netlink request, not through libnftables: any command
/// there (even `list table`) first fills its cache with every chain, set
/// and set element of the table, which takes hundreds of milliseconds on a
/// node running a thousand VEs.
pub fn table_exists(family: u8, name: &str) -> std::io::Result<bool> {
    let socket = RouteSocket::open_protocol(libc::NETLINK_NETFILTER)?;
    let answer = socket.query(
        Message::new(NFT_MSG_GETTABLE, 0)
            .nfgenmsg(family)
            .attr_str(NFTA_TABLE_NAME, name),
    )?;
    match parse_ack(&answer) {
        Some(libc::ENOENT) => Ok(false),
        Some(0) => Ok(true),
        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
        None if answer.get(4..6) == Some(&NFT_MSG_NEWTABLE.to_ne_bytes()[..]) => Ok(true),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unexpected answer to NFT_MSG_GETTABLE",
        )),
    }
}

/// libnftables reports "<file>:<line>:<cols>: Error: <what>" followed by the
/// offending line and a caret line; keep the message and the statement.
pub fn first_error(errors: &str) -> String {
    let mut lines = errors.lines();
    let Some(first) = lines.next() else {
        return "unknown error".into();
    };
    let message = first
        .split_once("Error: ")
        .map_or(first, |(_, message)| message);
    match lines.next().map(str::trim) {
        Some(statement) if !statement.is_empty() => format!("{message} (in `{statement}`)"),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_condensed_to_message_and_statement() {
        let errors = "/dev/stdin:1:18-20: Error: No such file or directory\nadd chain bridge br9 ve_vz1\n                 ^^^\n";
        assert_eq!(
            first_error(errors),
            "No such file or directory (in `add chain bridge br9 ve_vz1`)"
        );
        assert_eq!(first_error(""), "unknown error");
        assert_eq!(first_error("Error: out of memory"), "out of memory");
    }
}
