//! The generation queue both generation backends serve: a bounded channel of
//! jobs taken by a fixed number of slots, and counts of what waits and what
//! runs. A full queue refuses at once (a 429 for the client).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ragd_core::{GenJob, Generate, GeneratorInfo, QueueFull, SlotLoad};
use tokio::sync::mpsc;

/// Questions waiting in the queue and slots generating, shared by the
/// handle (which counts questions in) and the slots (which take them out).
#[derive(Debug, Default)]
pub(crate) struct SlotCounters {
    waiting: AtomicUsize,
    busy: AtomicUsize,
}

impl SlotCounters {
    /// A slot took a job off the queue; it is busy until the guard drops.
    pub(crate) fn take(&self) -> BusySlot<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        BusySlot(self)
    }
}

/// A slot at work; dropping it frees the slot.
pub(crate) struct BusySlot<'a>(&'a SlotCounters);

impl Drop for BusySlot<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The sending side of the queue, kept by a backend's handle.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    tx: mpsc::Sender<GenJob>,
    pub(crate) counters: Arc<SlotCounters>,
    slots: usize,
}

impl Queue {
    /// A queue of `size` jobs for `slots` slots, and its receiving end.
    pub(crate) fn new(size: usize, slots: usize) -> (Queue, mpsc::Receiver<GenJob>) {
        let (tx, rx) = mpsc::channel::<GenJob>(size.max(1));
        (
            Queue {
                tx,
                counters: Arc::new(SlotCounters::default()),
                slots: slots.max(1),
            },
            rx,
        )
    }

    /// Slots, busy slots and questions waiting.
    pub(crate) fn load(&self) -> SlotLoad {
        SlotLoad {
            slots: self.slots,
            busy: self.counters.busy.load(Ordering::SeqCst),
            waiting: self.counters.waiting.load(Ordering::SeqCst),
        }
    }

    /// Queues a job, or fails at once when the queue is full. Returns how many
    /// jobs will be started before this one once a slot frees (0: a slot is free).
    pub(crate) fn submit(&self, job: GenJob) -> Result<usize, QueueFull> {
        // Free slots are counted before the job is handed over: afterwards a
        // slot may already be busy with this very job.
        let free = self
            .slots
            .saturating_sub(self.counters.busy.load(Ordering::SeqCst));
        let ahead = self.counters.waiting.fetch_add(1, Ordering::SeqCst);
        if self.tx.try_send(job).is_err() {
            self.counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueFull);
        }
        Ok((ahead + 1).saturating_sub(free))
    }
}

/// A generation backend as the pipeline sees it: its model's description and
/// the queue its slots (local threads or remote tasks) serve.
#[derive(Debug, Clone)]
pub struct GenerationSlots {
    pub(crate) queue: Queue,
    pub(crate) info: GeneratorInfo,
}

impl Generate for GenerationSlots {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn load(&self) -> SlotLoad {
        self.queue.load()
    }

    fn submit(&self, job: GenJob) -> Result<usize, QueueFull> {
        self.queue.submit(job)
    }
}
