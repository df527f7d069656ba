//! `wasi:sockets`: the socket constructors replaced by an audited
//! refusal; no host socket is ever made for a tool.

use super::CallState;
use crate::audit::Decision;
use std::time::Duration;
use wasmtime::component::Linker;

/// The WASI versions whose socket constructors Airlock replaces with an
/// audited refusal.
pub(crate) const WASI_TCP_CREATE: &str = "wasi:sockets/tcp-create-socket@0.2.12";
pub(crate) const WASI_UDP_CREATE: &str = "wasi:sockets/udp-create-socket@0.2.12";

/// Replace `create-tcp-socket` and `create-udp-socket` with a refusal that
/// is audited (`socket.create deny`) and, past the free denials, paused.
/// No host socket is ever made for a tool: a flood of creations cost the
/// server its file descriptors before. The same refusal in both walls (in
/// the microVM the guest kernel has no network stack at all).
pub(crate) fn add_refused_sockets(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddressFamily};
    use wasmtime_wasi::p2::{TcpSocket, UdpSocket};
    fn refuse(state: &CallState, kind: &str, family: IpAddressFamily) -> Duration {
        let family = match family {
            IpAddressFamily::Ipv4 => "ipv4",
            IpAddressFamily::Ipv6 => "ipv6",
        };
        state.audit.record(
            "socket.create",
            format!("{kind} {family}"),
            Decision::Deny,
            "raw sockets are never granted; use outgoing HTTP",
        );
        state.audit.denial_pause()
    }
    linker.instance(WASI_TCP_CREATE)?.func_wrap_async(
        "create-tcp-socket",
        |store, (family,): (IpAddressFamily,)| {
            let pause = refuse(store.data(), "tcp", family);
            Box::new(async move {
                tokio::time::sleep(pause).await;
                Ok((Err::<Resource<TcpSocket>, _>(ErrorCode::AccessDenied),))
            })
        },
    )?;
    linker.instance(WASI_UDP_CREATE)?.func_wrap_async(
        "create-udp-socket",
        |store, (family,): (IpAddressFamily,)| {
            let pause = refuse(store.data(), "udp", family);
            Box::new(async move {
                tokio::time::sleep(pause).await;
                Ok((Err::<Resource<UdpSocket>, _>(ErrorCode::AccessDenied),))
            })
        },
    )?;
    Ok(())
}
