//! Tracing spans exported over OTLP (HTTP, protobuf) when `[telemetry]`
//! names a collector: each call, upload and policy change is a span
//! carrying its tenant, component, tool and the node that served it, so a
//! trace backend shows one request across a cluster's nodes.
//!
//! **Invariants:** nothing is exported unless configured; an unreachable
//! collector costs a request nothing (spans are batched and sent from a
//! thread of their own, dropped when its queue is full); the exporter
//! never sees arguments, results or tokens — only the span fields the
//! service sets.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `[telemetry]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans
    /// go to `<endpoint>/v1/traces`.
    pub otlp_endpoint: String,
    /// `service.name` of the spans (`airlock` unless set).
    pub service_name: String,
}

/// Errors setting the exporter up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter refused its configuration.
    #[error("The OTLP exporter cannot be set up for {endpoint}: {reason}.")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
}

/// A tracer provider exporting to `t`'s collector, naming `node`
/// (`service.instance.id`). Shut it down at exit: that sends what is left.
///
/// # Errors
/// [`TelemetryError::Exporter`].
pub fn provider(t: &Telemetry, node: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let endpoint = format!("{}/v1/traces", t.otlp_endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(&endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?;
    let resource = Resource::builder()
        .with_service_name(t.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            node.to_string(),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The `tracing` layer that hands spans to `provider`.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("airlock"))
}
