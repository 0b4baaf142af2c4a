//! Logging setup. (Credentials stay out of logs by their type: see `secret`.)
//!
//! Containers want one JSON object per line; people at a terminal want text. Nothing
//! logs per request at info level: at 5,000 requests a second that alone would cost a
//! core. Per-request facts go to `/metrics` instead.

use std::io::IsTerminal;

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
