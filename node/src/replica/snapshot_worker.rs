//! The one thread that encodes and writes snapshots off the shards. It lives as long as the
//! process, so the memory a snapshot's encoding takes is reused by the next one instead of
//! being left behind in the heap of a thread that exited (measured: a node filled to 10M
//! jobs had started 576 snapshot threads, and the allocator kept what they had freed).

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The worker's inbox, made when the first snapshot is asked for.
static WORKER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

/// The result of work handed to the worker, once it is done.
pub struct Pending<T> {
    result: mpsc::Receiver<T>,
    done: Option<T>,
}

impl<T> Pending<T> {
    /// Whether the work ended (done, or lost to a panic: `wait` then says so at once).
    pub fn is_finished(&mut self) -> bool {
        if self.done.is_some() {
            return true;
        }
        match self.result.try_recv() {
            Ok(value) => {
                self.done = Some(value);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            Err(mpsc::TryRecvError::Disconnected) => true,
        }
    }

    /// Waits for the work's result; `None` when it panicked.
    pub fn wait(mut self) -> Option<T> {
        self.done.take().or_else(|| self.result.recv().ok())
    }
}

/// Hands `work` to the snapshot worker (queued behind what it is doing) and returns at once.
pub fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<Pending<T>, String> {
    let (sender, result) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        // A panic in one snapshot's work loses that snapshot (its `Pending` sees the
        // sender dropped), not the worker.
        if let Ok(value) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
            let _ = sender.send(value);
        }
    });
    let inbox = match WORKER.get() {
        Some(inbox) => inbox,
        None => {
            let inbox = start()?;
            WORKER.get_or_init(|| Mutex::new(inbox))
        }
    };
    let inbox = inbox.lock().map_err(|_| "the snapshot worker's inbox is poisoned".to_string())?;
    inbox.send(job).map_err(|_| "the snapshot worker stopped".to_string())?;
    Ok(Pending { result, done: None })
}

/// Starts the worker thread. Two callers racing here each start one; the loser's thread
/// ends at once, its inbox dropped unused.
fn start() -> Result<mpsc::Sender<Job>, String> {
    let (inbox, jobs) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            lower_this_threads_priority();
            for job in jobs {
                job();
                // What the snapshot's encoding freed goes back to the system now, not when
                // this thread next allocates (it may idle for long after a fill).
                // SAFETY: mi_collect takes a flag and works on the calling thread's heap.
                unsafe { libmimalloc_sys::mi_collect(true) };
            }
        })
        .map_err(|error| format!("starting the snapshot worker: {error}"))?;
    Ok(inbox)
}

/// Snapshots are background work: their thread yields to the shards when the CPU is busy
/// (nice 10 on Linux, where the nice value is per thread; elsewhere nothing).
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // Relative to the node's own nice value (never above it), for this thread only.
        // SAFETY: nice takes a plain integer and affects the calling thread on Linux.
        let failed = unsafe { libc::nice(10) } == -1;
        if failed {
            tracing::debug!("could not lower the snapshot thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_one_thread_in_order_and_a_panic_loses_only_its_own_result() {
        let first = run(|| std::thread::current().id()).expect("queued");
        let panicking = run(|| -> u32 { panic!("a snapshot's work failed") }).expect("queued");
        let third = run(|| std::thread::current().id()).expect("queued");
        assert_eq!(panicking.wait(), None, "a panic is a lost result");
        let (first, third) = (first.wait().expect("done"), third.wait().expect("done after a panic"));
        assert_eq!(first, third, "one thread, kept");
        assert_ne!(first, std::thread::current().id());
    }
}
