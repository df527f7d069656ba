//! Prometheus metrics (OpenMetrics text via `prometheus-client`).

use airlock_guest::{CallOutcome, Decision};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub(crate) struct Metrics {
    registry: Registry,
    calls: Family<Labels, Counter>,
    denials: Family<Labels, Counter>,
    duration: Histogram,
    pub(crate) running: Gauge,
    pub(crate) uploads: Counter,
    pub(crate) vms: Gauge,
    pub(crate) vms_booted: Counter,
    pub(crate) vm_waiting: Gauge,
    starts: Family<Labels, Counter>,
}

impl Metrics {
    /// Metrics of node `node` (a `node` label on every one).
    pub(crate) fn new(node: &str) -> Self {
        let mut registry =
            Registry::with_labels(std::iter::once(("node".into(), node.to_string().into())));
        let calls = Family::<Labels, Counter>::default();
        let denials = Family::<Labels, Counter>::default();
        // 100 µs .. ~26 s
        let duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let running = Gauge::default();
        let uploads = Counter::default();
        let vms = Gauge::<i64>::default();
        let vms_booted = Counter::default();
        let vm_waiting = Gauge::<i64>::default();
        let starts = Family::<Labels, Counter>::default();
        registry.register(
            "airlock_vm_starts",
            "Calls' microVMs by how they started: restore (from the snapshot) or boot",
            starts.clone(),
        );
        registry.register(
            "airlock_calls",
            "Tool calls by tenant and outcome (ok or the error kind)",
            calls.clone(),
        );
        registry.register(
            "airlock_denials",
            "Capability denials by tenant and action",
            denials.clone(),
        );
        registry.register(
            "airlock_call_duration_seconds",
            "Wall time of tool calls, instantiation included",
            duration.clone(),
        );
        registry.register(
            "airlock_calls_running",
            "Tool calls running now",
            running.clone(),
        );
        registry.register("airlock_uploads", "Components registered", uploads.clone());
        registry.register(
            "airlock_vms_running",
            "MicroVMs running now, warm ones included (0 with process isolation)",
            vms.clone(),
        );
        registry.register(
            "airlock_vms_booted",
            "MicroVMs booted since start (warm pool and on demand)",
            vms_booted.clone(),
        );
        registry.register(
            "airlock_vm_calls_waiting",
            "Calls waiting for a microVM (isolation.max_vms are in use)",
            vm_waiting.clone(),
        );
        Self {
            registry,
            calls,
            denials,
            duration,
            running,
            uploads,
            vms,
            vms_booted,
            vm_waiting,
            starts,
        }
    }

    /// A call's VM started as `start` (`restore` or `boot`).
    pub(crate) fn observe_start(&self, start: &'static str) {
        self.starts
            .get_or_create(&vec![("start", start.to_string())])
            .inc();
    }

    pub(crate) fn observe_call(&self, tenant: &str, outcome_kind: &str, o: &CallOutcome) {
        self.calls
            .get_or_create(&vec![
                ("tenant", tenant.to_string()),
                ("outcome", outcome_kind.to_string()),
            ])
            .inc();
        for e in o.audit.iter().filter(|e| e.decision == Decision::Deny) {
            self.denials
                .get_or_create(&vec![
                    ("tenant", tenant.to_string()),
                    // Known actions only: a guest's made-up ones are `other`.
                    (
                        "action",
                        airlock_guest::audit::action_label(&e.action).to_string(),
                    ),
                ])
                .inc();
        }
        self.duration.observe(o.metering.wall_us as f64 / 1e6);
    }

    pub(crate) fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}
