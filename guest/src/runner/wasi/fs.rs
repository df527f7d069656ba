//! `wasi:filesystem`: granted directories opened beneath their roots,
//! every open and change audited, writes into read-write grants held to
//! the call's write budget.

use super::CallState;
use crate::audit::{AuditLog, Decision};
use std::sync::Arc;
use wasmtime::component::Linker;

/// The WASI version whose `wasi:filesystem/types` `open-at` Airlock wraps for auditing.
pub(crate) const WASI_FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";
/// The WASI version whose `wasi:filesystem/preopens` Airlock wraps for auditing.
pub(crate) const WASI_FILESYSTEM_PREOPENS: &str = "wasi:filesystem/preopens@0.2.12";
/// What a call may still write into its read-write grants
/// (`limits.max_write_bytes`), shared by every stream and write of the call.
#[derive(Clone)]
pub(crate) struct WriteBudget {
    pub(crate) left: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) hit: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) limit: u64,
    pub(crate) audit: AuditLog,
}

impl WriteBudget {
    pub(crate) fn new(limit: u64, audit: AuditLog) -> Self {
        Self {
            left: Arc::new(limit.into()),
            hit: Arc::default(),
            limit,
            audit,
        }
    }

    /// Take `n` bytes from the budget; past it, nothing is taken, the
    /// first time is audited, and the write must fail.
    pub(crate) fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let ok = self
            .left
            .fetch_update(SeqCst, SeqCst, |l| l.checked_sub(n))
            .is_ok();
        if !ok && !self.hit.swap(true, SeqCst) {
            self.audit.record(
                "limit.disk",
                format!("{} bytes", self.limit),
                Decision::Deny,
                "the call wrote more into its writable grants than allowed",
            );
        }
        ok
    }

    /// Give back `n` bytes taken for something that did not happen.
    pub(crate) fn give(&self, n: u64) {
        self.left.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn hit(&self) -> bool {
        self.hit.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn refused(&self) -> wasmtime_wasi::p2::StreamError {
        wasmtime_wasi::p2::StreamError::LastOperationFailed(wasmtime::format_err!(
            "the call's write limit of {} bytes is reached",
            self.limit
        ))
    }
}

/// A file's output stream that draws on the call's [`WriteBudget`].
pub(crate) struct Budgeted {
    pub(crate) inner: wasmtime_wasi::p2::DynOutputStream,
    pub(crate) budget: WriteBudget,
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Budgeted {
    async fn ready(&mut self) {
        self.inner.ready().await;
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::OutputStream for Budgeted {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        if !self.budget.take(bytes.len() as u64) {
            return Err(self.budget.refused());
        }
        self.inner.write(bytes)
    }

    fn write_zeroes(&mut self, n: usize) -> wasmtime_wasi::p2::StreamResult<()> {
        if !self.budget.take(n as u64) {
            return Err(self.budget.refused());
        }
        self.inner.write_zeroes(n)
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        self.inner.check_write()
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}

/// Charge the call's write budget [`airlock_abi::ENTRY_WRITE_BYTES`] for
/// an entry about to be made through the directory `fd`, when `fd` may
/// change its directory (a read-write grant) and `path` names nothing yet
/// (`None` for operations that only ever make a new entry). `Ok(true)`:
/// charged (give it back if the entry is not made); `Ok(false)`: nothing
/// to charge; `Err`: the budget is spent — the operation must fail with
/// `insufficient-space`. The same charge as the VMM's file server makes,
/// so both walls stop a call at the same entry.
async fn charge_entry(
    state: &mut CallState,
    fd: u32,
    path: Option<(
        wasmtime_wasi::p2::bindings::filesystem::types::PathFlags,
        &str,
    )>,
) -> wasmtime::Result<Result<bool, ()>> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::filesystem::types::{DescriptorFlags, HostDescriptor as _};
    let mut view = state.filesystem();
    let flags = view.get_flags(Resource::<Descriptor>::new_borrow(fd)).await;
    if !matches!(flags, Ok(f) if f.contains(DescriptorFlags::MUTATE_DIRECTORY)) {
        return Ok(Ok(false));
    }
    if let Some((path_flags, path)) = path {
        let there = view
            .stat_at(Resource::new_borrow(fd), path_flags, path.to_string())
            .await;
        if there.is_ok() {
            return Ok(Ok(false));
        }
    }
    Ok(if state.writes.take(airlock_abi::ENTRY_WRITE_BYTES) {
        Ok(true)
    } else {
        Err(())
    })
}

/// Wrap `descriptor.open-at` so every file open is an audit event: denials
/// (outside the preopen, writing a read-only grant) as `deny`, the rest as
/// `allow` with their outcome.
pub(crate) fn add_audited_open_at(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::filesystem::preopens::Host as _;
    use wasmtime_wasi::p2::bindings::filesystem::types::{
        self as fs, DescriptorFlags, Host as _, HostDescriptor as _, OpenFlags, PathFlags,
    };
    linker.instance(WASI_FILESYSTEM_PREOPENS)?.func_wrap(
        "get-directories",
        |mut store, (): ()| {
            let state: &mut CallState = store.data_mut();
            let audit = state.audit.clone();
            let dirs = state.filesystem().get_directories()?;
            let names: Vec<&str> = dirs.iter().map(|(_, n)| n.as_str()).collect();
            audit.record(
                "fs.preopens",
                if names.is_empty() {
                    "(none)".to_string()
                } else {
                    names.join(",")
                },
                Decision::Allow,
                "only granted directories are visible; any other path cannot even be named",
            );
            Ok((dirs,))
        },
    )?;
    type Args = (
        Resource<Descriptor>,
        PathFlags,
        String,
        OpenFlags,
        DescriptorFlags,
    );
    linker.instance(WASI_FILESYSTEM_TYPES)?.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store, (fd, path_flags, path, open_flags, flags): Args| {
            Box::new(async move {
                let state: &mut CallState = store.data_mut();
                let audit = state.audit.clone();
                let writes = flags
                    .intersects(DescriptorFlags::WRITE | DescriptorFlags::MUTATE_DIRECTORY)
                    || open_flags.intersects(OpenFlags::CREATE | OpenFlags::TRUNCATE);
                let target = format!("{path} ({})", if writes { "write" } else { "read" });
                let charged = if open_flags.contains(OpenFlags::CREATE) {
                    match charge_entry(state, fd.rep(), Some((path_flags, &path))).await? {
                        Ok(c) => c,
                        Err(()) => {
                            let code = fs::ErrorCode::InsufficientSpace;
                            record_fs(&audit, "fs.open", target, Err(&code)).await;
                            return Ok((Err(code),));
                        }
                    }
                } else {
                    false
                };
                let mut view = state.filesystem();
                let opened = view.open_at(fd, path_flags, path, open_flags, flags).await;
                if charged && opened.is_err() {
                    state.writes.give(airlock_abi::ENTRY_WRITE_BYTES);
                }
                let mut view = state.filesystem();
                match opened {
                    Ok(new_fd) => {
                        record_fs(&audit, "fs.open", target, Ok("inside a granted directory"))
                            .await;
                        Ok((Ok(new_fd),))
                    }
                    Err(e) => {
                        let code: fs::ErrorCode = view.convert_error_code(e)?;
                        record_fs(&audit, "fs.open", target, Err(&code)).await;
                        Ok((Err(code),))
                    }
                }
            })
        },
    )
}

/// Record how a filesystem operation ended (`fs.open`, `fs.change`): the
/// sandbox's refusals (not permitted, access, read-only) as `deny`, paused
/// past the free denials; success and other failures as `allow`.
pub(crate) async fn record_fs(
    audit: &AuditLog,
    action: &str,
    target: String,
    r: Result<&str, &wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode>,
) {
    use wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode;
    let (decision, reason) = match r {
        Ok(why) => (Decision::Allow, why.to_string()),
        Err(code @ (ErrorCode::NotPermitted | ErrorCode::Access | ErrorCode::ReadOnly)) => (
            Decision::Deny,
            format!("refused by the sandbox ({code:?}): outside the grant or not writable"),
        ),
        Err(other) => (Decision::Allow, format!("permitted, but failed: {other:?}")),
    };
    audit.record(action, target, decision, reason);
    if decision == Decision::Deny {
        tokio::time::sleep(audit.denial_pause()).await;
    }
}

/// Wrap every `descriptor` method that changes the filesystem (mkdir,
/// rmdir, unlink, rename, link, symlink, set-times, set-size) so each is an
/// `fs.change` audit event, refused ones included: before, only opens left
/// a trace.
pub(crate) fn add_audited_changes(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::filesystem::types::{
        ErrorCode, Filesize, Host as _, HostDescriptor as _, NewTimestamp, PathFlags,
    };
    type D = Resource<Descriptor>;
    /// One wrapper: `$args` as the component passes them, `$target` the
    /// event's target, `$call` the wasmtime-wasi method it wraps.
    /// `$makes`: the directory descriptor through which it makes a new
    /// entry (charged to the write budget, see [`charge_entry`]), if any.
    macro_rules! wrap {
        ($name:literal, ($($a:ident : $t:ty),*), $target:expr, $makes:expr, |$view:ident| $call:expr) => {
            linker.instance(WASI_FILESYSTEM_TYPES)?.func_wrap_async(
                concat!("[method]descriptor.", $name),
                |mut store, ($($a,)*): ($($t,)*)| {
                    Box::new(async move {
                        let state: &mut CallState = store.data_mut();
                        let audit = state.audit.clone();
                        let target: String = $target;
                        let makes: Option<&D> = $makes;
                        let charged = match makes {
                            Some(dir) => charge_entry(state, dir.rep(), None).await?,
                            None => Ok(false),
                        };
                        let r = match charged {
                            Err(()) => Err(ErrorCode::InsufficientSpace),
                            Ok(charged) => {
                                let mut $view = state.filesystem();
                                let r = match $call.await {
                                    Ok(()) => Ok(()),
                                    Err(e) => Err($view.convert_error_code(e)?),
                                };
                                if charged && r.is_err() {
                                    state.writes.give(airlock_abi::ENTRY_WRITE_BYTES);
                                }
                                r
                            }
                        };
                        let how = r.as_ref().map(|()| "inside a granted, writable directory");
                        record_fs(&audit, "fs.change", target, how).await;
                        Ok((r,))
                    })
                },
            )?;
        };
    }
    wrap!("create-directory-at", (fd: D, path: String),
        format!("mkdir {path}"), Some(&fd), |v| v.create_directory_at(fd, path));
    wrap!("remove-directory-at", (fd: D, path: String),
        format!("rmdir {path}"), None, |v| v.remove_directory_at(fd, path));
    wrap!("unlink-file-at", (fd: D, path: String),
        format!("unlink {path}"), None, |v| v.unlink_file_at(fd, path));
    wrap!("symlink-at", (fd: D, src: String, dest: String),
        format!("symlink {dest} -> {src}"), Some(&fd), |v| v.symlink_at(fd, src, dest));
    wrap!("rename-at", (fd: D, old: String, new_fd: D, new: String),
        format!("rename {old} -> {new}"), None, |v| v.rename_at(fd, old, new_fd, new));
    wrap!("link-at", (fd: D, flags: PathFlags, old: String, new_fd: D, new: String),
        format!("link {new} -> {old}"), Some(&new_fd), |v| v.link_at(fd, flags, old, new_fd, new));
    wrap!("set-times-at", (fd: D, flags: PathFlags, path: String, a: NewTimestamp, m: NewTimestamp),
        format!("set-times {path}"), None, |v| v.set_times_at(fd, flags, path, a, m));
    wrap!("set-times", (fd: D, a: NewTimestamp, m: NewTimestamp),
        "set-times (open file)".to_string(), None, |v| v.set_times(fd, a, m));
    wrap!("set-size", (fd: D, size: Filesize),
        format!("set-size (open file) {size}"), None, |v| v.set_size(fd, size));
    Ok(())
}

/// Hold every write into a read-write grant to the call's
/// [`WriteBudget`]: `descriptor.write` checks it, and the streams of
/// `write-via-stream`/`append-via-stream` are wrapped so each write draws
/// on it. A write past the budget fails (audited once as `limit.disk`) and
/// the call ends as `write_limit`.
pub(crate) fn add_budgeted_writes(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::DynOutputStream;
    use wasmtime_wasi::p2::bindings::filesystem::types::{
        ErrorCode, Filesize, Host as _, HostDescriptor as _,
    };
    type Stream = Result<Resource<DynOutputStream>, ErrorCode>;
    /// Swap the stream wasmtime-wasi made for one that draws on the budget.
    fn budgeted(
        state: &mut CallState,
        made: Result<Resource<DynOutputStream>, wasmtime_wasi::p2::FsError>,
    ) -> wasmtime::Result<(Stream,)> {
        let stream = match made {
            Ok(s) => s,
            Err(e) => return Ok((Err(state.filesystem().convert_error_code(e)?),)),
        };
        let inner: DynOutputStream = state.table.delete(stream)?;
        let wrapped: DynOutputStream = Box::new(Budgeted {
            inner,
            budget: state.writes.clone(),
        });
        Ok((Ok(state.table.push(wrapped)?),))
    }
    let mut types = linker.instance(WASI_FILESYSTEM_TYPES)?;
    types.func_wrap(
        "[method]descriptor.write-via-stream",
        |mut store, (fd, offset): (Resource<Descriptor>, Filesize)| {
            let state: &mut CallState = store.data_mut();
            let made = state.filesystem().write_via_stream(fd, offset);
            budgeted(state, made)
        },
    )?;
    types.func_wrap(
        "[method]descriptor.append-via-stream",
        |mut store, (fd,): (Resource<Descriptor>,)| {
            let state: &mut CallState = store.data_mut();
            let made = state.filesystem().append_via_stream(fd);
            budgeted(state, made)
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.write",
        |mut store, (fd, buf, offset): (Resource<Descriptor>, Vec<u8>, Filesize)| {
            Box::new(async move {
                let state: &mut CallState = store.data_mut();
                if !state.writes.take(buf.len() as u64) {
                    return Ok((Err::<Filesize, _>(ErrorCode::InsufficientSpace),));
                }
                let mut view = state.filesystem();
                Ok((match view.write(fd, buf, offset).await {
                    Ok(n) => Ok(n),
                    Err(e) => Err(view.convert_error_code(e)?),
                },))
            })
        },
    )?;
    Ok(())
}
