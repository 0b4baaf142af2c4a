//! Every setting sluice reads, in one place, grouped by the component that uses it.
//!
//! Each flag can also be set by the environment variable of the same name in upper case,
//! because that is how Kubernetes and the local lab hand settings over. Durations are
//! parsed straight into [`Duration`]s (the flags keep their `_MS` names), and each
//! component is handed only its own group, so no component can come to depend on a
//! setting it should not know about.
//!
//! Anything clap can check on its own (numbers, ranges, enums) is checked there; what
//! spans several settings, and the two URLs, are checked in [`Config::validate`]. The
//! URLs are checked there rather than by clap because clap's error quotes the rejected
//! value, which for a URL can hold a password. Either way a bad value stops the process
//! at start with exit code 2 and a message that names the setting.

use std::net::IpAddr;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::secret::SecretUrl;

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
        /// Print the status as JSON (the `/api/cache/status` shape plus hit ratios).
        #[arg(long)]
        json: bool,
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

/// A duration flag given in milliseconds, range-checked by clap.
macro_rules! millis {
    ($range:expr) => {
        clap::value_parser!(u64)
            .range($range)
            .map(Duration::from_millis)
    };
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub store: StoreSettings,
    #[command(flatten)]
    pub shared: SharedSettings,
    #[command(flatten)]
    pub budget: BudgetSettings,
    #[command(flatten)]
    pub writes: WriteSettings,
    #[command(flatten)]
    pub reads: ReadSettings,
    #[command(flatten)]
    pub log: LogSettings,

    /// Comparison tool only: behave like the naive service (5 single inserts and 5 reads
    /// per request straight to MongoDB, no cache, no coalescing, no budget).
    #[arg(long, env = "NAIVE_MODE", default_value_t = false, action = ArgAction::Set)]
    pub naive_mode: bool,
}

/// The HTTP server: where it listens and how it protects itself from its clients.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server")]
pub struct ServerSettings {
    /// Address to listen on.
    #[arg(long, env = "APP_HOST", default_value = "0.0.0.0")]
    pub app_host: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "APP_PORT", default_value_t = 8000)]
    pub app_port: u16,

    /// Open client connections at most; past it a connection gets 503 and is closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A client must send its whole request head within this time.
    #[arg(long = "header-read-timeout-ms", env = "HEADER_READ_TIMEOUT_MS", default_value = "5000", value_parser = millis!(1..))]
    pub header_read_timeout: Duration,

    /// A client must take some of its response within this time, or its connection is
    /// closed: hyper itself has no write timeout, so a client that never reads would
    /// hold its connection slot for ever.
    #[arg(long = "write-progress-timeout-ms", env = "WRITE_PROGRESS_TIMEOUT_MS", default_value = "10000", value_parser = millis!(100..=600_000))]
    pub write_progress_timeout: Duration,

    /// Bound on the whole shutdown (Kubernetes' grace period must be longer).
    #[arg(long = "drain-timeout-secs", env = "DRAIN_TIMEOUT_SECS", default_value = "25", value_parser = clap::value_parser!(u64).range(1..=3600).map(Duration::from_secs))]
    pub drain_timeout: Duration,
}

/// MongoDB: where it is and what an acknowledged write means.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "MongoDB")]
pub struct StoreSettings {
    /// MongoDB connection string; its path names the database (default assessmentdb).
    #[arg(long, env = "MONGO_URI", default_value = "mongodb://mongo:27017/assessmentdb", value_parser = SecretUrl::parse_arg)]
    pub mongo_uri: SecretUrl,

    /// Time limit of one MongoDB command, server selection and connecting included; also
    /// how long a request waits for its reads before it is answered 503.
    #[arg(long = "db-timeout-ms", env = "DB_TIMEOUT_MS", default_value = "3000", value_parser = millis!(10..=600_000))]
    pub db_timeout: Duration,

    /// Write concern `w`: a number of nodes (at least 1) or `majority`.
    #[arg(long, env = "WRITE_CONCERN_W", default_value = "1", value_parser = parse_write_ack)]
    pub write_concern_w: WriteAck,

    /// Write concern `j`: acknowledge inserts only once they are in the on-disk journal.
    #[arg(long, env = "WRITE_JOURNAL", default_value_t = true, action = ArgAction::Set)]
    pub write_journal: bool,
}

/// Redis: the shared cache tier, the refresh lock and the cluster's command schedule.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Redis")]
pub struct SharedSettings {
    /// Redis URL for the shared cache tier, the refresh lock and the command schedule.
    #[arg(long, env = "REDIS_URL", default_value = "redis://redis:6379", value_parser = SecretUrl::parse_arg)]
    pub redis_url: SecretUrl,

    /// Time limit of one Redis command; past it the tier counts as an error and is skipped.
    #[arg(long = "redis-timeout-ms", env = "REDIS_TIMEOUT_MS", default_value = "200", value_parser = millis!(1..=60_000))]
    pub redis_timeout: Duration,
}

/// The cluster-wide database command budget.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Budget")]
pub struct BudgetSettings {
    /// MongoDB commands per second the whole cluster may send (reads, writes, stats and
    /// pings). Every command takes its token from one schedule in Redis.
    #[arg(long, env = "DB_COMMAND_BUDGET", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub db_command_budget: u32,

    /// A pod that cannot reach Redis spends `DB_COMMAND_BUDGET / BUDGET_FALLBACK_PODS`.
    /// Set it to at least the autoscaler's maximum plus the rollout's surge, so a Redis
    /// outage for every pod can never push the database over its cap.
    #[arg(long, env = "BUDGET_FALLBACK_PODS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub budget_fallback_pods: u32,

    /// This instance's name in its status, refresh-lock tokens and logs (Kubernetes: the
    /// pod name). Defaults
    /// to the host name plus the process id.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
}

/// The write path: queue, batches and their deadlines.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = "Writes")]
pub struct WriteSettings {
    /// Most documents in one insert command.
    #[arg(long = "batch-max-docs", env = "BATCH_MAX_DOCS", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(5..=100_000).map(|n| n as usize))]
    pub batch_max_docs: usize,

    /// How long the first document of a batch waits for others before the batch is sent.
    #[arg(long = "batch-linger-ms", env = "BATCH_LINGER_MS", default_value = "5", value_parser = millis!(0..=10_000))]
    pub linger: Duration,

    /// Requests whose documents may wait in the write queue (each holds 5 documents).
    #[arg(long = "queue-capacity", env = "QUEUE_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
    pub queue_capacity: usize,

    /// How long a request waits for room in a full write queue before it is shed with 503.
    #[arg(long = "enqueue-timeout-ms", env = "ENQUEUE_TIMEOUT_MS", default_value = "100", value_parser = millis!(0..=600_000))]
    pub enqueue_timeout: Duration,

    /// How long the writer keeps retrying a request's documents before answering 503.
    #[arg(long = "write-timeout-ms", env = "WRITE_TIMEOUT_MS", default_value = "5000", value_parser = millis!(100..=120_000))]
    pub write_timeout: Duration,

    /// Insert commands one pod may have in flight at once.
    #[arg(long = "flush-concurrency", env = "FLUSH_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64).map(|n| n as usize))]
    pub flush_concurrency: usize,
}

/// The read cache's ages.
#[derive(Debug, Clone, Copy, Args)]
#[command(next_help_heading = "Reads")]
pub struct ReadSettings {
    /// Age after which a cached read is refreshed in the background (served meanwhile).
    #[arg(long = "cache-fresh-ms", env = "CACHE_FRESH_MS", default_value = "5000", value_parser = millis!(1..))]
    pub fresh: Duration,

    /// Age after which a cached read is no longer served at all.
    #[arg(long = "cache-stale-ms", env = "CACHE_STALE_MS", default_value = "60000", value_parser = millis!(1..))]
    pub stale: Duration,

    /// How long an empty result (no documents yet) stays fresh.
    #[arg(long = "cache-empty-ms", env = "CACHE_EMPTY_MS", default_value = "250", value_parser = millis!(1..))]
    pub empty: Duration,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogSettings {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `sluice=debug,info`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,
}

/// A setting whose value cannot work, alone or together with another.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks what clap cannot: the URLs (without quoting them) and relations between
    /// settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store
            .mongo_uri
            .check_scheme(&["mongodb", "mongodb+srv"])
            .map_err(|e| ConfigError(format!("MONGO_URI ({}) {e}", self.store.mongo_uri)))?;
        self.shared
            .redis_url
            .check_scheme(&["redis", "rediss"])
            .and_then(|()| {
                fred::types::config::Config::from_url(self.shared.redis_url.expose())
                    .map(|_| ())
                    .map_err(|e| format!("is not a Redis URL: {}", e.details()))
            })
            .map_err(|e| ConfigError(format!("REDIS_URL ({}) {e}", self.shared.redis_url)))?;
        if self.reads.stale < self.reads.fresh {
            return Err(ConfigError(format!(
                "CACHE_STALE_MS ({}) must be at least CACHE_FRESH_MS ({})",
                self.reads.stale.as_millis(),
                self.reads.fresh.as_millis()
            )));
        }
        if self.writes.enqueue_timeout >= self.writes.write_timeout {
            return Err(ConfigError(format!(
                "ENQUEUE_TIMEOUT_MS ({}) must be below WRITE_TIMEOUT_MS ({})",
                self.writes.enqueue_timeout.as_millis(),
                self.writes.write_timeout.as_millis()
            )));
        }
        Ok(())
    }

    /// The name this instance goes by in its status and refresh-lock tokens.
    pub fn pod_name(&self) -> String {
        self.budget.pod_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

/// `w: 0` is refused: with it the database acknowledges nothing, so a 200 would no longer
/// mean the documents are stored.
fn parse_write_ack(s: &str) -> Result<WriteAck, String> {
    if s == "majority" {
        return Ok(WriteAck::Majority);
    }
    match s.parse::<u32>() {
        Ok(0) => Err(
            "0 acknowledges nothing, so a 200 would not mean stored; use 1 or more, or `majority`"
                .into(),
        ),
        Ok(n) => Ok(WriteAck::Nodes(n)),
        Err(_) => Err("must be a number of nodes or `majority`".into()),
    }
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
        assert_eq!(
            cli.config.store.mongo_uri.expose(),
            "mongodb://mongo:27017/assessmentdb"
        );
        assert_eq!(cli.config.server.app_port, 8000);
        assert_eq!(cli.config.budget.db_command_budget, 50);
        assert_eq!(cli.config.store.write_concern_w, WriteAck::Nodes(1));
        assert!(cli.config.store.write_journal);
        assert_eq!(cli.config.writes.linger, Duration::from_millis(5));
        cli.config.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cli = parse(&["--mongo-uri", "postgres://x"]).unwrap();
        let err = cli.config.validate().unwrap_err().to_string();
        assert!(err.contains("MONGO_URI"), "{err}");
        let err = parse(&["--write-concern-w", "most"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("WRITE_CONCERN_W"), "{err}");
        let cli = parse(&["--cache-fresh-ms", "9000", "--cache-stale-ms", "10"]).unwrap();
        let err = cli.config.validate().unwrap_err().to_string();
        assert!(err.contains("CACHE_STALE_MS"), "{err}");
    }

    #[test]
    fn unacknowledged_writes_are_refused() {
        let err = parse(&["--write-concern-w", "0"]).unwrap_err().to_string();
        assert!(err.contains("WRITE_CONCERN_W"), "{err}");
        assert!(err.contains("stored"), "{err}");
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        for (flag, value, setting) in [
            (
                "--redis-url",
                "redis://:hunter2@redis:99999999",
                "REDIS_URL",
            ),
            ("--redis-url", "http://:hunter2@redis", "REDIS_URL"),
            ("--mongo-uri", "postgres://u:hunter2@db", "MONGO_URI"),
        ] {
            let cli = parse(&[flag, value]).unwrap();
            let err = cli.config.validate().unwrap_err().to_string();
            assert!(err.contains(setting), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
