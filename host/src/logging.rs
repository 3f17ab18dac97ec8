//! The host's log: records go to stderr, and a record that cannot be written (the
//! reader of a pipe went away, a full disk) is dropped and counted, never a panic.
//! Guest output shares a node-wide rate budget on top of each request's own.

use std::sync::Mutex;
use std::time::Instant;

use crate::ops::metrics::metrics;

/// Guest output the node logs per second, all functions together (sustained).
pub const GUEST_LOG_RATE: u64 = 1 << 20;

/// Guest output the node logs in a burst above [`GUEST_LOG_RATE`].
pub const GUEST_LOG_BURST: u64 = 4 << 20;

/// How log records are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per record (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, the
    /// current spans), for log shippers.
    Json,
}

/// Installs the `tracing` subscriber: `filter` decides what is logged.
pub fn init(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr)
        // Its own report of a failed write goes to stderr with `eprintln!`, which
        // panics when stderr is the broken pipe: the writer counts instead.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// stderr, where a failed write drops the record.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            metrics().log_records_dropped.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Takes `bytes` of guest output from the node-wide budget (a token bucket of
/// [`GUEST_LOG_RATE`] per second, [`GUEST_LOG_BURST`] deep); `false` when it is spent
/// (the bytes are counted as dropped).
pub fn take_guest_budget(bytes: usize) -> bool {
    static BUCKET: Mutex<Option<(f64, Instant)>> = Mutex::new(None);
    let mut bucket = BUCKET
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    let (tokens, last) = bucket.get_or_insert((GUEST_LOG_BURST as f64, now));
    let refill = now.duration_since(*last).as_secs_f64() * GUEST_LOG_RATE as f64;
    *tokens = (*tokens + refill).min(GUEST_LOG_BURST as f64);
    *last = now;
    if *tokens >= bytes as f64 {
        *tokens -= bytes as f64;
        true
    } else {
        metrics().guest_log_bytes_dropped.inc_by(bytes as u64);
        false
    }
}
