//! What a call returns: its result or a structured [`CallError`] with a
//! kind, its metering and audit trail, and how a wasmtime error or an
//! over-limit result becomes one.

use super::MemoryLimiter;
use crate::audit::{AuditEvent, AuditLog, Decision};
use airlock_wasm_tools::value::val_to_json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmtime::Trap;
use wasmtime::component::Val;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// Why a call did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CallError {
    /// No tool of that name.
    #[error("The component has no tool named {tool:?}.")]
    UnknownTool {
        /// The requested name.
        tool: String,
        /// The names that exist.
        available: Vec<String>,
    },
    /// The JSON arguments do not fit the tool's parameters.
    #[error("Bad arguments: {path}: {message}.")]
    BadArguments {
        /// Path of the bad field, e.g. `args.filter.limit`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The component trapped (panic, unreachable, exit with an error code...).
    #[error("The tool trapped: {message}.")]
    Trap {
        /// wasmtime's description of the trap.
        message: String,
    },
    /// The wall-clock limit passed.
    #[error("The tool did not finish within {limit_ms} ms.")]
    Timeout {
        /// The limit.
        limit_ms: u64,
    },
    /// Linear memory would have grown past the limit.
    #[error("The tool tried to use more than {limit_bytes} bytes of memory.")]
    OutOfMemory {
        /// The limit.
        limit_bytes: u64,
    },
    /// The fuel (CPU budget) ran out.
    #[error("The tool used up its CPU budget of {fuel} fuel.")]
    CpuLimit {
        /// The budget.
        fuel: u64,
    },
    /// The tool wrote more than the output cap.
    #[error("The tool wrote more than {limit_bytes} bytes to {stream}.")]
    OutputLimit {
        /// `stdout` or `stderr`.
        stream: String,
        /// The cap.
        limit_bytes: u64,
    },
    /// The tool wrote more into its read-write grants than the cap.
    #[error("The tool wrote more than {limit_bytes} bytes into its writable directories.")]
    WriteLimit {
        /// The cap (`limits.max_write`).
        limit_bytes: u64,
    },
    /// The result, as JSON, is larger than the cap.
    #[error("The tool's result is larger than {limit_bytes} bytes as JSON.")]
    ResultLimit {
        /// The cap (`limits.max_result`).
        limit_bytes: u64,
    },
    /// The tool recursed too deep: its call stack ran out.
    #[error("The tool ran out of call stack: {message}.")]
    StackOverflow {
        /// What wasmtime said, and where.
        message: String,
    },
    /// The tool failed after a capability was denied.
    #[error("The tool was denied {action} on {target}: {reason}.")]
    Denied {
        /// What was attempted (`http.request`, `socket.connect`...).
        action: String,
        /// On what.
        target: String,
        /// Why it was denied.
        reason: String,
        /// How the tool failed afterwards.
        message: String,
    },
    /// A granted resource could not be set up (e.g. a granted directory is missing).
    #[error("The grant could not be applied: {message}.")]
    Grant {
        /// What failed.
        message: String,
    },
    /// The component could not be instantiated or its result not converted.
    #[error("The component is invalid: {message}.")]
    InvalidComponent {
        /// What failed.
        message: String,
    },
}

impl CallError {
    /// The error's kind as it is serialised (`"timeout"`, `"denied"`…): what
    /// metrics, audit records and the API's answers name it by.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::UnknownTool { .. } => "unknown_tool",
            CallError::BadArguments { .. } => "bad_arguments",
            CallError::Trap { .. } => "trap",
            CallError::Timeout { .. } => "timeout",
            CallError::OutOfMemory { .. } => "out_of_memory",
            CallError::CpuLimit { .. } => "cpu_limit",
            CallError::OutputLimit { .. } => "output_limit",
            CallError::WriteLimit { .. } => "write_limit",
            CallError::ResultLimit { .. } => "result_limit",
            CallError::StackOverflow { .. } => "stack_overflow",
            CallError::Denied { .. } => "denied",
            CallError::Grant { .. } => "grant",
            CallError::InvalidComponent { .. } => "invalid_component",
        }
    }
}

/// A value or an error, serialized as `{"ok": value}` or `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallResult {
    /// The tool returned this value.
    Ok(Value),
    /// The call failed.
    Error(CallError),
}

/// What a call cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metering {
    /// Wall time of the whole call (instantiation included), microseconds.
    pub wall_us: u64,
    /// Fuel budget.
    pub fuel_limit: u64,
    /// Fuel used.
    pub fuel_used: u64,
    /// Peak linear memory, bytes.
    pub peak_memory_bytes: u64,
    /// Bytes the tool wrote to stdout.
    pub stdout_bytes: u64,
    /// Bytes the tool wrote to stderr.
    pub stderr_bytes: u64,
}

/// Everything a call produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallOutcome {
    /// The tool called.
    pub tool: String,
    /// Value or error.
    pub result: CallResult,
    /// Cost.
    pub metering: Metering,
    /// Capability decisions, in order (at most
    /// [`caps::MAX_EVENTS`](crate::audit::caps::MAX_EVENTS)).
    pub audit: Vec<AuditEvent>,
    /// Decisions past the cap: counted, not kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audit_dropped: u64,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
}

pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub(crate) fn classify(
    e: &wasmtime::Error,
    limiter: &MemoryLimiter,
    audit: &AuditLog,
    limits: crate::grants::Limits,
    pipes: [(&str, &MemoryOutputPipe); 2],
) -> CallError {
    let message = first_line(e);
    if limiter.hit {
        return CallError::OutOfMemory {
            limit_bytes: limits.memory_bytes,
        };
    }
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
        audit.record(
            "limit.cpu",
            format!("{} fuel", limits.fuel),
            Decision::Deny,
            "the call used up its CPU budget",
        );
        return CallError::CpuLimit { fuel: limits.fuel };
    }
    if let Some(e) = output_overflow(audit, limits, pipes) {
        return e;
    }
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::StackOverflow)) {
        audit.record(
            "limit.stack",
            "call stack",
            Decision::Deny,
            "the tool recursed until its call stack ran out",
        );
        return CallError::StackOverflow { message };
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return CallError::Trap {
            message: format!("the tool exited with status {}", exit.0),
        };
    }
    if let Some(d) = audit.first_denial() {
        return CallError::Denied {
            action: d.action,
            target: d.target,
            reason: d.reason,
            message,
        };
    }
    CallError::Trap { message }
}

/// The call's result as JSON, unless it is over `limits.max_result_bytes`
/// (refused before the JSON is built when even a lower bound of its size is
/// over, so a huge result costs no more host memory than it already did).
pub(crate) fn result_json(v: &Val, limits: crate::grants::Limits, audit: &AuditLog) -> CallResult {
    let max = limits.max_result_bytes;
    let too_large = || {
        audit.record(
            "limit.result",
            format!("{max} bytes"),
            Decision::Deny,
            "the tool's result is larger than allowed",
        );
        CallResult::Error(CallError::ResultLimit { limit_bytes: max })
    };
    if airlock_wasm_tools::value::json_size_at_least(v) > max {
        return too_large();
    }
    match val_to_json(v, "result") {
        Ok(json) => {
            if json_len(&json) > max {
                return too_large();
            }
            CallResult::Ok(json)
        }
        Err(e) => CallResult::Error(CallError::InvalidComponent {
            message: e.to_string(),
        }),
    }
}

/// The length of `v` serialized, without keeping the bytes.
pub(crate) fn json_len(v: &Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// A stream that reached its cap: further writes failed (or trapped).
pub(crate) fn output_overflow(
    audit: &AuditLog,
    limits: crate::grants::Limits,
    pipes: [(&str, &MemoryOutputPipe); 2],
) -> Option<CallError> {
    let (name, _) = pipes
        .into_iter()
        .find(|(_, p)| p.contents().len() as u64 >= limits.max_output_bytes)?;
    audit.record(
        "limit.output",
        format!("{name} {} bytes", limits.max_output_bytes),
        Decision::Deny,
        "the call wrote more output than allowed; further writes failed",
    );
    Some(CallError::OutputLimit {
        stream: name.to_string(),
        limit_bytes: limits.max_output_bytes,
    })
}

/// One line saying what went wrong: each message of the error chain but
/// the "error while executing at wasm backtrace:" wrapper (its first line
/// alone said nothing), then the innermost named wasm function.
pub(crate) fn first_line(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let m = cause.to_string();
        let m = m.lines().next().unwrap_or("").trim();
        if m.is_empty()
            || m.starts_with("error while executing at wasm backtrace")
            || parts.iter().any(|p| p == m)
        {
            continue;
        }
        parts.push(m.to_string());
    }
    if let Some(name) = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().find_map(|f| f.func_name()))
    {
        parts.push(format!("in {name}"));
    }
    if parts.is_empty() {
        return format!("{e}");
    }
    audit_safe(parts.join(": "))
}

/// Error messages are cut like audit targets: a tool chooses their text.
pub(crate) fn audit_safe(s: String) -> String {
    crate::audit::truncate(s, 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_kind_is_the_name_it_is_serialised_under() {
        let s = || String::new();
        let all = [
            CallError::UnknownTool {
                tool: s(),
                available: vec![],
            },
            CallError::BadArguments {
                path: s(),
                message: s(),
            },
            CallError::Trap { message: s() },
            CallError::Timeout { limit_ms: 1 },
            CallError::OutOfMemory { limit_bytes: 1 },
            CallError::CpuLimit { fuel: 1 },
            CallError::OutputLimit {
                stream: s(),
                limit_bytes: 1,
            },
            CallError::WriteLimit { limit_bytes: 1 },
            CallError::ResultLimit { limit_bytes: 1 },
            CallError::StackOverflow { message: s() },
            CallError::Denied {
                action: s(),
                target: s(),
                reason: s(),
                message: s(),
            },
            CallError::Grant { message: s() },
            CallError::InvalidComponent { message: s() },
        ];
        for e in all {
            let v = serde_json::to_value(&e).unwrap();
            assert_eq!(v["kind"], e.kind(), "{e:?}");
        }
    }
}
