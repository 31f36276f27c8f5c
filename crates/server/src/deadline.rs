//! `server.request_timeout_s`: a response that has not started in time is a
//! 408 — unless the handler has said the client asked to watch the answer
//! arrive (a stream), which is bounded by `generation.timeout_s` instead.
//!
//! Written here rather than with tower-http's `TimeoutLayer` because whether a
//! request streams is known only once its handler has read the body
//! (`"stream": true`): the handler marks the request through the
//! [`Streaming`] extension, and this middleware lifts the deadline for it.
//! Before, a stream whose passages took longer than the deadline to find
//! (translation, evidence selection on a busy machine) was cut off with 408.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Set by a handler whose response is a stream: the deadline no longer applies.
#[derive(Clone, Debug, Default)]
pub struct Streaming(Arc<AtomicBool>);

impl Streaming {
    /// This request's response streams: let it start when it is ready.
    pub fn exempt(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_exempt(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The middleware: 408 when the response has not started within `timeout`
/// and the handler did not mark the request as a stream.
pub(crate) async fn limit(
    State(timeout): State<Duration>,
    mut req: Request,
    next: Next,
) -> Response {
    let streaming = Streaming::default();
    req.extensions_mut().insert(streaming.clone());
    let response = next.run(req);
    tokio::pin!(response);
    tokio::select! {
        r = &mut response => r,
        () = tokio::time::sleep(timeout) => {
            if streaming.is_exempt() {
                response.await
            } else {
                // Dropping the handler's future cancels its work (a queued or
                // running generation is freed when its receiver goes).
                ApiError::Timeout(timeout.as_secs_f64()).into_response()
            }
        }
    }
}
