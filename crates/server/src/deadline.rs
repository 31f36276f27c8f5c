//! `server.request_timeout_s`: a response that has not started in time is a
//! 408 — unless the handler lifted the deadline: for a streamed answer (the
//! client asked to watch it arrive; it is bounded by `generation.timeout_s`)
//! and for an ingest that has the answer model write questions per chunk
//! (`ingest.generate_questions`: seconds per chunk, by design).
//!
//! Written here rather than with tower-http's `TimeoutLayer` because whether a
//! request streams is known only once its handler has read the body
//! (`"stream": true`): the handler lifts the deadline through the
//! [`Deadline`] extension. Before, a stream whose passages took longer than
//! the deadline to find (translation, evidence selection on a busy machine)
//! was cut off with 408.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// A request's deadline, which its handler may lift.
#[derive(Clone, Debug, Default)]
pub struct Deadline(Arc<AtomicBool>);

impl Deadline {
    /// This request's response may start when it is ready.
    pub fn lift(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_lifted(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The middleware: 408 when the response has not started within `timeout`
/// and the handler did not lift the deadline.
pub(crate) async fn limit(
    State(timeout): State<Duration>,
    mut req: Request,
    next: Next,
) -> Response {
    let deadline = Deadline::default();
    req.extensions_mut().insert(deadline.clone());
    let response = next.run(req);
    tokio::pin!(response);
    tokio::select! {
        r = &mut response => r,
        () = tokio::time::sleep(timeout) => {
            if deadline.is_lifted() {
                response.await
            } else {
                // Dropping the handler's future cancels its work (a queued or
                // running generation is freed when its receiver goes).
                ApiError::Timeout(timeout.as_secs_f64()).into_response()
            }
        }
    }
}
