//! Audit events: every capability decision made during one call.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Whether a capability use was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The use went ahead.
    Allow,
    /// The use was refused or stopped.
    Deny,
}

/// One capability decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Microseconds since the call started.
    pub at_us: u64,
    /// What was attempted: `fs.preopen`, `env.read`, `http.request`,
    /// `socket.connect`, `limit.memory`, `limit.cpu`, `limit.time`, `limit.output`.
    pub action: String,
    /// What it was attempted on (a path, a URL, a key list, a limit).
    pub target: String,
    /// The decision.
    pub decision: Decision,
    /// Why, in a short sentence (the rule that matched, the limit hit).
    pub reason: String,
}

/// Shared, append-only event list for one call. Cloning shares the list.
#[derive(Debug, Clone)]
pub struct AuditLog {
    start: Instant,
    events: Arc<Mutex<Vec<AuditEvent>>>,
}

impl AuditLog {
    /// A new, empty log whose clock starts now.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            events: Arc::default(),
        }
    }

    /// Record one decision.
    pub fn record(
        &self,
        action: &str,
        target: impl Into<String>,
        decision: Decision,
        reason: impl Into<String>,
    ) {
        let ev = AuditEvent {
            at_us: self.start.elapsed().as_micros() as u64,
            action: action.to_string(),
            target: target.into(),
            decision,
            reason: reason.into(),
        };
        tracing::debug!(action = %ev.action, target = %ev.target, decision = ?ev.decision, "capability decision");
        self.lock().push(ev);
    }

    /// The events so far, in order.
    pub fn snapshot(&self) -> Vec<AuditEvent> {
        self.lock().clone()
    }

    /// Whether any decision was a denial.
    pub fn first_denial(&self) -> Option<AuditEvent> {
        self.lock()
            .iter()
            .find(|e| e.decision == Decision::Deny)
            .cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AuditEvent>> {
        // A poisoned lock only means another thread panicked while pushing;
        // the list itself is still valid.
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}
