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
/// rest, so that the next one let through can say how many were left out. A dependency
/// outage fails thousands of requests a second: a line for each would flood the logs,
/// and cost CPU, exactly when they are read.
pub struct Sampler {
    per_second: u32,
    /// (the second, warnings let through in it, warnings left out since the last one).
    state: Mutex<(u64, u32, u64)>,
}

impl Sampler {
    pub const fn new(per_second: u32) -> Sampler {
        Sampler {
            per_second,
            state: Mutex::new((0, 0, 0)),
        }
    }

    /// `Some(left out before this one)` when this warning may be logged, `None` when not.
    pub fn admit(&self, now_s: u64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 != now_s {
            *s = (now_s, 0, s.2);
        }
        if s.1 >= self.per_second {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
        Some(std::mem::take(&mut s.2))
    }
}

#[cfg(test)]
mod tests {
    use super::Sampler;

    #[test]
    fn a_burst_is_cut_to_the_rate_and_the_next_line_counts_what_was_left_out() {
        let s = Sampler::new(2);
        assert_eq!(s.admit(10), Some(0));
        assert_eq!(s.admit(10), Some(0));
        assert_eq!(s.admit(10), None);
        assert_eq!(s.admit(10), None);
        // A new second: the first line carries the two left out.
        assert_eq!(s.admit(11), Some(2));
        assert_eq!(s.admit(11), Some(0));
        assert_eq!(s.admit(11), None);
        assert_eq!(s.admit(13), Some(1));
    }
}
