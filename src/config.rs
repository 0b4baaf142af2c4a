//! Every setting sluice reads, in one place.
//!
//! Each flag can also be set by the environment variable of the same name in upper case,
//! because that is how Kubernetes and the local lab hand settings over. Anything clap can
//! check on its own (numbers, ranges, enums) is checked there; what spans several settings
//! is checked in [`Config::validate`]. Either way a bad value stops the process at start
//! with exit code 2 and a message that names the setting, instead of surfacing later as
//! a confusing runtime error under load.

use std::net::IpAddr;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// Command line: `sluice` serves; the subcommands are operator tools.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default when no subcommand is given).
    Serve,
    /// Connect to MongoDB and Redis with these settings and print what was found.
    Check,
    /// Print a running instance's caches, writer and budget, readably.
    Status {
        /// Base URL of the running instance.
        #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8000")]
        url: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for containers and log shippers.
    Json,
}

/// The `w` of the write concern used for every insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteAck {
    Nodes(u32),
    Majority,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// MongoDB connection string; its path names the database (default assessmentdb).
    #[arg(long, env = "MONGO_URI", default_value = "mongodb://mongo:27017/assessmentdb", value_parser = parse_mongo_uri)]
    pub mongo_uri: String,

    /// Redis URL for the shared cache tier, the refresh lock and pod heartbeats.
    #[arg(long, env = "REDIS_URL", default_value = "redis://redis:6379", value_parser = parse_redis_url)]
    pub redis_url: String,

    /// Address to listen on.
    #[arg(long, env = "APP_HOST", default_value = "0.0.0.0")]
    pub app_host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "APP_PORT", default_value_t = 8000)]
    pub app_port: u16,

    /// This instance's name in the pod heartbeat set (Kubernetes: the pod name). Defaults
    /// to the host name plus the process id.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// MongoDB commands per second the whole cluster may send (reads, writes, stats and
    /// pings). Each pod takes an equal share of the live pods counted in Redis.
    #[arg(long, env = "DB_COMMAND_BUDGET", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub db_command_budget: u32,

    /// Pods assumed to share the budget while Redis cannot be reached. Set it to the
    /// autoscaler's maximum so a Redis outage can never push the database over its cap.
    #[arg(long, env = "BUDGET_FALLBACK_PODS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub budget_fallback_pods: u32,

    /// Write concern `w`: a number of nodes or `majority`.
    #[arg(long, env = "WRITE_CONCERN_W", default_value = "1", value_parser = parse_write_ack)]
    pub write_concern_w: WriteAck,

    /// Write concern `j`: acknowledge inserts only once they are in the on-disk journal.
    #[arg(long, env = "WRITE_JOURNAL", default_value_t = true, action = ArgAction::Set)]
    pub write_journal: bool,

    /// Most documents in one insert command.
    #[arg(long, env = "BATCH_MAX_DOCS", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(5..=100_000))]
    pub batch_max_docs: u32,

    /// How long the first document of a batch waits for others before the batch is sent.
    #[arg(long, env = "BATCH_LINGER_MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub batch_linger_ms: u64,

    /// Requests whose documents may wait in the write queue (each holds 5 documents).
    #[arg(long, env = "QUEUE_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub queue_capacity: u32,

    /// How long a request waits for room in a full write queue before it is shed with 503.
    #[arg(long, env = "ENQUEUE_TIMEOUT_MS", default_value_t = 100)]
    pub enqueue_timeout_ms: u64,

    /// How long the writer keeps retrying a request's documents before answering 503.
    #[arg(long, env = "WRITE_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=120_000))]
    pub write_timeout_ms: u64,

    /// Insert commands one pod may have in flight at once.
    #[arg(long, env = "FLUSH_CONCURRENCY", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub flush_concurrency: u32,

    /// Age after which a cached read is refreshed in the background (served meanwhile).
    #[arg(long, env = "CACHE_FRESH_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_fresh_ms: u64,

    /// Age after which a cached read is no longer served at all.
    #[arg(long, env = "CACHE_STALE_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_stale_ms: u64,

    /// How long an empty result (no documents yet) stays fresh.
    #[arg(long, env = "CACHE_EMPTY_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_empty_ms: u64,

    /// Time limit of one MongoDB command, server selection and connecting included; also
    /// how long a request waits for its reads before it is answered 503.
    #[arg(long, env = "DB_TIMEOUT_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub db_timeout_ms: u64,

    /// Time limit of one Redis command; past it the tier counts as an error and is skipped.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_timeout_ms: u64,

    /// Open client connections at most; past it a connection gets 503 and is closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A client must send its whole request head within this time.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,

    /// Bound on the whole shutdown (Kubernetes' grace period must be longer).
    #[arg(long, env = "DRAIN_TIMEOUT_SECS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub drain_timeout_secs: u64,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `sluice=debug,info`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,

    /// Comparison tool only: behave like the naive service (5 single inserts and 5 reads
    /// per request straight to MongoDB, no cache, no coalescing, no budget).
    #[arg(long, env = "NAIVE_MODE", default_value_t = false, action = ArgAction::Set)]
    pub naive_mode: bool,
}

/// A setting whose value cannot work together with another.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks what clap cannot: relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cache_stale_ms < self.cache_fresh_ms {
            return Err(ConfigError(format!(
                "CACHE_STALE_MS ({}) must be at least CACHE_FRESH_MS ({})",
                self.cache_stale_ms, self.cache_fresh_ms
            )));
        }
        if self.enqueue_timeout_ms >= self.write_timeout_ms {
            return Err(ConfigError(format!(
                "ENQUEUE_TIMEOUT_MS ({}) must be below WRITE_TIMEOUT_MS ({})",
                self.enqueue_timeout_ms, self.write_timeout_ms
            )));
        }
        Ok(())
    }

    pub fn db_timeout(&self) -> Duration {
        Duration::from_millis(self.db_timeout_ms)
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// The name this instance uses in the shared pod set.
    pub fn pod_name(&self) -> String {
        self.pod_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

fn parse_mongo_uri(s: &str) -> Result<String, String> {
    if s.starts_with("mongodb://") || s.starts_with("mongodb+srv://") {
        Ok(s.to_string())
    } else {
        Err("must start with mongodb:// or mongodb+srv://".into())
    }
}

fn parse_redis_url(s: &str) -> Result<String, String> {
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
        return Err("must start with redis:// or rediss://".into());
    }
    fred::types::config::Config::from_url(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a Redis URL: {}", e.details()))
}

fn parse_write_ack(s: &str) -> Result<WriteAck, String> {
    if s == "majority" {
        return Ok(WriteAck::Majority);
    }
    s.parse::<u32>()
        .map(WriteAck::Nodes)
        .map_err(|_| "must be a number of nodes or `majority`".into())
}

fn parse_log_level(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_cluster() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.config.mongo_uri, "mongodb://mongo:27017/assessmentdb");
        assert_eq!(cli.config.app_port, 8000);
        assert_eq!(cli.config.db_command_budget, 50);
        assert_eq!(cli.config.write_concern_w, WriteAck::Nodes(1));
        assert!(cli.config.write_journal);
        cli.config.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = parse(&["--mongo-uri", "postgres://x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MONGO_URI"), "{err}");
        let err = parse(&["--write-concern-w", "most"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("WRITE_CONCERN_W"), "{err}");
        let cli = parse(&["--cache-fresh-ms", "9000", "--cache-stale-ms", "10"]).unwrap();
        let err = cli.config.validate().unwrap_err().to_string();
        assert!(err.contains("CACHE_STALE_MS"), "{err}");
    }
}
