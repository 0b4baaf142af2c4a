//! Logging setup. (Credentials stay out of logs by their type: see `secret`.)
//!
//! Containers want one JSON object per line; people at a terminal want text. Nothing
//! logs per request at info level: at 5,000 requests a second that alone would cost a
//! core. Per-request facts go to `/metrics` instead. A request that fails on sluice's
//! side is warned about with its request id, through a [`Sampler`].

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests, subcommands) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Lets at most `per_second` warnings through in each wall-clock second and counts the
/// rest, so that the next one let through can say how many were left out, and since when
/// (that may be long after, when an outage ended). A dependency outage fails thousands of
/// requests a second: a line for each would flood the logs, and cost CPU, exactly when
/// they are read.
pub struct Sampler {
    per_second: u32,
    state: Mutex<SamplerState>,
}

struct SamplerState {
    second: u64,
    passed: u32,
    left_out: LeftOut,
}

/// Warnings left out before one let through: how many, and the second of the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeftOut {
    pub count: u64,
    pub since_s: u64,
}

impl Sampler {
    pub const fn new(per_second: u32) -> Sampler {
        Sampler {
            per_second,
            state: Mutex::new(SamplerState {
                second: 0,
                passed: 0,
                left_out: LeftOut {
                    count: 0,
                    since_s: 0,
                },
            }),
        }
    }

    /// `Some(what was left out before this one)` when this warning may be logged at
    /// `now_s` (Unix seconds), `None` when not.
    pub fn admit(&self, now_s: u64) -> Option<LeftOut> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.second != now_s {
            s.second = now_s;
            s.passed = 0;
        }
        if s.passed >= self.per_second {
            if s.left_out.count == 0 {
                s.left_out.since_s = now_s;
            }
            s.left_out.count += 1;
            return None;
        }
        s.passed += 1;
        Some(std::mem::take(&mut s.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::{LeftOut, Sampler};

    #[test]
    fn a_burst_is_cut_to_the_rate_and_the_next_line_counts_what_was_left_out() {
        let none = LeftOut::default();
        let s = Sampler::new(2);
        assert_eq!(s.admit(10), Some(none));
        assert_eq!(s.admit(10), Some(none));
        assert_eq!(s.admit(10), None);
        assert_eq!(s.admit(10), None);
        // A new second: the first line carries the two left out, and when they began.
        let two = LeftOut {
            count: 2,
            since_s: 10,
        };
        assert_eq!(s.admit(11), Some(two));
        assert_eq!(s.admit(11), Some(none));
        assert_eq!(s.admit(11), None);
        // Long after, the count still says when it began.
        let one = LeftOut {
            count: 1,
            since_s: 11,
        };
        assert_eq!(s.admit(90_000), Some(one));
    }
}
