//! W3C Trace Context (`traceparent`): a request keeps the trace its client started
//! (or starts one), gets a span id of its own, and its guest's outbound requests carry
//! `traceparent` with that span as their parent.

use std::sync::atomic::{AtomicU64, Ordering};

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// One request's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: [u8; 16],
    /// This request's span.
    pub span_id: [u8; 8],
    /// The client's span, when it sent one.
    pub parent_id: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// The context of a request that carried `header` (a `traceparent` value): the
    /// same trace with a new span, or a new trace when the header is absent or invalid.
    pub fn for_request(header: Option<&str>) -> Self {
        match header.and_then(parse) {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                span_id: span_id(),
                parent_id: Some(parent),
                flags,
            },
            None => {
                let mut trace_id = [0; 16];
                trace_id[..8].copy_from_slice(&random().to_be_bytes());
                trace_id[8..].copy_from_slice(&random().to_be_bytes());
                Self {
                    trace_id,
                    span_id: span_id(),
                    parent_id: None,
                    flags: 1,
                }
            }
        }
    }

    /// The trace id in hex.
    pub fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The `traceparent` of a request made on behalf of this one (its parent: this span).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

/// `(trace id, parent span id, flags)` of a valid `traceparent` value: version `00`
/// (or a later version's first four fields), lowercase hex, ids not all zeros.
pub fn parse(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim();
    let mut parts = value.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2) || version == "ff" || !lower_hex(trace, 32) || !lower_hex(parent, 16)
    {
        return None;
    }
    // Version 00 has exactly four fields; a later one may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !lower_hex(flags, 2) {
        return None;
    }
    let mut trace_id = [0; 16];
    let mut parent_id = [0; 8];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(parent, &mut parent_id).ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, parent_id, flags))
}

fn span_id() -> [u8; 8] {
    loop {
        let id = random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A 64-bit value no other request of this process gets (SplitMix64 over a counter
/// seeded per process): ids, not secrets.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    let mut z = seed.wrapping_add(
        STATE
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_trace_is_kept_with_a_new_span() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::for_request(Some(header));
        assert_eq!(t.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent_id.map(hex::encode).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_ne!(hex::encode(t.span_id), "00f067aa0ba902b7");
        let child = t.traceparent();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_eq!(parse(&child).map(|p| p.1), Some(t.span_id));
    }

    #[test]
    fn invalid_headers_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
            let t = TraceContext::for_request(Some(bad));
            assert_eq!(t.parent_id, None);
        }
        // A later version may carry more fields.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
        let (a, b) = (
            TraceContext::for_request(None),
            TraceContext::for_request(None),
        );
        assert_ne!(a.trace_id, b.trace_id);
    }
}
