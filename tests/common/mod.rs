//! The test harness: real servers on free ports, never mocks.
//!
//! Each test starts its own `redis-server`, its own MongoDB-wire server (`mongod` when
//! on PATH, else `secantusd-rs` from the tools cache; `SLUICE_MONGOD` overrides) with
//! data in a temporary directory, and the real `sluice` binary, then talks to them over
//! sockets as a client would. Dropping a handle kills its process.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::Client;
use serde_json::Value;
use tempfile::TempDir;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Proc {
    child: Child,
    pub name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { child, name }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit by itself, up to `limit`, without blocking the
    /// runtime that drives the test's clients.
    pub async fn exited(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

/// Waits up to `limit` for `child` to exit; kills it if it does not.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Redis {
    pub port: u16,
    proc: Option<Proc>,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = TempDir::new().unwrap();
        let mut redis = Redis {
            port: free_port(),
            proc: None,
            dir,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn restart(&mut self) {
        let port = self.port.to_string();
        self.proc = Some(Proc::spawn(
            "redis-server",
            Command::new("redis-server")
                .args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                ])
                .arg(self.dir.path()),
            &self.dir.path().join("redis.log"),
        ));
        wait_for_port(self.port, Duration::from_secs(10));
    }
}

/// The MongoDB-wire server binary and whether it is real `mongod`.
fn mongo_binary() -> (PathBuf, bool) {
    if let Ok(path) = std::env::var("SLUICE_MONGOD") {
        let is_mongod = path.ends_with("mongod");
        return (path.into(), is_mongod);
    }
    if let Ok(path) = which("mongod") {
        return (path, true);
    }
    let tools = std::env::var("SLUICE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice/tools")
        });
    let path = tools.join("bin/secantusd-rs");
    assert!(
        path.exists(),
        "no MongoDB-wire server: install mongod or run scripts/test.sh, which builds secantusd-rs"
    );
    (path, false)
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

pub struct Mongo {
    pub port: u16,
    proc: Option<Proc>,
    dir: TempDir,
}

impl Mongo {
    pub async fn start() -> Mongo {
        let mut mongo = Mongo {
            port: free_port(),
            proc: None,
            dir: TempDir::new().unwrap(),
        };
        mongo.restart().await;
        mongo
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/assessmentdb", self.port)
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.proc.as_ref().unwrap().signal(sig);
    }

    /// Starts (again) on the same port and data files, and waits until it answers.
    pub async fn restart(&mut self) {
        let (bin, is_mongod) = mongo_binary();
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let port = self.port.to_string();
        let mut cmd = Command::new(bin);
        if is_mongod {
            cmd.args([
                "--port",
                &port,
                "--bind_ip",
                "127.0.0.1",
                "--wiredTigerCacheSizeGB",
                "0.25",
                "--dbpath",
            ])
            .arg(&data);
        } else {
            cmd.args([
                "--port",
                &port,
                "--host",
                "127.0.0.1",
                "--standalone",
                "--cache-size",
                "256M",
                "--write-tickets",
                "10",
                "--sync-on-commit",
                "--log-file-max",
                "32MB",
                "--log-level",
                "WARNING",
                "--storage-path",
            ])
            .arg(&data);
        }
        let log = self.dir.path().join("mongo.log");
        self.proc = Some(Proc::spawn("mongo", &mut cmd, &log));
        let client = self.client().await;
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if client
                .database("admin")
                .run_command(doc! {"ping": 1})
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "mongo did not answer; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> Client {
        let uri = format!(
            "mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=2000&connectTimeoutMS=2000",
            self.port
        );
        Client::with_uri_str(uri).await.unwrap()
    }

    /// `serverStatus` command counters: how many of each command the server ran.
    pub async fn command_counts(&self) -> Document {
        let status = self
            .client()
            .await
            .database("admin")
            .run_command(doc! {"serverStatus": 1})
            .await
            .unwrap();
        status
            .get_document("metrics")
            .and_then(|m| m.get_document("commands"))
            .cloned()
            .unwrap_or_default()
    }

    pub async fn command_total(&self, name: &str) -> i64 {
        count_of(&self.command_counts().await, name)
    }

    /// Every stored record's `_id`, as hex.
    pub async fn stored_ids(&self) -> HashSet<String> {
        use futures_util::TryStreamExt;
        let coll = self
            .client()
            .await
            .database("assessmentdb")
            .collection::<Document>("records");
        let docs: Vec<Document> = coll
            .find(doc! {})
            .projection(doc! {"_id": 1})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        docs.iter()
            .map(|d| d.get_object_id("_id").unwrap().to_hex())
            .collect()
    }

    pub async fn records(&self) -> mongodb::Collection<Document> {
        self.client()
            .await
            .database("assessmentdb")
            .collection("records")
    }
}

pub fn count_of(commands: &Document, name: &str) -> i64 {
    commands
        .get_document(name)
        .ok()
        .and_then(|c| c.get("total"))
        .and_then(|t| match t {
            bson::Bson::Int64(n) => Some(*n),
            bson::Bson::Int32(n) => Some(i64::from(*n)),
            bson::Bson::Double(n) => Some(*n as i64),
            _ => None,
        })
        .unwrap_or(0)
}

fn wait_for_port(port: u16, limit: Duration) {
    let until = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running sluice binary.
pub struct Sluice {
    pub port: u16,
    pub proc: Proc,
    log: PathBuf,
    _dir: TempDir,
}

impl Sluice {
    /// Starts sluice against these servers with test-friendly defaults, overridden by
    /// `env`, and waits until `/healthz` answers.
    pub fn start(mongo_uri: &str, redis_url: &str, env: &[(&str, &str)]) -> Sluice {
        let dir = TempDir::new().unwrap();
        let port = free_port();
        let log = dir.path().join("sluice.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.env_clear()
            .env("MONGO_URI", mongo_uri)
            .env("REDIS_URL", redis_url)
            .env("APP_HOST", "127.0.0.1")
            .env("APP_PORT", port.to_string())
            .env("POD_NAME", format!("test-{port}"))
            .env("BUDGET_FALLBACK_PODS", "1")
            .env("LOG_LEVEL", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn("sluice", &mut cmd, &log);
        wait_for_port(port, Duration::from_secs(10));
        Sluice {
            port,
            proc,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

/// A MongoDB holding one `type: "write"` document, and Redis, both cold for sluice.
pub async fn seeded_servers() -> (Redis, Mongo) {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    mongo
        .records()
        .await
        .insert_one(doc! {"type": "write", "index": 0, "payload": "seed"})
        .await
        .unwrap();
    (redis, mongo)
}

/// Starts Redis, MongoDB and one sluice, ready to serve.
pub async fn spawn_app(env: &[(&str, &str)]) -> (Redis, Mongo, Sluice) {
    let redis = Redis::start();
    let mongo = Mongo::start().await;
    let sluice = Sluice::start(&mongo.uri(), &redis.url(), env);
    sluice.wait_ready().await;
    (redis, mongo, sluice)
}

/// One `/api/data` answer as a client saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub latency: Duration,
    pub retry_after: bool,
    pub body: Value,
    pub at: Instant,
}

impl Outcome {
    pub fn write_ids(&self) -> Vec<String> {
        self.body["writes"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(4096)
        .build()
        .unwrap()
}

/// One GET, with failures to get an answer reported as status 0 and the error as body.
pub async fn get(client: &reqwest::Client, url: &str) -> Outcome {
    let at = Instant::now();
    match client.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            let body = r.json().await.unwrap_or(Value::Null);
            Outcome {
                status,
                latency: at.elapsed(),
                retry_after,
                body,
                at,
            }
        }
        Err(e) => Outcome {
            status: 0,
            latency: at.elapsed(),
            retry_after: false,
            body: Value::String(format!("{e:?}")),
            at,
        },
    }
}

/// `n` concurrent `GET /api/data`, all at once.
pub async fn burst(url: &str, n: usize) -> Vec<Outcome> {
    let client = client();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A closed loop of `users` clients with no think time, until `stop` is set.
pub fn load(
    url: &str,
    users: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    let url = url.to_string();
    tokio::spawn(async move {
        let client = client();
        let workers: Vec<_> = (0..users)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let o = get(&client, &url).await;
                        if o.status == 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        seen.push(o);
                    }
                    seen
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all
    })
}

/// Asserts that every document of every 200 is stored, and returns how many were checked.
pub async fn assert_nothing_lost(mongo: &Mongo, outcomes: &[Outcome]) -> usize {
    let stored = mongo.stored_ids().await;
    let acknowledged: Vec<String> = outcomes
        .iter()
        .filter(|o| o.status == 200)
        .flat_map(Outcome::write_ids)
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged documents are not stored, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
    acknowledged.len()
}
