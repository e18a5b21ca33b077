//! This server's clock, stamped on the commands it proposes (the entry carries it, so every
//! server applies the same time) and used to judge token expiry.

use std::time::{SystemTime, UNIX_EPOCH};

use tessera_core::Timestamp;

/// Now, in Unix milliseconds.
pub fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
}
