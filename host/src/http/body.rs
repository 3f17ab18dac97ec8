//! Request bodies: read only after admission, capped per function, and bounded node-wide.
//!
//! Every byte of a request body the node holds is reserved from one [`BodyBudget`] as
//! it arrives and until the request ends, so `max_connections` × `max_body_size` can
//! never all be in memory at once: a body that would take the node past its budget is
//! turned away with 503 while it arrives.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The node-wide budget for request bodies held at once, by default.
pub const DEFAULT_BODY_BUDGET: u64 = 512 << 20;

/// The budget's unit: permits are KiB, so a budget of terabytes still fits a semaphore.
const UNIT: u64 = 1024;

/// The bytes of request bodies the node may hold at once (all functions together).
#[derive(Clone, Debug)]
pub struct BodyBudget {
    units: Arc<Semaphore>,
    total: u64,
}

impl BodyBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        Self {
            units: Arc::new(Semaphore::new(units as usize)),
            total: units * UNIT,
        }
    }

    /// The budget, in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }

    /// Reserves `bytes` (rounded up to whole KiB) until the permit drops, or `None`
    /// when the budget does not have them now.
    pub fn try_reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).ok()?;
        Arc::clone(&self.units).try_acquire_many_owned(units).ok()
    }

    /// Bytes reserved by bodies now held.
    pub fn held(&self) -> u64 {
        self.total - self.units.available_permits() as u64 * UNIT
    }
}

/// Why a body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// Larger than the function's `max_body_size`.
    TooLarge,
    /// The node holds as many body bytes as its budget allows.
    OverBudget,
    /// The connection failed while the body was read.
    Read(String),
}

/// A body read into memory, with the part of the budget it holds.
pub struct HeldBody {
    pub bytes: Bytes,
    /// Released when the request ends.
    pub reservation: Option<OwnedSemaphorePermit>,
}

/// Reads `body` (at most `limit` bytes, `declared` from its content-length if any),
/// reserving from `budget` as it arrives.
pub async fn read<B>(
    body: B,
    declared: Option<u64>,
    limit: u64,
    budget: &BodyBudget,
) -> Result<HeldBody, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut reservation: Option<OwnedSemaphorePermit> = None;
    let mut reserved_units = 0_u64;
    let mut reserve = |bytes: u64| -> Result<(), BodyError> {
        let needed = bytes.div_ceil(UNIT);
        if needed <= reserved_units {
            return Ok(());
        }
        let more = u32::try_from(needed - reserved_units).map_err(|_| BodyError::OverBudget)?;
        let permit = Arc::clone(&budget.units)
            .try_acquire_many_owned(more)
            .map_err(|_| BodyError::OverBudget)?;
        match &mut reservation {
            Some(held) => held.merge(permit),
            None => reservation = Some(permit),
        }
        reserved_units = needed;
        Ok(())
    };
    // A declared length that does not fit what is left is refused before any of it is
    // read; one that fits is reserved only as its bytes arrive, so headers alone hold
    // nothing. The buffer is allocated at its declared size once (address space: its
    // pages are only touched as bytes land).
    let capacity = declared.unwrap_or(0).min(limit);
    if capacity > budget.available() {
        return Err(BodyError::OverBudget);
    }
    let mut buffer = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // Trailers: not passed on.
        };
        let len = buffer.len() as u64 + data.len() as u64;
        if len > limit {
            return Err(BodyError::TooLarge);
        }
        reserve(len)?;
        buffer.extend_from_slice(&data);
    }
    Ok(HeldBody {
        bytes: buffer.freeze(),
        reservation,
    })
}

#[cfg(test)]
mod tests {
    use super::BodyBudget;

    #[test]
    fn a_budget_counts_in_whole_kib_and_at_least_one() {
        assert_eq!(BodyBudget::new(0).total(), 1024);
        assert_eq!(BodyBudget::new(4097).total(), 4096);
        assert_eq!(BodyBudget::new(u64::MAX).held(), 0);
    }
}
