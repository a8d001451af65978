//! A log writer that batches lines and writes them from a background thread on a timer.
//!
//! The usual non-blocking writer hands every line to a worker thread through a channel and
//! wakes it: one context switch per request, which on a busy core costs more than formatting
//! the line. Here a line is appended to a shared buffer under an uncontended lock, and the
//! flusher thread writes whatever accumulated every `interval` (as Envoy's access log does).
//! A buffer that grows past `MAX_BUFFER_BYTES` is written by the thread that filled it, so a
//! burst cannot grow memory without bound. Lines are lost only if the process dies before the
//! next flush; dropping the [`LogGuard`] flushes the rest.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

const MAX_BUFFER_BYTES: usize = 1024 * 1024;

type Sink = Box<dyn Write + Send>;

struct Shared {
    buffer: Mutex<Vec<u8>>,
    /// Serialises writes to the sink, so batches never interleave.
    sink: Mutex<Sink>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn buffer(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self) {
        let batch = std::mem::take(&mut *self.buffer());
        if batch.is_empty() {
            return;
        }
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        // A closed or full log destination must not take the gateway down; the lines are lost.
        let _ignored = sink.write_all(&batch).and_then(|()| sink.flush());
    }
}

/// `MakeWriter` for tracing-subscriber.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Keeps the flusher running; dropping it stops the thread and flushes what is left.
pub struct LogGuard {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

impl BatchedWriter {
    pub fn new(sink: impl Write + Send + 'static, interval: Duration) -> (Self, LogGuard) {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Vec::with_capacity(64 * 1024)),
            sink: Mutex::new(Box::new(sink)),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let flusher_shared = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || {
                let shared = flusher_shared;
                let mut stopped = shared.stop.lock().unwrap_or_else(PoisonError::into_inner);
                while !*stopped {
                    stopped = shared
                        .wake
                        .wait_timeout(stopped, interval)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    shared.flush();
                }
            })
            .ok();
        (
            Self {
                shared: shared.clone(),
            },
            LogGuard { shared, flusher },
        )
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ignored = flusher.join();
        }
        self.shared.flush();
    }
}

/// One formatted event; tracing-subscriber writes each event with a single `write_all`.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut buffer = self.shared.buffer();
            buffer.extend_from_slice(bytes);
            buffer.len() >= MAX_BUFFER_BYTES
        };
        if full {
            self.shared.flush();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_by_the_flusher_and_on_drop() {
        let capture = Capture::default();
        let (writer, guard) = BatchedWriter::new(capture.clone(), Duration::from_millis(10));
        writer.make_writer().write_all(b"one\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while capture.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "flusher never wrote");
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.make_writer().write_all(b"two\n").unwrap();
        drop(guard);
        assert_eq!(&capture.0.lock().unwrap()[..], b"one\ntwo\n");
    }

    #[test]
    fn a_full_buffer_is_written_at_once() {
        let capture = Capture::default();
        let (writer, _guard) = BatchedWriter::new(capture.clone(), Duration::from_secs(3600));
        let line = vec![b'x'; 1024];
        for _ in 0..(MAX_BUFFER_BYTES / 1024) {
            writer.make_writer().write_all(&line).unwrap();
        }
        assert_eq!(capture.0.lock().unwrap().len(), MAX_BUFFER_BYTES);
    }
}
