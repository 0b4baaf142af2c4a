//! The real servers a test talks to, each on a free port with its data in a temporary
//! directory: `redis-server`, and `mongod` when on PATH, else `secantusd-rs` from the
//! tools cache (`SLUICE_MONGOD` overrides). Dropping a handle kills its process.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::Client;
use tempfile::TempDir;

// The database's command line, one copy for the tests and the lab.
#[path = "../../lab/src/db_args.rs"]
mod db_args;

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
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Proc {
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

/// The password every test Redis requires (`--requirepass`), as the cluster's does
/// (k8s/redis/auth.yaml): a sluice that forgot it fails here as it would there. Only
/// URL-safe characters, so it goes into `redis://:PASSWORD@host:port` as is.
pub const REDIS_PASSWORD: &str = "sluice-test-redis-7f3a9c";

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

    /// The URL a sluice uses, password included.
    pub fn url(&self) -> String {
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Runs one command over RESP, as another pod's client would (it logs in first with
    /// `AUTH`), and returns the first line of the answer.
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .write_all(resp(&["AUTH", REDIS_PASSWORD]).as_bytes())
            .unwrap();
        stream.write_all(resp(args).as_bytes()).unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), "+OK", "AUTH to the test Redis");
        line.clear();
        reader.read_line(&mut line).unwrap();
        line.trim_end().to_string()
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
                    "--requirepass",
                    REDIS_PASSWORD,
                    "--dir",
                ])
                .arg(self.dir.path()),
            &self.dir.path().join("redis.log"),
        ));
        wait_for_port(self.port, Duration::from_secs(10));
    }
}

/// One command in RESP: an array of bulk strings.
fn resp(args: &[&str]) -> String {
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out += &format!("${}\r\n{a}\r\n", a.len());
    }
    out
}

/// The MongoDB-wire server binary: `SLUICE_MONGOD`, else mongod on PATH, else secantusd-rs.
fn mongo_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_MONGOD") {
        return path.into();
    }
    if let Ok(path) = which("mongod") {
        return path;
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
    path
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
        let bin = mongo_binary();
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.args(db_args::db_args(&bin, self.port, &data, self.dir.path()).unwrap());
        if !db_args::is_mongod(&bin) {
            // Tests only (the lab measures with secantusd-rs' defaults): a test's store is
            // small, short-lived and one of many, so a 32 MB log file (each is allocated
            // in full; the default is 128 MB) and warnings only.
            cmd.args(["--log-file-max", "32MB", "--log-level", "WARNING"]);
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

    /// A handle on a server someone else started and owns (it is not stopped on drop).
    pub fn attach(port: u16) -> Mongo {
        Mongo {
            port,
            proc: None,
            dir: TempDir::new().unwrap(),
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

    /// What `work` returned, and how many `name` commands the server ran meanwhile: what
    /// the tests of shared reads count (one `find` for a whole cold burst).
    pub async fn commands_during<T>(
        &self,
        name: &str,
        work: impl std::future::Future<Output = T>,
    ) -> (T, i64) {
        let before = self.command_total(name).await;
        let out = work.await;
        (out, self.command_total(name).await - before)
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

    /// How many records are stored.
    pub async fn stored_count(&self) -> u64 {
        self.records().await.count_documents(doc! {}).await.unwrap()
    }

    /// How many of these ids (hex) are stored.
    pub async fn stored_among(&self, ids: &[String]) -> u64 {
        let ids: Vec<bson::oid::ObjectId> = ids
            .iter()
            .map(|id| bson::oid::ObjectId::parse_str(id).unwrap())
            .collect();
        self.records()
            .await
            .count_documents(doc! {"_id": {"$in": ids}})
            .await
            .unwrap()
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

pub fn wait_for_port(port: u16, limit: Duration) {
    let until = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What sluice pays budget tokens for, summed from `serverStatus`: the commands in
/// [`sluice::metrics::DbOp`], the one definition the tests and the lab share. The
/// driver's monitoring (`hello`) and the tests' own `serverStatus` are not among them.
pub async fn budgeted_commands(mongo: &Mongo) -> i64 {
    use sluice::metrics::{DbOp, Label};
    let counts = mongo.command_counts().await;
    DbOp::ALL
        .iter()
        .map(|op| count_of(&counts, op.as_str()))
        .sum()
}

/// Samples [`budgeted_commands`] once a second until dropped. A stalled database answers
/// nothing, so a window can span several seconds: each carries its own span.
pub struct CommandMeter {
    samples: std::sync::Arc<std::sync::Mutex<Vec<(Instant, i64)>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Commands the server ran between two samples, and when that window ended.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub end: Instant,
    pub span: Duration,
    pub commands: i64,
}

impl CommandMeter {
    pub fn start(port: u16) -> CommandMeter {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = std::sync::Arc::clone(&samples);
        let task = tokio::spawn(async move {
            let mongo = Mongo::attach(port);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let at = tick.tick().await.into_std();
                if let Ok(n) =
                    tokio::time::timeout(Duration::from_millis(900), budgeted_commands(&mongo))
                        .await
                {
                    out.lock().unwrap().push((at, n));
                }
            }
        });
        CommandMeter { samples, task }
    }

    /// Every window between consecutive samples.
    pub fn windows(&self) -> Vec<Window> {
        let s = self.samples.lock().unwrap();
        s.windows(2)
            .map(|w| Window {
                end: w[1].0,
                span: w[1].0 - w[0].0,
                commands: w[1].1 - w[0].1,
            })
            .collect()
    }
}

impl Drop for CommandMeter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP relay the test can slow down or stall: it adds a fixed delay to every byte in
/// each direction, as a long or congested link would, and while stalled it forwards
/// nothing, as a partitioned one would, without closing anything.
pub struct Relay {
    pub port: u16,
    link: std::sync::Arc<Link>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Link {
    stalled: std::sync::atomic::AtomicBool,
    delay_ms: std::sync::atomic::AtomicU64,
}

impl Relay {
    pub async fn start(upstream: u16) -> Relay {
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let link = Arc::new(Link::default());
        let shared = Arc::clone(&link);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, Arc::clone(&shared)));
                tokio::spawn(pump(sr, cw, Arc::clone(&shared)));
            }
        });
        Relay { port, link, task }
    }

    /// A Redis URL through the relay. The relay forwards bytes, `AUTH` included, so the
    /// password is the test Redis' own.
    pub fn url(&self) -> String {
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}", self.port)
    }

    pub fn set_stalled(&self, stalled: bool) {
        self.link
            .stalled
            .store(stalled, std::sync::atomic::Ordering::SeqCst);
    }

    /// Delays every chunk by `delay` in each direction (a round trip gains twice that).
    pub fn set_delay(&self, delay: Duration) {
        self.link.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

/// Reads chunks as they come and writes each once its delay has passed, so the delay is a
/// latency added to every byte, not a throughput limit.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: std::sync::Arc<Link>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    while let Some((read_at, chunk)) = rx.recv().await {
        let delay = Duration::from_millis(link.delay_ms.load(SeqCst));
        tokio::time::sleep_until(read_at + delay).await;
        while link.stalled.load(SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&chunk).await.is_err() {
            break;
        }
    }
    reader.abort();
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
