//! `GET /metrics`: Prometheus text format, from the `prometheus` crate.
//!
//! Counted as they happen: requests by route (the route's pattern, not the
//! raw path, so ids do not explode the series), method and status; request
//! latency; time to first token and tokens generated per answer; the texts per
//! embedding batch. Read at scrape time: documents and chunks stored, and the
//! generation queue (busy slots, questions waiting).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    first_token: Histogram,
    tokens: IntCounter,
    embed_batch: Histogram,
    documents: IntGauge,
    chunks: IntGauge,
    busy: IntGauge,
    waiting: IntGauge,
}

fn build() -> prometheus::Result<Metrics> {
    let registry = Registry::new_custom(Some("ragd".into()), None)?;
    let requests = IntCounterVec::new(
        Opts::new(
            "http_requests_total",
            "HTTP requests by route, method and status",
        ),
        &["route", "method", "status"],
    )?;
    let latency = HistogramVec::new(
        HistogramOpts::new(
            "http_request_duration_seconds",
            "HTTP request latency (streams: until the headers)",
        )
        .buckets(vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]),
        &["route"],
    )?;
    let first_token = Histogram::with_opts(
        HistogramOpts::new(
            "time_to_first_token_seconds",
            "From the question to the first answer token",
        )
        .buckets(vec![
            0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0,
        ]),
    )?;
    let tokens = IntCounter::new("generated_tokens_total", "Answer tokens generated")?;
    let embed_batch = Histogram::with_opts(
        HistogramOpts::new("embedding_batch_size", "Texts per embedding batch")
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
    )?;
    let documents = IntGauge::new("documents", "Documents stored")?;
    let chunks = IntGauge::new("chunks", "Chunks stored (live)")?;
    let busy = IntGauge::new("generation_slots_busy", "Generation slots answering")?;
    let waiting = IntGauge::new(
        "generation_queue_depth",
        "Questions waiting for a generation slot",
    )?;
    registry.register(Box::new(requests.clone()))?;
    registry.register(Box::new(latency.clone()))?;
    registry.register(Box::new(first_token.clone()))?;
    registry.register(Box::new(tokens.clone()))?;
    registry.register(Box::new(embed_batch.clone()))?;
    registry.register(Box::new(documents.clone()))?;
    registry.register(Box::new(chunks.clone()))?;
    registry.register(Box::new(busy.clone()))?;
    registry.register(Box::new(waiting.clone()))?;
    Ok(Metrics {
        registry,
        requests,
        latency,
        first_token,
        tokens,
        embed_batch,
        documents,
        chunks,
        busy,
        waiting,
    })
}

/// The process's metrics (one registry per process, as Prometheus expects).
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| build().expect("metric definitions are valid"))
}

impl Metrics {
    /// Notes a finished answer.
    pub fn answer(&self, first_token_ms: Option<f64>, completion_tokens: usize) {
        if let Some(ms) = first_token_ms {
            self.first_token.observe(ms / 1e3);
        }
        self.tokens.inc_by(completion_tokens as u64);
    }

    /// Notes a finished answer from its response.
    pub fn answered(&self, response: &ragd_pipeline::AskResponse) {
        self.answer(
            response.timings.first_token_ms,
            response.usage.completion_tokens,
        );
    }

    /// Notes an embedding batch.
    pub fn embedding_batch(&self, texts: usize) {
        self.embed_batch.observe(texts as f64);
    }

    /// The text format, with the gauges set from `status` (`/ready`'s JSON).
    pub fn render(&self, status: Option<&serde_json::Value>) -> String {
        if let Some(s) = status {
            let int = |p: &str| s.pointer(p).and_then(|v| v.as_i64()).unwrap_or(0);
            self.documents.set(int("/documents"));
            self.chunks.set(int("/chunks"));
            self.busy.set(int("/generation/busy"));
            self.waiting.set(int("/generation/waiting"));
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Middleware counting every request.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let m = get();
    m.latency
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[&route, &method, response.status().as_str()])
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_prefix() {
        let m = get();
        m.answer(Some(1500.0), 12);
        m.embedding_batch(8);
        m.requests.with_label_values(&["/ask", "POST", "200"]).inc();
        let text = m.render(Some(&serde_json::json!({
            "documents": 3, "chunks": 7, "generation": { "busy": 1, "waiting": 2 }
        })));
        for name in [
            "ragd_http_requests_total{method=\"POST\",route=\"/ask\",status=\"200\"}",
            "ragd_time_to_first_token_seconds_count",
            "ragd_generated_tokens_total",
            "ragd_embedding_batch_size_bucket",
            "ragd_documents 3",
            "ragd_chunks 7",
            "ragd_generation_slots_busy 1",
            "ragd_generation_queue_depth 2",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
