//! Each function's recent log: its guest's stdout and stderr lines and the host's
//! record of each request, in a bounded ring that `GET /v1/functions/<f>/logs` reads
//! and follows.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Records kept per function.
pub const MAX_RECORDS: usize = 2000;

/// Bytes of messages kept per function.
pub const MAX_BYTES: usize = 1 << 20;

/// One record.
#[derive(Debug, Clone, Serialize)]
pub struct LogRecord {
    /// Its number in the function's log (from 1, never reused while the node runs).
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// `stdout`, `stderr` or `request`.
    pub stream: &'static str,
    /// The request it belongs to.
    pub request_id: String,
    /// The guest's line (for `stdout` and `stderr`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The host's record of a request (for `request`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestRecord>,
}

/// What the host records of one request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Its method.
    pub method: String,
    /// Its path (the query left out: it may carry secrets).
    pub path: String,
    /// The status answered.
    pub status: u16,
    /// Milliseconds to the response head.
    pub latency_ms: f64,
    /// Bytes of the request body.
    pub bytes_in: u64,
    /// Bytes of the response body, where known up front.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// The W3C trace it belongs to (the client's, or one started for it).
    pub trace_id: String,
}

/// The longest request path kept in a record (the rest is cut off).
pub const MAX_LOGGED_PATH: usize = 1024;

impl LogRecord {
    /// What it counts for against [`MAX_BYTES`]: its strings and a fixed overhead.
    fn size(&self) -> usize {
        64 + self.request_id.len()
            + self.message.as_ref().map_or(0, String::len)
            + self
                .request
                .as_ref()
                .map_or(0, |r| r.method.len() + r.path.len() + r.trace_id.len())
    }
}

struct Ring {
    records: VecDeque<LogRecord>,
    bytes: usize,
    next: u64,
}

/// One function's ring.
pub struct LogRing {
    ring: Mutex<Ring>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for LogRing {
    fn default() -> Self {
        Self::new()
    }
}

impl LogRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self {
            ring: Mutex::new(Ring {
                records: VecDeque::new(),
                bytes: 0,
                next: 1,
            }),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    fn push(&self, mut record: LogRecord) {
        let size = record.size();
        let seq = {
            let mut ring = self
                .ring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            record.seq = ring.next;
            ring.next += 1;
            ring.bytes += size;
            ring.records.push_back(record);
            while ring.records.len() > MAX_RECORDS || ring.bytes > MAX_BYTES {
                let Some(old) = ring.records.pop_front() else {
                    break;
                };
                ring.bytes -= old.size();
            }
            ring.next - 1
        };
        self.changed.send_replace(seq);
    }

    /// Adds a line of guest output.
    pub fn line(&self, stream: &'static str, request_id: &str, message: String) {
        self.push(LogRecord {
            seq: 0,
            time_ms: crate::node::store::now_ms(),
            stream,
            request_id: request_id.to_owned(),
            message: Some(message),
            request: None,
        });
    }

    /// Adds the record of a request (its path cut to [`MAX_LOGGED_PATH`] bytes).
    pub fn request(&self, request_id: &str, mut record: RequestRecord) {
        if record.path.len() > MAX_LOGGED_PATH {
            let mut end = MAX_LOGGED_PATH;
            while !record.path.is_char_boundary(end) {
                end -= 1;
            }
            record.path.truncate(end);
            record.path.push_str("...");
        }
        self.push(LogRecord {
            seq: 0,
            time_ms: crate::node::store::now_ms(),
            stream: "request",
            request_id: request_id.to_owned(),
            message: None,
            request: Some(record),
        });
    }

    /// Records after `after` (a `seq`) and not older than `since_ms`, oldest first.
    pub fn read(&self, after: u64, since_ms: u64) -> Vec<LogRecord> {
        self.read_with_newest(after, since_ms).0
    }

    /// [`LogRing::read`], and the number of the newest record now (read together).
    pub fn read_with_newest(&self, after: u64, since_ms: u64) -> (Vec<LogRecord>, u64) {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let records = ring
            .records
            .iter()
            .filter(|r| r.seq > after && r.time_ms >= since_ms)
            .cloned()
            .collect();
        (records, ring.next - 1)
    }

    /// Wakes when a record is added.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// `records` as JSON lines.
pub fn json_lines(records: &[LogRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        if serde_json::to_writer(&mut out, record).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// How often a following stream with nothing new sends a blank line, so that a
/// client that went away is noticed (readers of JSON lines skip blank lines).
pub const FOLLOW_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// A response body: `first`, then each record added to `ring`, until `closed`
/// resolves (the node shuts down) or the client goes away.
/// `first` are the records already read, `newest` the ring's newest record number
/// when they were (and `after` what the client asked to skip).
pub fn follow(
    ring: std::sync::Arc<LogRing>,
    (first, newest, after): (&[LogRecord], u64, u64),
    closed: impl Future<Output = ()> + Send + 'static,
) -> crate::http::Body {
    use futures::StreamExt as _;
    use http_body_util::BodyExt as _;
    let last = newest.max(after);
    let changes = ring.subscribe();
    let head = futures::stream::iter((!first.is_empty()).then(|| json_lines(first)));
    let state = (ring, last, changes, Box::pin(closed));
    let tail = futures::stream::unfold(state, |(ring, last, mut changes, mut closed)| async move {
        loop {
            let records = ring.read(last, 0);
            if let Some(newest) = records.last() {
                let last = newest.seq;
                return Some((json_lines(&records), (ring, last, changes, closed)));
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return None },
                () = &mut closed => return None,
                () = tokio::time::sleep(FOLLOW_KEEPALIVE) => {
                    return Some((b"\n".to_vec(), (ring, last, changes, closed)));
                }
            }
        }
    });
    let stream = head.chain(tail).map(|chunk| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(chunk)))
    });
    http_body_util::StreamBody::new(stream)
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_ordered() {
        let ring = LogRing::new();
        for i in 0..(MAX_RECORDS + 10) {
            ring.line("stdout", "r", format!("line {i}"));
        }
        let all = ring.read(0, 0);
        assert_eq!(all.len(), MAX_RECORDS);
        assert_eq!(all[0].seq, 11);
        assert_eq!(all.last().map(|r| r.seq), Some((MAX_RECORDS + 10) as u64));
        assert_eq!(ring.read(MAX_RECORDS as u64 + 8, 0).len(), 2);
    }

    #[test]
    fn long_paths_are_cut_and_counted() {
        let ring = LogRing::new();
        for _ in 0..MAX_RECORDS {
            ring.request(
                "r",
                RequestRecord {
                    method: "GET".into(),
                    path: format!("/{}", "é".repeat(30_000)),
                    status: 200,
                    latency_ms: 1.0,
                    bytes_in: 0,
                    bytes_out: None,
                    trace_id: "0".repeat(32),
                },
            );
        }
        let kept = ring.read(0, 0);
        let path = &kept[0].request.as_ref().expect("a request").path;
        assert!(
            path.len() <= MAX_LOGGED_PATH + 3 && path.ends_with("..."),
            "{}",
            path.len()
        );
        let total: usize = kept.iter().map(LogRecord::size).sum();
        assert!(total <= MAX_BYTES, "{total}");
    }

    #[test]
    fn bytes_bound() {
        let ring = LogRing::new();
        for _ in 0..1000 {
            ring.line("stderr", "r", "x".repeat(4096));
        }
        let kept = ring.read(0, 0);
        assert!(kept.len() * 4096 <= MAX_BYTES, "{}", kept.len());
        assert!(!kept.is_empty());
    }
}
