//! Audit events: every capability decision made during one call.
//!
//! **Invariant:** what a call can make the host keep is bounded whatever the
//! call does: at most [`caps::MAX_EVENTS`] events, each target and reason
//! cut to [`caps::MAX_TARGET_BYTES`] / [`caps::MAX_REASON_BYTES`]; events
//! past the cap are counted ([`AuditLog::dropped`]), never stored. The last
//! [`caps::RESERVED_FOR_LIMITS`] places are kept for `limit.*` events, so a
//! call that floods denials and then hits a limit still says which. Past
//! [`caps::FREE_DENIALS`] denials a call is slowed down
//! ([`AuditLog::denial_pause`]): probing costs the prober its own time.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds on one call's audit trail (see the module docs).
pub mod caps {
    use std::time::Duration;
    /// Events kept per call.
    pub const MAX_EVENTS: usize = 256;
    /// Of those, the last places only `limit.*` events may take.
    pub const RESERVED_FOR_LIMITS: usize = 8;
    /// Bytes kept of an event's target (a URL, a path).
    pub const MAX_TARGET_BYTES: usize = 512;
    /// Bytes kept of an event's reason.
    pub const MAX_REASON_BYTES: usize = 256;
    /// Denials a call may collect at full speed.
    pub const FREE_DENIALS: u64 = 32;
    /// The pause after each denial past [`FREE_DENIALS`].
    pub const DENIAL_PAUSE: Duration = Duration::from_millis(20);
}

/// Every action an event may name. Anything else (a guest that lies) is
/// counted as `other` wherever actions become labels.
pub const ACTIONS: &[&str] = &[
    "fs.preopen",
    "fs.preopens",
    "fs.open",
    "fs.change",
    "env.read",
    "http.request",
    "http.proxy",
    "socket.create",
    "socket.connect",
    "limit.memory",
    "limit.cpu",
    "limit.time",
    "limit.output",
    "limit.result",
    "limit.stack",
    "limit.disk",
];

/// `action` if it is one of [`ACTIONS`], else `"other"`: safe as a metrics
/// label whoever wrote the event.
pub fn action_label(action: &str) -> &'static str {
    ACTIONS
        .iter()
        .find(|a| **a == action)
        .copied()
        .unwrap_or("other")
}

/// `s` cut to at most `max` bytes on a character boundary, saying how long
/// it was.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let total = s.len();
    let mut cut = max.saturating_sub(40);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(&format!("… ({total} bytes in all)"));
    s
}

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
    /// `socket.create`, `socket.connect`, `limit.memory`, `limit.cpu`,
    /// `limit.time`, `limit.output`.
    pub action: String,
    /// What it was attempted on (a path, a URL, a key list, a limit).
    pub target: String,
    /// The decision.
    pub decision: Decision,
    /// Why, in a short sentence (the rule that matched, the limit hit).
    pub reason: String,
}

/// Shared, append-only, bounded event list for one call. Cloning shares it.
#[derive(Debug, Clone)]
pub struct AuditLog {
    start: Instant,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<AuditEvent>,
    dropped: u64,
    denials: u64,
    first_denial: Option<AuditEvent>,
}

impl Inner {
    fn push(&mut self, ev: AuditEvent) {
        if ev.decision == Decision::Deny {
            self.denials += 1;
            if self.first_denial.is_none() {
                self.first_denial = Some(ev.clone());
            }
        }
        let cap = if ev.action.starts_with("limit.") {
            caps::MAX_EVENTS
        } else {
            caps::MAX_EVENTS - caps::RESERVED_FOR_LIMITS
        };
        if self.events.len() < cap {
            self.events.push(ev);
        } else {
            self.dropped += 1;
        }
    }
}

impl AuditLog {
    /// A new, empty log whose clock starts now.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            inner: Arc::default(),
        }
    }

    /// Record one decision (target and reason cut to their caps; past the
    /// event cap only counted).
    pub fn record(
        &self,
        action: &str,
        target: impl Into<String>,
        decision: Decision,
        reason: impl Into<String>,
    ) {
        let ev = AuditEvent {
            at_us: self.start.elapsed().as_micros() as u64,
            action: truncate(action.to_string(), 64),
            target: truncate(target.into(), caps::MAX_TARGET_BYTES),
            decision,
            reason: truncate(reason.into(), caps::MAX_REASON_BYTES),
        };
        tracing::debug!(action = %ev.action, target = %ev.target, decision = ?ev.decision, "capability decision");
        self.lock().push(ev);
    }

    /// Add events recorded elsewhere (the host's egress proxy, or a guest's
    /// outcome read by the host), under the same caps; `dropped` more were
    /// not sent at all.
    pub fn extend(&self, events: impl IntoIterator<Item = AuditEvent>, dropped: u64) {
        let mut inner = self.lock();
        inner.dropped = inner.dropped.saturating_add(dropped);
        for mut ev in events {
            ev.action = truncate(ev.action, 64);
            ev.target = truncate(ev.target, caps::MAX_TARGET_BYTES);
            ev.reason = truncate(ev.reason, caps::MAX_REASON_BYTES);
            inner.push(ev);
        }
    }

    /// The events kept so far, in order.
    pub fn snapshot(&self) -> Vec<AuditEvent> {
        self.lock().events.clone()
    }

    /// How many events were past the cap and not kept.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The first denial, even if the event cap was reached before it.
    pub fn first_denial(&self) -> Option<AuditEvent> {
        self.lock().first_denial.clone()
    }

    /// How long the caller should pause after recording a denial: nothing
    /// for the first [`caps::FREE_DENIALS`], then [`caps::DENIAL_PAUSE`]
    /// each, so a flood of refused attempts runs into the call's own wall
    /// clock limit instead of into the host.
    pub fn denial_pause(&self) -> Duration {
        if self.lock().denials > caps::FREE_DENIALS {
            caps::DENIAL_PAUSE
        } else {
            Duration::ZERO
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked while pushing;
        // the list itself is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_events_is_bounded_counted_and_keeps_room_for_limits() {
        let log = AuditLog::new(Instant::now());
        let url = format!("http://denied.test/{}", "a".repeat(60_000));
        for _ in 0..17_500 {
            log.record(
                "http.request",
                url.clone(),
                Decision::Deny,
                "no allow rule matches",
            );
        }
        log.record(
            "limit.time",
            "10000 ms",
            Decision::Deny,
            "the call ran past its limit",
        );
        let events = log.snapshot();
        assert_eq!(
            events.len(),
            caps::MAX_EVENTS - caps::RESERVED_FOR_LIMITS + 1
        );
        assert_eq!(
            log.dropped(),
            17_500 - (caps::MAX_EVENTS - caps::RESERVED_FOR_LIMITS) as u64
        );
        assert_eq!(events.last().unwrap().action, "limit.time");
        assert!(
            events
                .iter()
                .all(|e| e.target.len() <= caps::MAX_TARGET_BYTES)
        );
        assert!(
            events[0].target.ends_with("(60019 bytes in all)"),
            "{}",
            events[0].target
        );
        let bytes = serde_json::to_vec(&events).unwrap().len();
        assert!(bytes < 256 * 1024, "{bytes} bytes of events");
        assert_eq!(log.first_denial().unwrap().action, "http.request");
    }

    #[test]
    fn denials_past_the_free_ones_are_paused() {
        let log = AuditLog::new(Instant::now());
        for _ in 0..caps::FREE_DENIALS {
            log.record("socket.connect", "x", Decision::Deny, "no");
            assert_eq!(log.denial_pause(), Duration::ZERO);
        }
        log.record("fs.open", "y", Decision::Allow, "ok");
        assert_eq!(log.denial_pause(), Duration::ZERO);
        log.record("socket.connect", "x", Decision::Deny, "no");
        assert_eq!(log.denial_pause(), caps::DENIAL_PAUSE);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let s = "é".repeat(1000);
        let t = truncate(s, 100);
        assert!(t.len() <= 100 + 30, "{t}");
        assert!(t.contains("(2000 bytes in all)"));
        assert_eq!(truncate("short".into(), 100), "short");
    }
}
