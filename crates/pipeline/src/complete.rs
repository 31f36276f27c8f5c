//! One short job for the answer model outside an answer — a question's
//! translation ([`crate::translate`]), a chunk's questions ([`crate::enrich`]):
//! submit it, wait for its whole text.

use ragd_core::{BackendError, GenEvent, GenJob, Generate, GenerateParams, Prompt};
use tokio::sync::mpsc;

/// How a short job ended.
#[derive(Debug)]
pub(crate) enum Completion {
    /// The model's whole reply.
    Text(String),
    /// The generation queue is full; nothing was started.
    Busy,
    /// The backend failed, or no reply came by `params.deadline`.
    Failed(Option<BackendError>),
}

/// How long past `params.deadline` the reply is waited for: the backend
/// ends a job at its deadline and sends what it wrote (`finish_reason`
/// timeout), which is worth more than nothing.
const GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `prompt` with `params` (whose `deadline`, with a few seconds'
/// grace, also bounds the wait) and returns the reply.
pub(crate) async fn complete(
    generator: &dyn Generate,
    prompt: Prompt,
    params: GenerateParams,
) -> Completion {
    let deadline = params.deadline.map(|d| d + GRACE);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = GenJob {
        prompt,
        params,
        context_budget: 0,
        events: tx,
    };
    if generator.submit(job).is_err() {
        return Completion::Busy;
    }
    loop {
        let event = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), rx.recv()).await {
                Ok(e) => e,
                Err(_) => return Completion::Failed(None),
            },
            None => rx.recv().await,
        };
        match event {
            Some(GenEvent::Done(g)) => return Completion::Text(g.text),
            Some(GenEvent::Failed(e)) => return Completion::Failed(Some(e)),
            Some(_) => continue,
            None => return Completion::Failed(None),
        }
    }
}
