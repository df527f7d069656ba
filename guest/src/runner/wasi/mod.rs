//! A call's WASI world: the store state, the context built from the grant
//! set (preopens beneath their roots, env, captured output) and the host
//! resources a call may hold. By capability: [`fs`], [`env`], [`http`],
//! [`sockets`], [`nn`] (models).

pub(crate) mod env;
pub(crate) mod fs;
pub(crate) mod http;
pub(crate) mod nn;
pub(crate) mod sockets;

pub(crate) use fs::WriteBudget;
pub(crate) use http::EgressHooks;

use super::MemoryLimiter;
use crate::audit::{AuditLog, Decision};
use crate::grants::GrantSet;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Host memory a call's resources may take is held to its memory limit
/// too: each wasi-http `fields` may hold at most this many bytes, and the
/// call's resource table at most `memory limit / this` entries (64 to
/// 16,384), so fields alone can never cost the host more than the limit.
pub(crate) const HOST_FIELDS_BYTES: usize = 32 << 10;

/// Resource-table entries a call with `memory_bytes` of memory may hold.
pub(crate) fn host_table_entries(memory_bytes: u64) -> usize {
    (memory_bytes / HOST_FIELDS_BYTES as u64).clamp(64, 16_384) as usize
}

/// Everything a call's store holds.
pub(crate) struct CallState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) hooks: EgressHooks,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) audit: AuditLog,
    pub(crate) writes: WriteBudget,
    pub(crate) nn: nn::NnState,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

pub(crate) fn build_wasi(
    grants: &GrantSet,
    audit: &AuditLog,
    stdout: &MemoryOutputPipe,
    stderr: &MemoryOutputPipe,
) -> Result<WasiCtx, String> {
    let mut b = WasiCtxBuilder::new();
    b.stdout(stdout.clone()).stderr(stderr.clone());
    for (k, v) in &grants.env {
        b.env(k, v);
    }
    for d in &grants.dirs {
        let perms = if d.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        let mode = if d.writable { "rw" } else { "ro" };
        let dir = d.open()?;
        // wasmtime-wasi takes a path, not a descriptor: hand it the one we
        // opened through /proc, which names this very directory whatever
        // happens to its path from now on.
        let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        b.preopened_dir(&by_fd, &d.guest_path, perms).map_err(|e| {
            format!(
                "directory {} (granted as {}) cannot be opened: {e:#}",
                d.named().display(),
                d.guest_path
            )
        })?;
        drop(dir);
        audit.record(
            "fs.preopen",
            format!("{} ({mode})", d.guest_path),
            Decision::Allow,
            format!(
                "granted by policy from host directory {}",
                d.named().display()
            ),
        );
    }
    // Sockets: off. Creating one is refused and audited by the wrapped
    // constructors (`add_refused_sockets`); the address check below stays
    // as a second wall.
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    let sock_audit = audit.clone();
    b.socket_addr_check(move |addr, usage| {
        sock_audit.record(
            "socket.connect",
            format!("{usage:?} {addr}"),
            Decision::Deny,
            "raw sockets are never granted; use outgoing HTTP",
        );
        let pause = sock_audit.denial_pause();
        Box::pin(async move {
            tokio::time::sleep(pause).await;
            false
        })
    });
    Ok(b.build())
}
