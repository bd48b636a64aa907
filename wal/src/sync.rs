//! Durable writes: a positioned write followed by fdatasync, through io_uring where the kernel
//! allows it and through plain system calls otherwise. Chosen once, when a log opens.

use std::fs::File;
use std::io;

/// Which implementation a log uses for its durable writes (queryable, and logged at open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncBackend {
    /// One io_uring submission: a write linked to an fdatasync.
    IoUring,
    /// `pwrite` then `fdatasync`.
    Syscall,
}

/// What the caller asks for when opening a log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncChoice {
    /// io_uring when the kernel allows it, else system calls.
    #[default]
    Auto,
    /// io_uring or an error (used by tests to cover both paths).
    IoUring,
    Syscall,
}

pub(crate) struct Writer {
    #[cfg(target_os = "linux")]
    ring: Option<io_uring::IoUring>,
    /// A durable write submitted and not yet reaped: the writer owns its buffer until then.
    in_flight: Option<InFlight>,
}

/// A write begun by [`Writer::begin_durable`]. With io_uring the kernel reads `bytes` until
/// both completions are reaped; without it, the write is already done and `done` is its result.
struct InFlight {
    bytes: Vec<u8>,
    offset: u64,
    done: Option<io::Result<()>>,
}

/// Submission queue depth: one write and its fsync are in flight at a time.
#[cfg(target_os = "linux")]
const RING_ENTRIES: u32 = 4;

impl Writer {
    /// Opens the writer; with `Auto`, an io_uring refusal selects the syscall path.
    pub(crate) fn open(choice: SyncChoice) -> Result<Writer, io::Error> {
        match choice {
            SyncChoice::Syscall => Ok(Writer::syscall()),
            SyncChoice::IoUring => Writer::io_uring(),
            SyncChoice::Auto => Ok(Writer::io_uring().unwrap_or_else(|error| {
                tracing::warn!(%error, "io_uring refused; durable writes use pwrite + fdatasync");
                Writer::syscall()
            })),
        }
    }

    fn syscall() -> Writer {
        Writer {
            #[cfg(target_os = "linux")]
            ring: None,
            in_flight: None,
        }
    }

    #[cfg(target_os = "linux")]
    fn io_uring() -> Result<Writer, io::Error> {
        let ring = io_uring::IoUring::new(RING_ENTRIES)?;
        if !uring::supports_write_and_fsync(&ring) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the kernel's io_uring lacks write or fsync"));
        }
        Ok(Writer { ring: Some(ring), in_flight: None })
    }

    #[cfg(not(target_os = "linux"))]
    fn io_uring() -> Result<Writer, io::Error> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring exists only on Linux"))
    }

    pub(crate) fn backend(&self) -> SyncBackend {
        #[cfg(target_os = "linux")]
        if self.ring.is_some() {
            return SyncBackend::IoUring;
        }
        SyncBackend::Syscall
    }

    /// Writes all of `bytes` at `offset` and makes them durable (fdatasync) before returning.
    /// Callers finish a begun write first (the log does, before any other change).
    pub(crate) fn write_durable(&mut self, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        debug_assert!(self.in_flight.is_none(), "a begun write is finished before another");
        #[cfg(target_os = "linux")]
        if self.ring.is_some() {
            // Through a copy the writer owns: were the completions never reaped, the kernel
            // could still read the buffer after the caller's was gone (only zeroing comes
            // here, rarely).
            self.begin_durable(file, offset, bytes.to_vec());
            return self.finish_durable(file).map_or(Ok(()), |(_, result)| result);
        }
        use std::os::unix::fs::FileExt;
        file.write_all_at(bytes, offset)?;
        file.sync_data()
    }

    /// Starts writing `bytes` at `offset` and making them durable, and returns without
    /// waiting (with io_uring; without it, the write is done here). Logs on different files
    /// that begin their writes before finishing any have their fdatasyncs run at once,
    /// which the file system commits together. `file` must stay open until
    /// [`Writer::finish_durable`]; the writer keeps `bytes` until then.
    pub(crate) fn begin_durable(&mut self, file: &File, offset: u64, bytes: Vec<u8>) {
        assert!(self.in_flight.is_none(), "one begun write at a time");
        #[cfg(target_os = "linux")]
        if let Some(ring) = self.ring.as_mut() {
            let done = uring::submit_durable(ring, file, offset, &bytes).err().map(Err);
            self.in_flight = Some(InFlight { bytes, offset, done });
            return;
        }
        use std::os::unix::fs::FileExt;
        let done = file.write_all_at(&bytes, offset).and_then(|()| file.sync_data());
        self.in_flight = Some(InFlight { bytes, offset, done: Some(done) });
    }

    /// Whether a write was begun and not finished.
    pub(crate) fn is_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Waits until the begun write is durable (writing what a short write left, on `file`,
    /// the one it began on) and gives its buffer back with the result; `None` when no
    /// write was begun.
    pub(crate) fn finish_durable(&mut self, file: &File) -> Option<(Vec<u8>, io::Result<()>)> {
        let InFlight { bytes, offset, done } = self.in_flight.take()?;
        if let Some(done) = done {
            return Some((bytes, done));
        }
        #[cfg(target_os = "linux")]
        if let Some(ring) = self.ring.as_mut() {
            return match uring::finish_durable(ring, file, offset, &bytes) {
                uring::Finished::Done(result) => Some((bytes, result)),
                uring::Finished::Abandoned(error) => {
                    // The completions could not be reaped, so the kernel may still read the
                    // buffer: it is never freed (once; the log fails and writes no more).
                    std::mem::forget(bytes);
                    Some((Vec::new(), Err(error)))
                }
            };
        }
        let _ = (file, offset);
        Some((bytes, Err(io::Error::other("a begun write without io_uring has its result"))))
    }
}

impl Drop for Writer {
    /// The kernel may still read a begun write's buffer: it is waited for before the
    /// buffer (and the ring) go.
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let (Some(ring), Some(InFlight { done: None, .. })) = (self.ring.as_mut(), &self.in_flight) {
            if uring::reap_both(ring).is_err() {
                // Not reaped: the kernel may still read the buffer, so it is never freed.
                std::mem::forget(self.in_flight.take());
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod uring {
    use io_uring::{opcode, squeue, types, IoUring};
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// Waits interrupted by signals are retried at most this many times in a row.
    const WAIT_RETRIES_MAX: u32 = 1000;
    const WRITE_ID: u64 = 1;
    const SYNC_ID: u64 = 2;
    /// One submission writes at most this much, so its length fits the SQE's u32.
    const WRITE_CHUNK_MAX_BYTES: usize = 1 << 30;

    /// What finishing a begun write came to: its result, or `Abandoned` when its completions
    /// could not be reaped, so the kernel may still read the buffer (never to be freed).
    pub(super) enum Finished {
        Done(io::Result<()>),
        Abandoned(io::Error),
    }

    /// Submits what is queued and waits until both completions are reaped. A wait cut short
    /// by a signal (EINTR, or fewer completions than asked) is resumed. An error means they
    /// were not all reaped: the kernel may still use the caller's buffer.
    pub(super) fn reap_both(ring: &mut IoUring) -> io::Result<(i32, i32)> {
        let (mut write_res, mut sync_res) = (None, None);
        let mut retries = 0;
        while write_res.is_none() || sync_res.is_none() {
            let wanted = usize::from(write_res.is_none()) + usize::from(sync_res.is_none());
            match ring.submit_and_wait(wanted) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted && retries < WAIT_RETRIES_MAX => retries += 1,
                Err(e) => return Err(e),
            }
            for cqe in ring.completion() {
                match cqe.user_data() {
                    WRITE_ID => write_res = Some(cqe.result()),
                    SYNC_ID => sync_res = Some(cqe.result()),
                    other => return Err(io::Error::other(format!("unexpected io_uring completion {other}"))),
                }
            }
        }
        Ok((write_res.expect("loop ends when set"), sync_res.expect("loop ends when set")))
    }

    /// True when the kernel supports the two opcodes this writer uses.
    pub(super) fn supports_write_and_fsync(ring: &IoUring) -> bool {
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::Write::CODE)
            && probe.is_supported(opcode::Fsync::CODE)
    }

    /// Queues the write of `bytes` (its first chunk) linked to an fdatasync and submits
    /// them without waiting. The caller keeps `bytes` and `file` alive and unchanged until
    /// [`finish_durable`] (or [`reap_both`]) has reaped both completions.
    pub(super) fn submit_durable(ring: &mut IoUring, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        push_write_and_sync(ring, file, offset, bytes)?;
        // Queued now, so in flight whatever this says: a submission refused here is made
        // again by the wait (`reap_both`), which reports what became of them.
        let _ = ring.submit();
        Ok(())
    }

    fn push_write_and_sync(ring: &mut IoUring, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let fd = types::Fd(file.as_raw_fd());
        let chunk = &bytes[..bytes.len().min(WRITE_CHUNK_MAX_BYTES)];
        let chunk_len = u32::try_from(chunk.len()).expect("chunk is bounded below u32::MAX");
        let write = opcode::Write::new(fd, chunk.as_ptr(), chunk_len)
            .offset(offset)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(WRITE_ID);
        let sync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(SYNC_ID);
        // SAFETY: the callers keep the buffer `chunk` and the file alive until both
        // completions are reaped (`finish_durable`, or the writer's drop).
        unsafe {
            let mut queue = ring.submission();
            // Both or neither: a write queued without its sync would outlive the error.
            if queue.capacity() - queue.len() < 2 {
                return Err(io::Error::other("io_uring submission queue full"));
            }
            queue.push(&write).map_err(|_| io::Error::other("io_uring submission queue full"))?;
            queue.push(&sync).map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        Ok(())
    }

    /// Waits for the write and fdatasync [`submit_durable`] queued; a short write is
    /// continued (written and synced again) until all of `bytes` is durable.
    pub(super) fn finish_durable(ring: &mut IoUring, file: &File, offset: u64, bytes: &[u8]) -> Finished {
        let mut written = 0usize;
        loop {
            if written > 0 {
                if let Err(error) = push_write_and_sync(ring, file, offset + written as u64, &bytes[written..]) {
                    return Finished::Done(Err(error)); // nothing queued
                }
            }
            let (write_res, sync_res) = match reap_both(ring) {
                Ok(results) => results,
                Err(error) => return Finished::Abandoned(error),
            };
            if write_res < 0 {
                return Finished::Done(Err(io::Error::from_raw_os_error(-write_res)));
            }
            if write_res == 0 {
                return Finished::Done(Err(io::Error::new(io::ErrorKind::WriteZero, "io_uring write wrote nothing")));
            }
            written += write_res as usize;
            if written < bytes.len() {
                continue; // short write: the sync was cancelled; write the rest.
            }
            if sync_res < 0 {
                return Finished::Done(Err(io::Error::from_raw_os_error(-sync_res)));
            }
            return Finished::Done(Ok(()));
        }
    }
}
