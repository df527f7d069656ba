//! `wasi:cli/environment`: only granted keys, every read audited.

use super::CallState;
use crate::audit::Decision;
use wasmtime::component::Linker;

/// The WASI version whose `wasi:cli/environment` Airlock wraps for auditing.
pub(crate) const WASI_CLI_ENVIRONMENT: &str = "wasi:cli/environment@0.2.12";

/// Wrap `get-environment` so every read of the environment is audited
/// (the environment itself holds only the granted keys).
pub(crate) fn add_audited_environment(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    linker.instance(WASI_CLI_ENVIRONMENT).and_then(|mut i| {
        i.func_wrap("get-environment", |mut store, (): ()| {
            let state: &mut CallState = store.data_mut();
            let keys: Vec<&str> = state.env.iter().map(|(k, _)| k.as_str()).collect();
            let target = if keys.is_empty() {
                "(none)".to_string()
            } else {
                keys.join(",")
            };
            state.audit.record(
                "env.read",
                target,
                Decision::Allow,
                "the component read its environment; only granted keys are present",
            );
            Ok((state.env.clone(),))
        })
    })?;
    Ok(())
}
