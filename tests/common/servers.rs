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

pub fn wait_for_port(port: u16, limit: Duration) {
    let until = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
