//! sluice itself, started the way a test needs it: in-process on port 0 (most tests,
//! like zero2prod's `spawn_app`), or as the real binary where the process is the point
//! (exit codes, signals, its logs, its memory).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::doc;
use clap::Parser;
use serde_json::Value;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::servers::{free_port, wait_child, wait_for_port, Mongo, Proc, Redis};

/// Settings every test sluice gets unless the test overrides them.
fn defaults(mongo_uri: &str, redis_url: &str, port: u16) -> Vec<(String, String)> {
    [
        ("MONGO_URI", mongo_uri.to_string()),
        ("REDIS_URL", redis_url.to_string()),
        ("APP_HOST", "127.0.0.1".into()),
        ("APP_PORT", port.to_string()),
        ("POD_NAME", format!("test-{}", free_port())),
        ("BUDGET_FALLBACK_PODS", "1".into()),
        ("LOG_LEVEL", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// How a test's sluice runs.
enum Running {
    /// In this process, on the test's runtime; stops when `stop` fires.
    InProcess {
        stop: CancellationToken,
        app: Arc<sluice::app::App>,
    },
    /// The real binary, with its log in a file.
    Binary {
        proc: Proc,
        log: PathBuf,
        _dir: TempDir,
    },
}

/// A running sluice.
pub struct Sluice {
    pub port: u16,
    running: Running,
}

impl Sluice {
    /// Starts sluice in-process against these servers with test-friendly defaults,
    /// overridden by `env` (given as the environment variables of the same names).
    pub async fn start(mongo_uri: &str, redis_url: &str, env: &[(&str, &str)]) -> Sluice {
        let mut args = vec!["sluice".to_string()];
        let mut settings = defaults(mongo_uri, redis_url, 0);
        settings.retain(|(k, _)| !env.iter().any(|(name, _)| name == k));
        settings.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        for (name, value) in settings {
            args.push(format!("--{}", name.to_lowercase().replace('_', "-")));
            args.push(value);
        }
        let cli = sluice::config::Cli::try_parse_from(&args).expect("valid test settings");
        sluice::telemetry::init(cli.config.log.log_format, "warn");
        let application = sluice::startup::build(cli.config)
            .await
            .expect("sluice builds");
        let port = application.addr().port();
        let app = Arc::clone(application.app());
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = application.run_until(until.cancelled_owned()).await {
                panic!("in-process sluice stopped: {e}");
            }
        });
        Sluice {
            port,
            running: Running::InProcess { stop, app },
        }
    }

    /// Starts the real binary, for what only a process shows: exit codes, signals, logs
    /// and memory. Waits until it listens.
    pub fn binary(mongo_uri: &str, redis_url: &str, env: &[(&str, &str)]) -> Sluice {
        let dir = TempDir::new().unwrap();
        let port = free_port();
        let log = dir.path().join("sluice.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.env_clear()
            .envs(defaults(mongo_uri, redis_url, port))
            .envs(env.iter().copied());
        let proc = Proc::spawn("sluice", &mut cmd, &log);
        wait_for_port(port, Duration::from_secs(10));
        Sluice {
            port,
            running: Running::Binary {
                proc,
                log,
                _dir: dir,
            },
        }
    }

    /// The binary's process (panics for an in-process sluice).
    pub fn process(&mut self) -> &mut Proc {
        match &mut self.running {
            Running::Binary { proc, .. } => proc,
            Running::InProcess { .. } => panic!("this sluice runs in-process; use Sluice::binary"),
        }
    }

    /// The in-process app, for tests that look inside (panics for the binary).
    pub fn app(&self) -> &Arc<sluice::app::App> {
        match &self.running {
            Running::InProcess { app, .. } => app,
            Running::Binary { .. } => panic!("this sluice runs as a binary"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The binary's log; an in-process sluice logs warnings to the test's stderr.
    pub fn log(&self) -> String {
        match &self.running {
            Running::Binary { log, .. } => std::fs::read_to_string(log).unwrap_or_default(),
            Running::InProcess { .. } => "(in-process: warnings are in the test's stderr)".into(),
        }
    }

    /// Waits until `/readyz` is 200 (MongoDB answered).
    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < until,
                "sluice never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one `/metrics` series, e.g. `sluice_shed_total{reason="database"}`.
    pub async fn metric(&self, series: &str) -> Option<String> {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    pub async fn status(&self) -> Value {
        reqwest::get(self.url("/api/cache/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// Runs sluice with only `env` set (plus a free port) and returns its exit code and
/// stderr; a process still running after 10 s is killed and reported as `None`.
pub fn run_to_exit(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env_clear()
        .env("APP_PORT", free_port().to_string())
        .envs(env.iter().copied())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(10));
    (
        status.and_then(|s| s.code()),
        std::fs::read_to_string(&log).unwrap(),
    )
}

/// A cold cluster: `pods` in-process pods, each ready, on a MongoDB holding one
/// `type: "write"` document and an empty Redis, so that their first reads all miss.
pub async fn cold_cluster(pods: usize, env: &[(&str, &str)]) -> (Redis, Mongo, Vec<Sluice>) {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    mongo
        .records()
        .await
        .insert_one(doc! {"type": "write", "index": 0, "payload": "seed"})
        .await
        .unwrap();
    let mut started = Vec::new();
    for _ in 0..pods {
        started.push(Sluice::start(&mongo.uri(), &redis.url(), env).await);
    }
    for pod in &started {
        pod.wait_ready().await;
    }
    (redis, mongo, started)
}

/// Starts Redis, MongoDB and one in-process sluice, ready to serve.
pub async fn spawn_app(env: &[(&str, &str)]) -> (Redis, Mongo, Sluice) {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    let sluice = Sluice::start(&mongo.uri(), &redis.url(), env).await;
    sluice.wait_ready().await;
    (redis, mongo, sluice)
}

/// The same with the real binary.
pub async fn spawn_binary(env: &[(&str, &str)]) -> (Redis, Mongo, Sluice) {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    let sluice = Sluice::binary(&mongo.uri(), &redis.url(), env);
    sluice.wait_ready().await;
    (redis, mongo, sluice)
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Running::InProcess { stop, .. } = &self.running {
            stop.cancel();
        }
    }
}
