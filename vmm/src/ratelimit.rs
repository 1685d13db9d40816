//! Rate limiting for log lines a guest can trigger, so a hostile guest cannot flood the host log.
//!
//! Each call site of [`guest_warn!`](crate::guest_warn) owns a [`RateLimiter`] that lets
//! [`LOG_BURST`] lines through per [`LOG_WINDOW`] and counts the rest; the next line that passes
//! reports how many were suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines allowed per window and call site.
pub const LOG_BURST: u32 = 10;
/// Length of one rate-limiting window.
pub const LOG_WINDOW: Duration = Duration::from_secs(5);

/// A per-call-site window counter.
#[derive(Debug)]
pub struct RateLimiter {
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    /// A limiter that has not seen any line yet.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(None),
        }
    }

    /// Returns `Some(suppressed)` if a line may be logged now, with the count of lines dropped
    /// since the last one that passed; `None` if this line must be dropped.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, count, dropped) = guard.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= LOG_WINDOW {
            *start = now;
            *count = 0;
        }
        if *count < LOG_BURST {
            *count += 1;
            Some(std::mem::take(dropped))
        } else {
            *dropped += 1;
            None
        }
    }
}

/// `tracing::warn!` for guest-triggerable conditions, rate limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            if suppressed > 0 {
                tracing::warn!(suppressed, "guest-triggered warnings were rate limited");
            }
            tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_drop_then_report() {
        let l = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(l.allow_at(t0), Some(0));
        }
        assert_eq!(l.allow_at(t0), None);
        assert_eq!(l.allow_at(t0), None);
        assert_eq!(l.allow_at(t0 + LOG_WINDOW), Some(2));
    }
}
