//! Logging setup, and the one function that keeps credentials out of logs.
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

/// Replaces the password in a `scheme://user:password@host` URL with `***`, so a URL can
/// be logged or shown in `/api/cache/status` without leaking the credential.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end]
        .rfind('@')
        .map(|i| scheme_end + i)
    else {
        return url.to_string();
    };
    let userinfo = &url[scheme_end..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    format!("{}{}:***{}", &url[..scheme_end], user, &url[at..])
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_survive() {
        assert_eq!(
            redact("mongodb://admin:s3cr%40t@mongo:27017/assessmentdb?authSource=admin"),
            "mongodb://admin:***@mongo:27017/assessmentdb?authSource=admin"
        );
        assert_eq!(
            redact("redis://:hunter2@redis:6379"),
            "redis://:***@redis:6379"
        );
        assert_eq!(
            redact("mongodb://mongo:27017/db"),
            "mongodb://mongo:27017/db"
        );
    }
}
