//! The local lab's logic: what `lab/setup-local.sh` used to do in Python, and what it
//! plays of Kubernetes. The shell scripts start and stop processes, mount disks and write
//! cgroups; everything that measures, decides or judges is here.
//!
//!     cargo run --release --example lab -- <subcommand>
//!
//! - `ping URI` / `count URI` / `snapshot [--count] URI OUT`: the database, through the
//!   real driver (`snapshot` writes the format `bench-report/run.sh` reads);
//! - `hpa ROOT`: `k8s/app/hpa.yaml` and the Deployment's maxSurge, as the lab uses them;
//! - `db-args`: the database's command line (db_args.rs, shared with the tests);
//! - `free-port`: a port for a server the lab starts;
//! - `conductor`: runs beside k6. Every wall-clock second it samples serverStatus,
//!   HAProxy's counters and each replica (CPU, RSS, open connections, queue depth,
//!   /readyz); it autoscales like the HPA (replicas join and leave HAProxy through its
//!   runtime API, and Prometheus through a file_sd file) and, with `--chaos`, injects
//!   the faults. It writes `timeline.jsonl` and `events.jsonl` into the state folder;
//! - `report`: the report JSON, the SVG chart and the verdict; exits 0 or 3;
//! - `load-report DIR` / `k6-line FILE`: bench-report/run.sh's report, and its line
//!   after each k6 run (load_report.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use plotters::prelude::*;
use serde_json::{json, Value};

mod db_args;
mod k6;
mod load_report;
mod procfs;

/// The commands counted against DB_COMMAND_BUDGET, per second, from serverStatus'
/// `metrics.commands.<name>.total`: the one set, used by the sampler, the report and the
/// smoke. Everything else (the lab's own serverStatus, drivers' hello/isMaster, buildInfo)
/// is reported apart as `db_other`.
const COUNTED_COMMANDS: [&str; 4] = ["insert", "find", "count", "ping"];
/// docs/deploy.md "sizing" (and scripts/deploy/check_manifests.py's SIZING): sluice's
/// memory M(C) = 80 MiB + 28 KiB × C, C = open connections.
const MEM_BASE_MIB: f64 = 80.0;
const MEM_PER_CONN_KIB: f64 = 28.0;
const DOCS_PER_REQUEST: f64 = 5.0;
/// Seconds after an event whose failed requests belong to it.
const EVENT_WINDOW_S: f64 = 10.0;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(about = "the local lab's logic (see lab/README.md)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exit 0 once the database answers ping.
    Ping { uri: String },
    /// Print the number of documents in the app's collection (exact; scans).
    Count { uri: String },
    /// serverStatus counters now, as JSON (plus `records` with --count).
    Snapshot {
        #[arg(long)]
        count: bool,
        uri: String,
        out: PathBuf,
    },
    /// Wait (up to 60 s) until serverStatus' inserted-documents counter stops moving;
    /// print where it stopped.
    Settle { uri: String },
    /// Print "MIN MAX SURGE TARGET_PCT" from k8s/app/hpa.yaml and deployment.yaml.
    Hpa { root: PathBuf },
    /// Print the sluice container's readinessProbe from k8s/app/deployment.yaml as
    /// "PATH PERIOD_S TIMEOUT_S FAILURES SUCCESSES", for HAProxy's health check.
    Probe { root: PathBuf },
    /// Print the database's arguments, one a line, for SERVER (mongod or secantusd-rs) on
    /// 127.0.0.1:PORT with its files in DBPATH; secantusd-rs' empty config goes in STATE.
    DbArgs {
        #[arg(long)]
        server: PathBuf,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        dbpath: PathBuf,
        #[arg(long)]
        state: PathBuf,
    },
    /// Print a TCP port nothing listens on and USED does not list, and append it to USED.
    FreePort {
        /// Where the search starts: lab/lib.sh's LAB_TAG, unique to the state folder.
        #[arg(long)]
        tag: u64,
        #[arg(long)]
        used: PathBuf,
    },
    /// Print k8s/app/configmap.yaml's data as KEY=VALUE lines (sluice's environment).
    Settings { root: PathBuf },
    /// Print the seconds of load in PLAN, `k6 inspect`'s output: the longest scenario's
    /// start and stages (or duration), without the graceful stop.
    LoadSeconds { plan: PathBuf },
    /// Sample, autoscale and inject faults until SIGTERM or STATE/conductor.stop.
    Conductor(ConductorArgs),
    /// Write the report JSON and SVG, print the verdict; exit 0 or 3.
    Report(ReportArgs),
    /// bench-report's tables and chart of one run folder (report.json, report.md, chart.svg).
    LoadReport { dir: PathBuf },
    /// One k6 --summary-export as bench-report's line: req/s, p95, failed, ok.
    K6Line { summary: PathBuf },
    /// The CI smoke's checks of one report: "ok ..." / "fail ..." lines; exit 1 on a fail.
    CheckReport {
        report: PathBuf,
        /// The machine allows the database's constraints (root, loop devices, cgroups).
        #[arg(long)]
        constrained: bool,
    },
}

#[derive(clap::Args, Clone)]
struct ConductorArgs {
    #[arg(long)]
    state: PathBuf,
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    mongo_uri: String,
    /// lab/lib.sh's LAB_TAG: where the search for a new replica's port starts.
    #[arg(long)]
    port_tag: u64,
    /// Fixed replica count: no autoscaling.
    #[arg(long)]
    replicas: Option<u32>,
    /// Divides the HPA's windows and periods (300 s stabilisation / 10 = 30 s).
    #[arg(long, default_value_t = 10.0)]
    time_scale: f64,
    /// Overrides hpa.yaml's memory target (percent of the request), e.g. to make a short
    /// CI run with few clients scale; the report shows the target used.
    #[arg(long)]
    memory_target: Option<f64>,
    #[arg(long)]
    chaos: bool,
    /// Seconds of the /api/data run (k6's): the faults are scheduled inside it.
    #[arg(long, required_if_eq("chaos", "true"))]
    load_seconds: Option<f64>,
    /// Seconds into the /api/data run of the first fault (default: from the run's length).
    #[arg(long)]
    chaos_start: Option<f64>,
    /// Seconds between a fault's recovery and the next fault (default: from the run's
    /// length).
    #[arg(long)]
    chaos_gap: Option<f64>,
}

/// When the faults come in a run of `load_s` seconds: a long run leaves the ramp-up alone
/// and spaces them 20 s apart; a short one starts at once and spreads them over the run.
/// Each fault still starts only if it and the report's window after it fit before the
/// run ends (`chaos`).
fn chaos_schedule(load_s: f64, start: Option<f64>, gap: Option<f64>) -> (f64, f64) {
    let (start0, gap0) = if load_s >= 120.0 {
        (20.0, 20.0)
    } else {
        (3.0, ((load_s - 6.0) / 6.0).floor().max(3.0))
    };
    (start.unwrap_or(start0), gap.unwrap_or(gap0))
}

#[derive(clap::Args)]
struct ReportArgs {
    #[arg(long)]
    state: PathBuf,
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Prometheus' base URL, for alerts, scrapes, rules and the p95 timeline.
    #[arg(long)]
    prometheus: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let rc = rt.block_on(async {
        match cli.cmd {
            Cmd::Ping { uri } => match ping(&uri).await {
                Ok(()) => 0,
                Err(_) => 1,
            },
            Cmd::Count { uri } => match count(&uri).await {
                Ok(n) => {
                    println!("{n}");
                    0
                }
                Err(e) => {
                    eprintln!("count: {e}");
                    1
                }
            },
            Cmd::Snapshot { count: c, uri, out } => match snapshot(&uri, c, &out).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("snapshot: {e}");
                    1
                }
            },
            Cmd::Settle { uri } => match settle(&uri).await {
                Ok(inserted) => {
                    println!("{inserted}");
                    0
                }
                Err(e) => {
                    eprintln!("settle: {e}");
                    1
                }
            },
            Cmd::Hpa { root } => match Hpa::load(&root) {
                Ok(h) => {
                    println!("{} {} {} {}", h.min, h.max, h.surge, h.target_pct);
                    0
                }
                Err(e) => {
                    eprintln!("hpa: {e}");
                    1
                }
            },
            Cmd::LoadSeconds { plan } => {
                match load_json(&plan).and_then(|p| k6::load_seconds(&p)) {
                    Some(s) => {
                        println!("{s}");
                        0
                    }
                    None => {
                        eprintln!(
                            "load-seconds: {} holds no scenario with stages or a duration",
                            plan.display()
                        );
                        1
                    }
                }
            }
            Cmd::Probe { root } => match readiness_probe(&root) {
                Ok(p) => {
                    println!("{p}");
                    0
                }
                Err(e) => {
                    eprintln!("probe: {e}");
                    1
                }
            },
            Cmd::DbArgs {
                server,
                port,
                dbpath,
                state,
            } => match db_args::db_args(&server, port, &dbpath, &state) {
                Ok(args) => {
                    for a in args {
                        println!("{}", a.to_string_lossy());
                    }
                    0
                }
                Err(e) => {
                    eprintln!("db-args: {e}");
                    1
                }
            },
            Cmd::FreePort { tag, used } => match free_port(tag, &used) {
                Ok(port) => {
                    println!("{port}");
                    0
                }
                Err(e) => {
                    eprintln!("free-port: {e}");
                    1
                }
            },
            Cmd::Settings { root } => {
                match std::fs::read_to_string(root.join("k8s/app/configmap.yaml")) {
                    Ok(text) => match configmap_data(&text) {
                        Ok(data) => {
                            for (k, v) in data {
                                println!("{k}={v}");
                            }
                            0
                        }
                        Err(e) => {
                            eprintln!("settings: {e}");
                            1
                        }
                    },
                    Err(e) => {
                        eprintln!("settings: {e}");
                        1
                    }
                }
            }
            Cmd::Conductor(a) => match conductor(a).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("conductor: {e}");
                    1
                }
            },
            Cmd::LoadReport { dir } => match load_report::run(&dir) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("load-report: {e}");
                    1
                }
            },
            Cmd::K6Line { summary } => match k6::Summary::read(&summary).and_then(|s| s.line()) {
                Some(line) => {
                    println!("{line}");
                    0
                }
                None => {
                    eprintln!(
                        "k6-line: no req/s, p95 and failed rate in {}",
                        summary.display()
                    );
                    1
                }
            },
            Cmd::CheckReport {
                report,
                constrained,
            } => match load_json(&report) {
                Some(r) => {
                    let lines = check_report(&r, &report, constrained);
                    for (ok, what) in &lines {
                        println!("{} {what}", if *ok { "ok" } else { "fail" });
                    }
                    i32::from(lines.iter().any(|(ok, _)| !ok))
                }
                None => {
                    println!("fail the report {} is readable JSON", report.display());
                    1
                }
            },
            Cmd::Report(a) => match report(a).await {
                Ok(rc) => rc,
                Err(e) => {
                    eprintln!("report: {e}");
                    1
                }
            },
        }
    });
    std::process::exit(rc);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ------------------------------------------------------------------------- database

async fn client(uri: &str) -> Result<mongodb::Client, Error> {
    let mut opts = mongodb::options::ClientOptions::parse(uri).await?;
    opts.direct_connection = Some(true);
    opts.server_selection_timeout = Some(Duration::from_secs(2));
    opts.connect_timeout = Some(Duration::from_secs(2));
    opts.app_name = Some("sluice-lab".into());
    Ok(mongodb::Client::with_options(opts)?)
}

fn db_name(uri: &str) -> String {
    let path = uri
        .split("://")
        .nth(1)
        .and_then(|r| r.split_once('/'))
        .map(|x| x.1);
    let name = path.unwrap_or("").split('?').next().unwrap_or("");
    if name.is_empty() {
        "assessmentdb".into()
    } else {
        name.into()
    }
}

async fn ping(uri: &str) -> Result<(), Error> {
    let c = client(uri).await?;
    c.database("admin")
        .run_command(bson::doc! {"ping": 1})
        .await?;
    Ok(())
}

async fn count(uri: &str) -> Result<u64, Error> {
    let c = client(uri).await?;
    let coll = c
        .database(&db_name(uri))
        .collection::<bson::Document>("records");
    Ok(coll
        .count_documents(bson::doc! {})
        .max_time(Duration::from_secs(600))
        .await?)
}

fn bson_num(b: Option<&bson::Bson>) -> Option<u64> {
    match b? {
        bson::Bson::Int32(v) => Some(*v as u64),
        bson::Bson::Int64(v) => Some(*v as u64),
        bson::Bson::Double(v) => Some(*v as u64),
        _ => None,
    }
}

/// serverStatus' command totals by name and documents inserted.
#[derive(Clone, Debug, Default)]
struct DbCounters {
    commands: BTreeMap<String, u64>,
    inserted: u64,
}

impl DbCounters {
    fn counted(&self) -> u64 {
        COUNTED_COMMANDS
            .iter()
            .map(|c| self.commands.get(*c).copied().unwrap_or(0))
            .sum()
    }
    fn total(&self) -> u64 {
        self.commands.values().sum()
    }
}

async fn server_status(c: &mongodb::Client) -> Result<DbCounters, Error> {
    let s = c
        .database("admin")
        .run_command(bson::doc! {"serverStatus": 1})
        .await?;
    let metrics = s.get_document("metrics").ok();
    let mut out = DbCounters::default();
    if let Some(cmds) = metrics.and_then(|m| m.get_document("commands").ok()) {
        for (name, v) in cmds {
            let n = match v {
                bson::Bson::Document(d) => bson_num(d.get("total")),
                other => bson_num(Some(other)),
            };
            if let Some(n) = n {
                out.commands.insert(name.clone(), n);
            }
        }
    }
    out.inserted = metrics
        .and_then(|m| m.get_document("document").ok())
        .and_then(|d| bson_num(d.get("inserted")))
        .unwrap_or(0);
    Ok(out)
}

async fn settle(uri: &str) -> Result<u64, Error> {
    let c = client(uri).await?;
    let mut prev = None;
    for _ in 0..30 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), server_status(&c)).await {
            if prev == Some(s.inserted) {
                return Ok(s.inserted);
            }
            prev = Some(s.inserted);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Err("the inserted-documents counter kept moving".into())
}

async fn snapshot(uri: &str, with_count: bool, out: &Path) -> Result<(), Error> {
    let c = client(uri).await?;
    let s = server_status(&c).await?;
    let mut v = json!({
        "t": now(),
        "commands": s.commands,
        "commands_total": s.total(),
        "probe_commands": s.commands.get("serverStatus").copied().unwrap_or(0),
        "counted_commands": s.counted(),
        "documents_inserted": s.inserted,
    });
    if with_count {
        v["records"] = json!(count(uri).await?);
    }
    v["t_end"] = json!(now());
    std::fs::write(out, serde_json::to_string(&v)?)?;
    Ok(())
}

/// The `data:` map of a ConfigMap, in the file's order: the replicas' environment.
/// The replicas' `DB_TIMEOUT_MS`: the ConfigMap's, else sluice's own default.
fn db_timeout(root: &Path) -> Duration {
    let from_configmap = std::fs::read_to_string(root.join("k8s/app/configmap.yaml"))
        .ok()
        .and_then(|text| configmap_data(&text).ok())
        .and_then(|data| {
            data.into_iter()
                .find(|(k, _)| k == "DB_TIMEOUT_MS")
                .and_then(|(_, v)| v.parse().ok())
                .map(Duration::from_millis)
        });
    from_configmap.unwrap_or_else(|| {
        use clap::Parser;
        sluice::config::Cli::parse_from(["sluice"])
            .config
            .store
            .db_timeout
    })
}

fn configmap_data(text: &str) -> Result<Vec<(String, String)>, Error> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text)?;
    let data = doc["data"]
        .as_mapping()
        .ok_or("configmap.yaml: no data map")?;
    data.iter()
        .map(|(k, v)| match (k.as_str(), v.as_str()) {
            (Some(k), Some(v)) => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("configmap.yaml: {k:?} is not a string setting").into()),
        })
        .collect()
}

// ------------------------------------------------------------------------- the HPA

#[derive(Clone, Debug, PartialEq)]
struct Policy {
    pods: bool,
    value: f64,
    period_s: f64,
}

#[derive(Clone, Debug, PartialEq)]
struct Behavior {
    window_s: f64,
    select_max: bool,
    policies: Vec<Policy>,
}

#[derive(Clone, Debug, PartialEq)]
struct Hpa {
    min: u32,
    max: u32,
    target_pct: f64,
    up: Behavior,
    down: Behavior,
    surge: u32,
    memory_request_mib: f64,
}

/// The parts of `autoscaling/v2` HorizontalPodAutoscaler the lab uses.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct HpaSpec {
    min_replicas: Option<u32>,
    max_replicas: u32,
    metrics: Vec<serde_yaml::Value>,
    #[serde(default)]
    behavior: BehaviorSpec,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct BehaviorSpec {
    scale_up: Option<RulesSpec>,
    scale_down: Option<RulesSpec>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RulesSpec {
    stabilization_window_seconds: Option<f64>,
    select_policy: Option<String>,
    #[serde(default)]
    policies: Vec<PolicySpec>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicySpec {
    #[serde(rename = "type")]
    kind: String,
    value: f64,
    period_seconds: f64,
}

impl Behavior {
    /// Kubernetes' defaults where the spec is silent: no scale-up window, a 300 s
    /// scale-down window, the policy allowing the most change.
    fn from_spec(spec: Option<RulesSpec>, default_window_s: f64) -> Behavior {
        let spec = spec.unwrap_or(RulesSpec {
            stabilization_window_seconds: None,
            select_policy: None,
            policies: vec![],
        });
        Behavior {
            window_s: spec
                .stabilization_window_seconds
                .unwrap_or(default_window_s),
            select_max: spec.select_policy.as_deref() != Some("Min"),
            policies: spec
                .policies
                .into_iter()
                .map(|p| Policy {
                    pods: p.kind == "Pods",
                    value: p.value,
                    period_s: p.period_seconds,
                })
                .collect(),
        }
    }
}

/// The sluice container's readinessProbe as "PATH PERIOD_S TIMEOUT_S FAILURES SUCCESSES",
/// with Kubernetes' defaults where the manifest is silent (10 s, 1 s, 3, 1).
fn readiness_probe(root: &Path) -> Result<String, Error> {
    let dep: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        root.join("k8s/app/deployment.yaml"),
    )?)?;
    let probe = dep["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "sluice"))
        .map(|c| &c["readinessProbe"])
        .ok_or("deployment.yaml: no sluice container")?;
    let path = probe["httpGet"]["path"]
        .as_str()
        .ok_or("deployment.yaml: the readinessProbe is not an httpGet")?;
    let field = |name: &str, default: u64| probe[name].as_u64().unwrap_or(default);
    Ok(format!(
        "{path} {} {} {} {}",
        field("periodSeconds", 10),
        field("timeoutSeconds", 1),
        field("failureThreshold", 3),
        field("successThreshold", 1)
    ))
}

impl Hpa {
    fn load(root: &Path) -> Result<Hpa, Error> {
        let hpa = std::fs::read_to_string(root.join("k8s/app/hpa.yaml"))?;
        let dep = std::fs::read_to_string(root.join("k8s/app/deployment.yaml"))?;
        Hpa::parse(&hpa, &dep)
    }

    /// From the HPA's spec, and the Deployment's `maxSurge` and the sluice container's
    /// CPU request (what the HPA's utilisation is a percentage of).
    fn parse(hpa: &str, deployment: &str) -> Result<Hpa, Error> {
        let hpa: serde_yaml::Value = serde_yaml::from_str(hpa)?;
        let spec: HpaSpec = serde_yaml::from_value(hpa["spec"].clone())?;
        let target_pct = spec
            .metrics
            .iter()
            .filter(|m| m["resource"]["name"] == "memory")
            .find_map(|m| m["resource"]["target"]["averageUtilization"].as_f64())
            .ok_or("hpa.yaml: no memory averageUtilization target")?;
        let dep: serde_yaml::Value = serde_yaml::from_str(deployment)?;
        let surge = match &dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] {
            serde_yaml::Value::Number(n) => n.as_u64().map_or(1, |n| n as u32),
            // A percentage rounds up, as the Deployment controller does.
            serde_yaml::Value::String(p) => {
                let pct: f64 = p.trim_end_matches('%').parse()?;
                (f64::from(spec.max_replicas) * pct / 100.0).ceil() as u32
            }
            // Kubernetes' default is 25 %.
            _ => (f64::from(spec.max_replicas) * 0.25).ceil() as u32,
        };
        let memory = dep["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .and_then(|c| c.iter().find(|c| c["name"] == "sluice"))
            .and_then(|c| {
                c["resources"]["requests"]["memory"]
                    .as_str()
                    .map(str::to_string)
            })
            .ok_or("deployment.yaml: no memory request on the sluice container")?;
        let memory_request_mib = match memory.strip_suffix("Mi") {
            Some(m) => m.parse::<f64>()?,
            None => {
                memory
                    .strip_suffix("Gi")
                    .ok_or("deployment.yaml: the memory request is not in Mi or Gi")?
                    .parse::<f64>()?
                    * 1024.0
            }
        };
        Ok(Hpa {
            min: spec.min_replicas.unwrap_or(1),
            max: spec.max_replicas,
            target_pct,
            up: Behavior::from_spec(spec.behavior.scale_up, 0.0),
            down: Behavior::from_spec(spec.behavior.scale_down, 300.0),
            surge,
            memory_request_mib,
        })
    }
}

/// The HPA's decision, as in the Kubernetes controller: a recommendation from the ratio
/// of the average utilisation to the target (10% tolerance), stabilised over a window
/// (the highest recommendation of the window when scaling down, the lowest when up),
/// then limited by the policies over their periods. Times are already time-scaled.
#[derive(Debug, Default)]
struct Autoscaler {
    recs: Vec<(f64, u32)>,
    /// (time, replicas after the change, change)
    changes: Vec<(f64, u32, i64)>,
}

impl Autoscaler {
    fn decide(&mut self, h: &Hpa, scale: f64, t: f64, current: u32, util_pct: f64) -> u32 {
        let ratio = util_pct / h.target_pct;
        let rec = if (ratio - 1.0).abs() <= 0.1 {
            current
        } else {
            (current as f64 * ratio).ceil() as u32
        }
        .clamp(h.min, h.max);
        // As if the HPA had been running at the current count before the lab started:
        // no scale-down before one whole window has passed.
        if self.recs.is_empty() {
            self.recs.push((t, current));
        }
        self.recs.push((t, rec));
        let keep = h.down.window_s.max(h.up.window_s) / scale + 1.0;
        self.recs.retain(|(rt, _)| t - rt <= keep);
        let window = |w: f64| self.recs.iter().filter(move |(rt, _)| t - rt <= w / scale);
        let up_rec = if h.up.window_s > 0.0 {
            window(h.up.window_s).map(|x| x.1).min().unwrap_or(rec)
        } else {
            rec
        };
        let down_rec = window(h.down.window_s).map(|x| x.1).max().unwrap_or(rec);
        let changed_since = |period: f64, up: bool| -> i64 {
            self.changes
                .iter()
                .filter(|(ct, _, d)| t - ct < period / scale && (*d > 0) == up)
                .map(|x| x.2)
                .sum()
        };
        let mut next = current;
        if up_rec > current {
            let limits = h.up.policies.iter().map(|p| {
                let start = current as i64 - changed_since(p.period_s, true);
                let start = start.max(0) as f64;
                if p.pods {
                    (start + p.value) as u32
                } else {
                    (start * (1.0 + p.value / 100.0)).ceil() as u32
                }
            });
            let limit = if h.up.select_max {
                limits.max()
            } else {
                limits.min()
            };
            next = up_rec.min(limit.unwrap_or(h.max)).min(h.max).max(current);
        } else if down_rec < current {
            let limits = h.down.policies.iter().map(|p| {
                let start = current as i64 - changed_since(p.period_s, false);
                let start = start as f64;
                let floor = if p.pods {
                    start - p.value
                } else {
                    (start * (1.0 - p.value / 100.0)).floor()
                };
                floor.max(0.0) as u32
            });
            // selectPolicy Min picks the policy that removes the fewest pods.
            let limit = if h.down.select_max {
                limits.min()
            } else {
                limits.max()
            };
            next = down_rec.max(limit.unwrap_or(h.min)).max(h.min).min(current);
        }
        if next != current {
            self.changes.push((t, next, next as i64 - current as i64));
        }
        next
    }
}

// ------------------------------------------------------------------------- processes

fn read_to_string(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn alive(pid: u32) -> bool {
    read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false)
}

/// Established TCP connections per local port, from /proc/net/tcp{,6}.
fn connections_by_port() -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Some(s) = read_to_string(f) else { continue };
        for line in s.lines().skip(1) {
            let mut it = line.split_whitespace();
            let (Some(_), Some(local), Some(_), Some(st)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                continue;
            };
            if st != "01" {
                continue;
            }
            if let Some(port) = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                *out.entry(port).or_insert(0) += 1;
            }
        }
    }
    out
}

/// A TCP port nothing listens on, for a server the lab starts, appended to `used` (the
/// state folder's `ports`) so that one lab never hands it out twice, even before its
/// server has bound it. Ports come from below the kernel's ephemeral range (k6 and
/// HAProxy open tens of thousands of outgoing connections, which could otherwise take a
/// port between this check and the server's bind); the search starts at an offset from
/// `tag`, unique to the state folder, so that two labs look in different places.
fn free_port(tag: u64, used: &Path) -> Result<u16, Error> {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    let span = u64::from(HIGH - LOW);
    let taken: BTreeSet<u16> = read_to_string(used)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let port = (0..span)
        .map(|i| LOW + ((tag % span + i) % span) as u16)
        .filter(|p| !taken.contains(p))
        .find(|p| bindable(*p))
        .ok_or("no free port")?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(used)?;
    writeln!(file, "{port}")?;
    Ok(port)
}

/// Whether 127.0.0.1:`port` can be bound without SO_REUSEADDR (which std's listener
/// would set): then a port anything still holds, a connection in TIME_WAIT included,
/// counts as taken.
fn bindable(port: u16) -> bool {
    tokio::net::TcpSocket::new_v4()
        .and_then(|s| s.bind(([127, 0, 0, 1], port).into()))
        .is_ok()
}

fn ctl(root: &Path, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(root.join("lab/ctl.sh"))
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// The runtime API sockets of every HAProxy process (setup-local.sh starts as many as the
/// open-files limit needs, all on one port), `haproxy-N.sock` in the state folder.
fn haproxy_sockets(state: &Path) -> Vec<PathBuf> {
    let mut socks: Vec<PathBuf> = std::fs::read_dir(state)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("haproxy-") && n.ends_with(".sock"))
        })
        .collect();
    socks.sort();
    socks
}

/// Sends `cmd` to every HAProxy process; their answers, one per process that answered.
fn haproxy(state: &Path, cmd: &str) -> Vec<String> {
    haproxy_sockets(state)
        .iter()
        .filter_map(|sock| {
            let mut s = UnixStream::connect(sock).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(format!("{cmd}\n").as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })
        .collect()
}

/// `show stat` of every HAProxy process, as rows of name → value.
fn haproxy_stat(state: &Path) -> Vec<BTreeMap<String, String>> {
    let mut rows = vec![];
    for text in haproxy(state, "show stat") {
        let mut lines = text.lines();
        let Some(head) = lines.next() else {
            continue;
        };
        let names: Vec<&str> = head.trim_start_matches("# ").split(',').collect();
        rows.extend(lines.filter(|l| !l.is_empty()).map(|l| {
            names
                .iter()
                .zip(l.split(','))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<String, String>>()
        }));
    }
    rows
}

async fn http_get(c: &reqwest::Client, url: &str, ms: u64) -> Option<(u16, String)> {
    let r = c
        .get(url)
        .timeout(Duration::from_millis(ms))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.unwrap_or_default()))
}

fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ------------------------------------------------------------------------- conductor

#[derive(Clone, Copy, Debug, PartialEq)]
enum SlotState {
    Off,
    Starting,
    Ready,
    Draining,
}

#[derive(Debug)]
struct Slot {
    idx: usize,
    port: u16,
    pid: Option<u32>,
    state: SlotState,
    /// When its CPU time was last read, and that time in seconds.
    cpu_seconds: Option<(f64, f64)>,
    /// Set while the lab itself stops or kills it: its death is expected.
    expected_exit: bool,
}

#[derive(Default)]
struct Shared {
    slots: Vec<Slot>,
    events: Vec<Value>,
    restarts: u64,
    /// Every ready replica answered /readyz 200 in the last tick.
    all_ready: bool,
    /// A fault is being injected or recovered from.
    faulting: bool,
}

type SharedState = Arc<Mutex<Shared>>;

fn event(sh: &SharedState, kind: &str, detail: String) -> usize {
    let t = now();
    eprintln!("    [lab] {kind}: {detail}");
    let mut s = sh.lock().unwrap();
    s.events
        .push(json!({"t": t, "kind": kind, "detail": detail}));
    s.events.len() - 1
}

fn event_set(sh: &SharedState, i: usize, key: &str, v: Value) {
    if let Some(e) = sh.lock().unwrap().events.get_mut(i) {
        e[key] = v;
    }
}

fn write_targets(state: &Path, slots: &[Slot]) {
    let targets: Vec<String> = slots
        .iter()
        .filter(|s| matches!(s.state, SlotState::Ready))
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let body = json!([{"targets": targets, "labels": {"lab": "sluice"}}]).to_string();
    let tmp = state.join("prom-targets.json.new");
    if std::fs::write(&tmp, body).is_ok() {
        let _ = std::fs::rename(tmp, state.join("prom-targets.json"));
    }
}

fn server_name(idx: usize) -> String {
    format!("replicas/sluice-local-{idx}")
}

/// Starts slot `idx` on a fresh port, as a new pod gets a new address (ctl.sh waits for
/// /readyz), then lets HAProxy send it requests.
fn start_replica(a: &ConductorArgs, sh: &SharedState, idx: usize, why: &str) {
    {
        let mut s = sh.lock().unwrap();
        s.slots[idx].state = SlotState::Starting;
        s.slots[idx].expected_exit = false;
    }
    let (a, sh, why) = (a.clone(), sh.clone(), why.to_string());
    tokio::task::spawn_blocking(move || {
        let (ok, out) = match free_port(a.port_tag, &a.state.join("ports")) {
            Ok(port) => ctl(
                &a.root,
                &["replica-start", &idx.to_string(), &port.to_string()],
            ),
            Err(e) => (false, e.to_string()),
        };
        let mut s = sh.lock().unwrap();
        let mut words = out.split_whitespace();
        let pid: Option<u32> = words.next().and_then(|p| p.parse().ok());
        let port: Option<u16> = words.next().and_then(|p| p.parse().ok());
        if let (true, Some(pid), Some(port)) = (ok, pid, port) {
            s.slots[idx].pid = Some(pid);
            s.slots[idx].port = port;
            s.slots[idx].state = SlotState::Ready;
            s.slots[idx].cpu_seconds = None;
            // A new pod, a new address: the slot's server gets the replica's port.
            let name = server_name(idx);
            haproxy(
                &a.state,
                &format!("set server {name} addr 127.0.0.1 port {port}"),
            );
            haproxy(&a.state, &format!("set server {name} state ready"));
            haproxy(&a.state, &format!("set server {name} health up"));
            write_targets(&a.state, &s.slots);
            drop(s);
            event(&sh, "replica-ready", format!("sluice-local-{idx} ({why})"));
        } else {
            s.slots[idx].state = SlotState::Off;
            drop(s);
            event(
                &sh,
                "replica-failed",
                format!("sluice-local-{idx} did not become ready ({why})"),
            );
        }
    });
}

/// As Kubernetes removes a pod: out of the endpoints (HAProxy drain, Prometheus), then
/// SIGTERM, which sluice answers by draining and flushing; ctl.sh waits for its exit.
fn stop_replica(a: &ConductorArgs, sh: &SharedState, idx: usize, why: &str) {
    {
        let mut s = sh.lock().unwrap();
        s.slots[idx].state = SlotState::Draining;
        s.slots[idx].expected_exit = true;
        write_targets(&a.state, &s.slots);
    }
    haproxy(
        &a.state,
        &format!("set server {} state drain", server_name(idx)),
    );
    let (a, sh, why) = (a.clone(), sh.clone(), why.to_string());
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(1));
        let (ok, out) = ctl(&a.root, &["replica-stop", &idx.to_string()]);
        haproxy(
            &a.state,
            &format!("set server {} state maint", server_name(idx)),
        );
        let mut s = sh.lock().unwrap();
        s.slots[idx].state = SlotState::Off;
        s.slots[idx].pid = None;
        drop(s);
        event(
            &sh,
            "replica-stopped",
            format!(
                "sluice-local-{idx} ({why}; SIGTERM, {})",
                if ok {
                    out
                } else {
                    "did not exit cleanly".into()
                }
            ),
        );
    });
}

async fn conductor(a: ConductorArgs) -> Result<(), Error> {
    let mut hpa = Hpa::load(&a.root)?;
    if let Some(t) = a.memory_target {
        hpa.target_pct = t;
    }
    let scale = a.time_scale.max(1.0);
    let sh: SharedState = Arc::new(Mutex::new(Shared::default()));
    // slots: "IDX PORT" lines; slot-IDX.pid for the replicas setup already started.
    let slots_txt = read_to_string(a.state.join("slots")).ok_or("no STATE/slots")?;
    {
        let mut s = sh.lock().unwrap();
        for line in slots_txt.lines() {
            let mut it = line.split_whitespace();
            let (Some(i), Some(p)) = (it.next(), it.next()) else {
                continue;
            };
            let idx: usize = i.parse()?;
            let pid: Option<u32> = read_to_string(a.state.join(format!("slot-{idx}.pid")))
                .and_then(|p| p.trim().parse().ok())
                .filter(|p| alive(*p));
            s.slots.push(Slot {
                idx,
                port: p.parse()?,
                pid,
                state: if pid.is_some() {
                    SlotState::Ready
                } else {
                    SlotState::Off
                },
                cpu_seconds: None,
                expected_exit: false,
            });
        }
        write_targets(&a.state, &s.slots);
    }
    let mode = match a.replicas {
        Some(n) => format!("fixed at {n} replicas (--replicas)"),
        None => format!(
            "HPA: {}-{} replicas, memory target {}%{} of {} MiB, scale-up window {} s, scale-down window {} s, time scale 1/{} (windows and periods divided by {})",
            hpa.min, hpa.max, hpa.target_pct, if a.memory_target.is_some() { " (--memory-target, not hpa.yaml's)" } else { "" }, hpa.memory_request_mib, hpa.up.window_s, hpa.down.window_s, scale, scale
        ),
    };
    event(&sh, "autoscaler", mode.clone());
    std::fs::write(
        a.state.join("autoscaler.json"),
        json!({"mode": mode, "time_scale": scale, "fixed_replicas": a.replicas,
               "min": hpa.min, "max": hpa.max, "surge": hpa.surge, "target_pct": hpa.target_pct,
               "memory_request_mib": hpa.memory_request_mib,
               "scale_up_window_s": hpa.up.window_s, "scale_down_window_s": hpa.down.window_s})
        .to_string(),
    )?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let db = client(&a.mongo_uri).await?;
    let mut timeline = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.state.join("timeline.jsonl"))?;
    let mut prev_db: Option<(f64, DbCounters)> = None;
    let mut prev_fe: Option<(u64, u64, u64)> = None;
    let mut scaler = Autoscaler::default();
    let mut last_scale_eval = 0.0;
    let mut util_acc: Vec<f64> = vec![];
    let mut chaos_started = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop_file = a.state.join("conductor.stop");

    loop {
        // The next wall-clock second (+20 ms), so each row is one second of the clock.
        let t = now();
        let next = t.floor() + 1.02;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(next - t)) => {}
            _ = sigterm.recv() => break,
        }
        if stop_file.exists() {
            break;
        }
        let t = now();
        let phase = read_to_string(a.state.join("phase"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();

        // The database (a stopped database must not stop the clock).
        let db_now = tokio::time::timeout(Duration::from_millis(850), server_status(&db))
            .await
            .ok()
            .and_then(|r| r.ok());
        let t_answer = now();
        let mut row = json!({"t": t, "second": t.floor() as i64, "phase": phase});
        if let Some(cur) = db_now {
            if let Some((pt, prev)) = &prev_db {
                // Counters restart from 0 when the database restarts.
                let d = |a: u64, b: u64| if b >= a { b - a } else { b };
                row["db_commands"] = json!(d(prev.counted(), cur.counted()));
                row["db_other"] = json!(d(
                    prev.total() - prev.counted(),
                    cur.total() - cur.counted()
                ));
                row["documents"] = json!(d(prev.inserted, cur.inserted));
                row["span_s"] = json!(((t - pt).round()).max(1.0));
                // The counters were read somewhere between each request and its answer:
                // the longest stretch of time this difference can cover.
                row["window_s"] = json!(t_answer - pt);
                let mut by = BTreeMap::new();
                for c in COUNTED_COMMANDS {
                    let v = d(
                        prev.commands.get(c).copied().unwrap_or(0),
                        cur.commands.get(c).copied().unwrap_or(0),
                    );
                    if v > 0 {
                        by.insert(c, v);
                    }
                }
                row["db_by_name"] = json!(by);
            }
            prev_db = Some((t, cur));
        }

        // HAProxy: requests and 5xx at the front door; connections per replica.
        let stats = haproxy_stat(&a.state);
        let fronts: Vec<_> = stats
            .iter()
            .filter(|r| {
                r.get("svname").map(String::as_str) == Some("FRONTEND")
                    && r.get("pxname").map(String::as_str) == Some("sluice")
            })
            .collect();
        if !fronts.is_empty() {
            // Summed over the HAProxy processes.
            let g = |k: &str| {
                fronts
                    .iter()
                    .map(|fe| fe.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
                    .sum::<u64>()
            };
            // The replicas' rows: the 5xx they answered, and which of them the health
            // check has taken out (as a failed readinessProbe takes a pod out of the
            // Service's endpoints).
            let servers: Vec<_> = stats
                .iter()
                .filter(|r| {
                    r.get("pxname").map(String::as_str) == Some("replicas")
                        && r.get("svname")
                            .is_some_and(|n| n.starts_with("sluice-local-"))
                })
                .collect();
            let replicas_5xx: u64 = servers
                .iter()
                .filter_map(|r| r.get("hrsp_5xx")?.parse::<u64>().ok())
                .sum();
            let checked_down: BTreeSet<&str> = servers
                .iter()
                .filter(|r| r.get("status").is_some_and(|s| s.starts_with("DOWN")))
                .filter_map(|r| r.get("svname").map(String::as_str))
                .collect();
            row["replicas_checked_down"] = json!(checked_down);
            let cur = (g("req_tot"), g("hrsp_5xx"), replicas_5xx);
            if let Some(p) = prev_fe {
                row["requests"] = json!(cur.0.saturating_sub(p.0));
                row["failed"] = json!(cur.1.saturating_sub(p.1));
                // HAProxy's own answers: no replica to send the request to.
                row["haproxy_own_5xx"] = json!(cur
                    .1
                    .saturating_sub(p.1)
                    .saturating_sub(cur.2.saturating_sub(p.2)));
            }
            prev_fe = Some(cur);
        }

        // The replicas.
        let conns = connections_by_port();
        let snapshot: Vec<(usize, u16, Option<u32>, SlotState, bool)> = {
            let s = sh.lock().unwrap();
            s.slots
                .iter()
                .map(|x| (x.idx, x.port, x.pid, x.state, x.expected_exit))
                .collect()
        };
        let mut reps = vec![];
        let mut all_ready = true;
        let mut queue = 0.0;
        let mut utils = vec![];
        let (mut n_ready, mut n_live) = (0, 0);
        for (idx, port, pid, st, expected) in snapshot {
            let Some(pid) = pid else { continue };
            if !alive(pid) {
                if st == SlotState::Ready && !expected {
                    sh.lock().unwrap().restarts += 1;
                    event(&sh, "replica-died", format!("sluice-local-{idx} (pid {pid}) died unexpectedly; restarting it, as the kubelet would"));
                    start_replica(&a, &sh, idx, "restart after an unexpected exit");
                }
                continue;
            }
            n_live += 1;
            let ready = matches!(
                http_get(&http, &format!("http://127.0.0.1:{port}/readyz"), 300).await,
                Some((200, _))
            );
            let metrics = if st == SlotState::Ready {
                http_get(&http, &format!("http://127.0.0.1:{port}/metrics"), 300).await
            } else {
                None
            };
            let depth = metrics
                .as_ref()
                .and_then(|(_, m)| metric_value(m, "sluice_writer_queue_depth"));
            queue += depth.unwrap_or(0.0);
            let cpu_s = procfs::cpu_seconds(pid);
            let mut cpu = None;
            {
                let mut s = sh.lock().unwrap();
                let slot = &mut s.slots[idx];
                if let (Some((pt, prev)), Some(now)) = (slot.cpu_seconds, cpu_s) {
                    cpu = Some((now - prev).max(0.0) / (t - pt).max(0.1));
                }
                slot.cpu_seconds = cpu_s.map(|c| (t, c));
            }
            if st == SlotState::Ready {
                n_ready += 1;
                all_ready &= ready;
                // As metrics-server reads a pod's memory: its resident set.
                if let Some(kib) = procfs::status_kib(pid, "VmRSS:") {
                    utils.push(100.0 * kib as f64 / 1024.0 / hpa.memory_request_mib);
                }
            }
            reps.push(json!({
                "slot": idx, "pid": pid, "port": port, "state": format!("{st:?}"), "ready": ready,
                "cpu_cores": cpu, "rss_kib": procfs::status_kib(pid, "VmRSS:"), "hwm_kib": procfs::status_kib(pid, "VmHWM:"),
                "connections": conns.get(&port).copied().unwrap_or(0), "queue_depth": depth,
            }));
        }
        row["replicas"] = json!(n_ready);
        row["live_pods"] = json!(n_live);
        row["all_ready"] = json!(all_ready && n_ready > 0);
        let quiet = {
            let mut s = sh.lock().unwrap();
            s.all_ready = all_ready && n_ready > 0;
            s.all_ready && !s.faulting
        };
        // What setup-local.sh waits for before the next phase.
        let quiet_file = a.state.join("quiet");
        if quiet {
            std::fs::write(&quiet_file, "")?;
        } else if quiet_file.exists() {
            std::fs::remove_file(&quiet_file)?;
        }
        row["queue_depth"] = json!(queue);
        row["replica"] = json!(reps);

        // Autoscaling, every HPA sync period (15 s, time-scaled), on the average memory.
        if !utils.is_empty() {
            util_acc.push(utils.iter().sum::<f64>() / utils.len() as f64);
        }
        // No scaling once the load is over: the report is about to be written.
        if a.replicas.is_none()
            && phase != "finished"
            && t - last_scale_eval >= (15.0 / scale).max(1.0)
            && !util_acc.is_empty()
        {
            last_scale_eval = t;
            let util = util_acc.iter().sum::<f64>() / util_acc.len() as f64;
            util_acc.clear();
            let (current, busy) = {
                let s = sh.lock().unwrap();
                let cur = s
                    .slots
                    .iter()
                    .filter(|x| matches!(x.state, SlotState::Ready | SlotState::Starting))
                    .count() as u32;
                (cur, s.slots.iter().any(|x| x.state == SlotState::Starting))
            };
            row["memory_util_pct"] = json!(util);
            if !busy {
                let want = scaler.decide(&hpa, scale, t, current, util);
                if want != current {
                    let i = event(
                        &sh,
                        if want > current { "scale-up" } else { "scale-down" },
                        format!("{current} -> {want} replicas (average memory {util:.0}% of the request, target {}%)", hpa.target_pct),
                    );
                    event_set(&sh, i, "replicas", json!(want));
                    let (off, on): (Vec<usize>, Vec<usize>) = {
                        let s = sh.lock().unwrap();
                        (
                            s.slots
                                .iter()
                                .filter(|x| x.state == SlotState::Off)
                                .map(|x| x.idx)
                                .collect(),
                            s.slots
                                .iter()
                                .filter(|x| x.state == SlotState::Ready)
                                .map(|x| x.idx)
                                .collect(),
                        )
                    };
                    if want > current {
                        for idx in off.into_iter().take((want - current) as usize) {
                            start_replica(&a, &sh, idx, "scale-up");
                        }
                    } else {
                        for idx in on.into_iter().rev().take((current - want) as usize) {
                            stop_replica(&a, &sh, idx, "scale-down");
                        }
                    }
                }
            }
        }

        if a.chaos && !chaos_started && phase == "data" {
            chaos_started = true;
            tokio::spawn(chaos(a.clone(), sh.clone()));
        }

        writeln!(timeline, "{row}")?;
        let s = sh.lock().unwrap();
        std::fs::write(
            a.state.join("events.json"),
            serde_json::to_string_pretty(&s.events)?,
        )?;
        std::fs::write(a.state.join("replica-restarts"), s.restarts.to_string())?;
    }
    let s = sh.lock().unwrap();
    std::fs::write(
        a.state.join("events.json"),
        serde_json::to_string_pretty(&s.events)?,
    )?;
    Ok(())
}

/// The faults, each once the last one is over; each event's `end` is when the lab stopped
/// injecting it (the report measures recovery from its start). A fault that would not be
/// over, with the report's window after it, before the load ends is skipped and says so:
/// a fault during the /healthz phase would fail the wrong run.
async fn chaos(a: ConductorArgs, sh: SharedState) {
    let load_s = a.load_seconds.unwrap_or(0.0);
    let end = now() + load_s;
    let (start, gap) = chaos_schedule(load_s, a.chaos_start, a.chaos_gap);
    let hold = (gap / 2.0).clamp(2.0, 10.0);
    let stall = db_timeout(&a.root) + Duration::from_secs(2);
    let plan = format!(
        "faults from {start} s into the {load_s} s /api/data run, {gap} s after each recovery; each needs its own time and {EVENT_WINDOW_S} s after it before the run ends"
    );
    eprintln!("conductor: {plan}");
    event(&sh, "fault-schedule", plan);
    sh.lock().unwrap().faulting = true;
    // Each fault starts once the last one is over: every replica ready again (or 60 s).
    let settle = |sh: SharedState| async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for _ in 0..60 {
            if sh.lock().unwrap().all_ready {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
    };
    // Whether a fault lasting `own_s` fits; if not, its event says why.
    let fits = |sh: &SharedState, kind: &str, own_s: f64| {
        let left = end - now();
        let need = own_s + EVENT_WINDOW_S;
        if left >= need {
            return true;
        }
        let i = event(
            sh,
            kind,
            format!("skipped: {left:.0} s of the load were left; it needs {need:.0} s (its own {own_s:.0} s and the report's {EVENT_WINDOW_S} s window)"),
        );
        event_set(sh, i, "skipped", json!(true));
        event_set(sh, i, "not_enough_time", json!(true));
        event_set(sh, i, "ok", json!(true));
        event_set(sh, i, "end", json!(now()));
        false
    };
    tokio::time::sleep(Duration::from_secs_f64(start)).await;
    let run = |args: &[&str]| {
        let root = a.root.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ctl(&root, &args)
            })
            .await
            .unwrap_or((false, "join".into()))
        }
    };

    // 1. kill -9 one replica; it is replaced at once, as the ReplicaSet would.
    if fits(&sh, "chaos-kill-replica", 1.0) {
        let victim = {
            let s = sh.lock().unwrap();
            s.slots
                .iter()
                .rev()
                .find(|x| x.state == SlotState::Ready)
                .map(|x| x.idx)
        };
        if let Some(idx) = victim {
            sh.lock().unwrap().slots[idx].expected_exit = true;
            let i = event(
                &sh,
                "chaos-kill-replica",
                format!("kill -9 sluice-local-{idx}"),
            );
            let (ok, _) = run(&["replica-kill", &idx.to_string()]).await;
            event_set(&sh, i, "end", json!(now()));
            event_set(&sh, i, "ok", json!(ok));
            sh.lock().unwrap().slots[idx].state = SlotState::Off;
            start_replica(&a, &sh, idx, "replacing the killed replica");
        } else {
            let i = event(&sh, "chaos-kill-replica", "no ready replica to kill".into());
            event_set(&sh, i, "ok", json!(false));
        }
        settle(sh.clone()).await;
    }

    // 2. Redis restarted empty.
    if fits(&sh, "chaos-redis-restart", 2.0) {
        let i = event(
            &sh,
            "chaos-redis-restart",
            "Redis killed and started again, empty, on the same port".into(),
        );
        let (ok, _) = run(&["redis-restart"]).await;
        event_set(&sh, i, "end", json!(now()));
        event_set(&sh, i, "ok", json!(ok));
        settle(sh.clone()).await;
    }

    // 3. The database stopped for longer than a command may take (DB_TIMEOUT_MS), so the
    // replicas see it down: they must stay in HAProxy (their readiness is their own) and
    // answer their own 503 with Retry-After, not HAProxy's.
    if fits(&sh, "chaos-db-stall", stall.as_secs_f64()) {
        let i = event(
            &sh,
            "chaos-db-stall",
            format!(
                "SIGSTOP the database, SIGCONT {} s later (DB_TIMEOUT_MS + 2 s)",
                stall.as_secs_f64()
            ),
        );
        let (ok1, _) = run(&["db-signal", "STOP"]).await;
        tokio::time::sleep(stall).await;
        let (ok2, _) = run(&["db-signal", "CONT"]).await;
        event_set(&sh, i, "end", json!(now()));
        event_set(&sh, i, "stall_end", json!(now()));
        event_set(&sh, i, "ok", json!(ok1 && ok2));
        settle(sh.clone()).await;
    }

    // 4. The database killed; its supervisor starts it again on the same files.
    if fits(&sh, "chaos-db-kill", 3.0) {
        let i = event(
            &sh,
            "chaos-db-kill",
            "kill -9 the database; the supervisor restarts it on the same files".into(),
        );
        let (ok, _) = run(&["db-kill"]).await;
        event_set(&sh, i, "end", json!(now()));
        event_set(&sh, i, "ok", json!(ok));
        settle(sh.clone()).await;
    }

    // 5. The database's disk filled until it refuses writes, then freed (filling takes a
    // few seconds).
    if fits(&sh, "chaos-disk-full", 5.0 + hold) {
        disk_full(&sh, &run, hold).await;
    }
    event(&sh, "chaos-done", "every fault injected or skipped".into());
    sh.lock().unwrap().faulting = false;
}

async fn disk_full<F, R>(sh: &SharedState, run: &F, hold: f64)
where
    F: Fn(&[&str]) -> R,
    R: std::future::Future<Output = (bool, String)>,
{
    let i = event(
        sh,
        "chaos-disk-full",
        "fill the database's disk, hold, free it".into(),
    );
    let (ok, out) = run(&["disk-fill"]).await;
    if ok {
        event_set(
            sh,
            i,
            "detail",
            json!(format!(
                "filled the database's disk ({out}), held it full, freed it"
            )),
        );
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
        let (ok2, out2) = run(&["disk-free"]).await;
        event_set(sh, i, "ok", json!(ok2));
        if !out2.is_empty() {
            event_set(
                sh,
                i,
                "detail",
                json!(format!(
                    "filled the database's disk ({out}), held it full, freed it; {out2}"
                )),
            );
        }
    } else {
        event_set(sh, i, "detail", json!(format!("skipped: {out}")));
        event_set(sh, i, "skipped", json!(true));
        event_set(sh, i, "ok", json!(true));
    }
    event_set(sh, i, "end", json!(now()));
}

// ------------------------------------------------------------------------- report

fn load_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&read_to_string(p)?).ok()
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_f64()
}

fn env_file(p: &Path) -> BTreeMap<String, String> {
    read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Commands a window of `span_s` seconds may hold beyond `budget × span_s`, from the
/// design (the same terms as `tests/reliability.rs`):
/// - one: the cluster's tokens are one period apart, so a window holds one more than its
///   span when a token falls on each of its boundaries;
/// - each live pod's in-flight cap (`FLUSH_CONCURRENCY` + 1): the server counts a command
///   when it completes, so a window may also hold what was sent before it and answered in
///   it (after a stall, all of it at once); the cap is why no more can wait;
/// - around a Redis restart: the one token promised and not yet due that the empty Redis
///   forgot, and each pod's fallback share (`budget / BUDGET_FALLBACK_PODS`) while it is
///   back on the cluster schedule before the others.
fn tolerance(
    budget: f64,
    span_s: f64,
    pods: f64,
    in_flight_cap: f64,
    redis_fallback: Option<f64>,
) -> f64 {
    let restart = redis_fallback.map_or(0.0, |fallback| 1.0 + pods * (budget / fallback).ceil());
    (budget * span_s).round() + 1.0 + pods * in_flight_cap + restart
}

/// The latency a threshold asks of every answer it counts, in ms: a duration percentile's
/// limit, or `error_rate`'s, whose check fails an answer slower than 2 s
/// (stress-test/stress-test.js).
fn latency_limit_ms(name: &str) -> Option<f64> {
    if name.starts_with("error_rate") {
        return Some(2000.0);
    }
    latency_threshold(name).map(|(_, limit_ms)| limit_ms)
}

/// Documents the database must store each second for `vus` closed-loop clients to be
/// answered within `limit_ms`: ASSESSMENT.md's arithmetic, latency = clients ÷
/// throughput, five documents a request. At 10,000 clients and 2 s, 25,000.
fn documents_needed(vus: f64, limit_ms: f64) -> f64 {
    vus * DOCS_PER_REQUEST / (limit_ms / 1000.0)
}

/// The highest mean over `n` consecutive values (over all of them if there are fewer).
fn best_mean(values: &[f64], n: usize) -> f64 {
    let n = n.min(values.len()).max(1);
    values
        .windows(n)
        .map(|w| w.iter().sum::<f64>() / n as f64)
        .fold(0.0, f64::max)
}

/// `(0.99, 5000.0)` from k6's `http_req_duration p(99)<5000`.
fn latency_threshold(name: &str) -> Option<(f64, f64)> {
    let rest = name.strip_prefix("http_req_duration p(")?;
    let (q, limit) = rest.split_once(")<")?;
    Some((q.parse::<f64>().ok()? / 100.0, limit.parse().ok()?))
}

/// From k6's log of a run with `LOG_FAILED_CHECKS=1` (`failed-check <start ms> <end ms>`
/// per iteration that failed a check): how many it logged, and how many of those
/// overlapped none of `windows` (Unix seconds, end excluded).
fn failed_checks(log: &str, windows: &[(f64, f64)]) -> (f64, f64) {
    let (mut logged, mut outside) = (0.0, 0.0);
    for line in log.lines() {
        let Some(rest) = line.split("failed-check ").nth(1) else {
            continue;
        };
        let mut ms = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse::<f64>().ok());
        let (Some(start), Some(end)) = (ms.next(), ms.next()) else {
            continue;
        };
        let (start, end) = (start / 1000.0, end / 1000.0);
        logged += 1.0;
        if !windows.iter().any(|(a, b)| start < *b && end >= *a) {
            outside += 1.0;
        }
    }
    (logged, outside)
}

/// From a Prometheus range query of cumulative histogram buckets by (instance, le): the
/// share of answers within each bucket bound (`le` as a number, so "5" and "5.0" are the
/// same), over the steps `keep` accepts, and how many answers that is. Each series'
/// increase is taken step by step, a drop being a restarted replica's counter.
fn answered_within(data: &Value, keep: impl Fn(f64) -> bool) -> (Vec<(f64, f64)>, f64) {
    let mut counts: Vec<(f64, f64)> = vec![];
    for series in data["result"].as_array().into_iter().flatten() {
        let Some(le) = series["metric"]["le"]
            .as_str()
            .and_then(|le| le.parse::<f64>().ok())
        else {
            continue;
        };
        let mut prev: Option<f64> = None;
        let mut sum = 0.0;
        for v in series["values"].as_array().into_iter().flatten() {
            let (Some(t), Some(x)) = (
                v[0].as_f64(),
                v[1].as_str().and_then(|x| x.parse::<f64>().ok()),
            ) else {
                continue;
            };
            let step = match prev {
                Some(p) if x >= p => x - p,
                Some(_) => x,
                None => 0.0,
            };
            prev = Some(x);
            if keep(t) {
                sum += step;
            }
        }
        match counts.iter_mut().find(|(b, _)| *b == le) {
            Some((_, n)) => *n += sum,
            None => counts.push((le, sum)),
        }
    }
    let all = counts
        .iter()
        .find(|(le, _)| le.is_infinite())
        .map_or(0.0, |(_, n)| *n);
    let shares = counts
        .into_iter()
        .map(|(le, n)| (le, if all > 0.0 { n / all } else { 0.0 }))
        .collect();
    (shares, all)
}

/// The longest a fault may take to recover from and still excuse what happens meanwhile.
const MAX_RECOVERY_S: f64 = 60.0;

/// When every replica was ready again after a fault that started at `t0` and ended at
/// `end`: the first ready sample after the last one not ready before the next fault. Not
/// simply the first ready sample after `end`: readiness lags a fault (a replica notices a
/// dead database only when its commands fail), and the database may fail again on its
/// own after the fault ends (a full disk makes it panic when it is freed).
fn recovered_at(timeline: &[Value], t0: f64, end: f64, next: f64) -> Option<f64> {
    let t = |r: &Value| r["t"].as_f64();
    let last_unready = timeline
        .iter()
        .rev()
        .filter(|r| t(r).is_some_and(|x| x >= t0 && x < next) && r["all_ready"] == false)
        .find_map(t);
    let from = last_unready.map_or(end, |u| u.max(end));
    timeline
        .iter()
        .filter(|r| {
            t(r).is_some_and(|x| x >= from && Some(x) != last_unready) && r["all_ready"] == true
        })
        .filter_map(t)
        .next()
}

fn mem_formula_mib(conns: f64) -> f64 {
    MEM_BASE_MIB + MEM_PER_CONN_KIB * conns / 1024.0
}

async fn prom_query(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    params: &[(&str, String)],
) -> Option<Value> {
    let r = http
        .get(format!("{base}{path}"))
        .query(params)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

async fn report(a: ReportArgs) -> Result<i32, Error> {
    let st = &a.state;
    let meta = env_file(&st.join("meta.env"));
    let settings = env_file(&st.join("sluice.env"));
    let budget: f64 = settings
        .get("DB_COMMAND_BUDGET")
        .and_then(|v| v.parse().ok())
        .unwrap_or(50.0);
    let flush_c: f64 = settings
        .get("FLUSH_CONCURRENCY")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let fallback_pods: f64 = settings
        .get("BUDGET_FALLBACK_PODS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(8.0);
    let timeline: Vec<Value> = read_to_string(st.join("timeline.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut events: Vec<Value> = load_json(&st.join("events.json"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let autoscaler = load_json(&st.join("autoscaler.json")).unwrap_or(Value::Null);
    let data = k6::Summary::read(&st.join("k6-data.json")).map(|s| s.lab_report());
    let ceil = k6::Summary::read(&st.join("k6-healthz.json")).map(|s| s.lab_report());
    let num = |k: &str| meta.get(k).and_then(|v| v.parse::<f64>().ok());
    let chaos = events
        .iter()
        .any(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("chaos-")));

    // Events: failed requests in the 10 s after, seconds until every replica is ready.
    let fault_events: Vec<usize> = (0..events.len())
        .filter(|i| {
            let k = events[*i]["kind"].as_str().unwrap_or("");
            k.starts_with("chaos-") && k != "chaos-done"
        })
        .collect();
    let fault_times: Vec<f64> = fault_events
        .iter()
        .filter_map(|i| events[*i]["t"].as_f64())
        .collect();
    // Where a fault's recovery is looked for: until the next fault, and never more than
    // a minute, so that trouble long after a fault is not excused by it.
    let search_until = |t0: f64, end: f64| {
        fault_times
            .iter()
            .copied()
            .filter(|t| *t > t0)
            .fold(end + MAX_RECOVERY_S, f64::min)
    };
    let mut windows: Vec<(f64, f64)> = vec![];
    for e in events.iter_mut() {
        let kind = e["kind"].as_str().unwrap_or("").to_string();
        if !(kind.starts_with("chaos-")
            || kind.starts_with("scale-")
            || kind.starts_with("replica-"))
        {
            continue;
        }
        let Some(t0) = e["t"].as_f64() else { continue };
        if e["skipped"] == true {
            continue;
        }
        let end = e["end"].as_f64().unwrap_or(t0);
        let failed: f64 = timeline
            .iter()
            .filter(|r| {
                r["t"]
                    .as_f64()
                    .is_some_and(|t| t >= t0 && t < t0 + EVENT_WINDOW_S)
            })
            .filter_map(|r| r["failed"].as_f64())
            .sum();
        e["failed_in_10s"] = json!(failed);
        if kind == "chaos-db-stall" {
            // Readiness is the pod's own: a stalled database must leave every replica in
            // HAProxy, so clients get sluice's 503 and Retry-After, not HAProxy's.
            let until = e["stall_end"].as_f64().unwrap_or(end) + EVENT_WINDOW_S;
            let rows = || {
                timeline.iter().filter(move |r| {
                    r["t"]
                        .as_f64()
                        .is_some_and(|t| t >= t0.floor() && t < until)
                })
            };
            let taken_out: BTreeSet<&str> = rows()
                .filter_map(|r| r["replicas_checked_down"].as_array())
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            e["replicas_taken_out"] = json!(taken_out);
            e["haproxy_own_5xx"] = json!(rows()
                .filter_map(|r| r["haproxy_own_5xx"].as_f64())
                .sum::<f64>());
        }
        if kind.starts_with("chaos-") && kind != "chaos-done" {
            let back = recovered_at(&timeline, t0, end, search_until(t0, end));
            e["recovered_after_s"] = json!(back.map(|b| (b - t0).max(0.0).round()));
            // HAProxy, like the readinessProbe, sends requests again up to 5 s after
            // /readyz answers 200.
            let w_end = (t0 + EVENT_WINDOW_S)
                .max((back.unwrap_or(end) + 6.0).min(end + MAX_RECOVERY_S + 6.0));
            windows.push((t0.floor(), w_end));
        }
    }
    let in_window = |t: f64| windows.iter().any(|(a, b)| t >= *a && t < *b);
    // Seconds from a Redis restart until every pod has asked Redis again
    // (`CLUSTER_RETRY`, 1 s) and a sample has closed after it.
    let redis_windows: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| e["kind"] == "chaos-redis-restart")
        .filter_map(|e| {
            let t0 = e["t"].as_f64()?;
            Some((t0.floor(), e["end"].as_f64().unwrap_or(t0) + 3.0))
        })
        .collect();

    // The budget, second by second.
    let mut over = vec![];
    let mut peak: f64 = 0.0;
    let mut seconds = 0;
    for r in &timeline {
        let (Some(c), Some(t)) = (r["db_commands"].as_f64(), r["t"].as_f64()) else {
            continue;
        };
        let span = r["span_s"].as_f64().unwrap_or(1.0);
        let window = r["window_s"].as_f64().unwrap_or(span).max(span.min(1.0));
        seconds += 1;
        if span <= 1.0 {
            peak = peak.max(c);
        }
        let pods = r["live_pods"].as_f64().unwrap_or(1.0).max(1.0);
        let redis_fault = redis_windows.iter().any(|(a, b)| t >= *a && t < *b);
        let allowed = tolerance(
            budget,
            window,
            pods,
            flush_c + 1.0,
            redis_fault.then_some(fallback_pods),
        );
        if c > allowed {
            over.push(json!({"t": t, "commands": c, "window_s": window, "allowed": allowed}));
        }
    }
    // The budget holds inside fault windows too (the tolerance already allows for the
    // commands a stall releases at once); seconds over inside a window are also counted
    // against the fault that started it, to say which fault broke it.
    let (over_in, over): (Vec<Value>, Vec<Value>) = over
        .into_iter()
        .partition(|o| o["t"].as_f64().is_some_and(in_window));
    // Each such second belongs to the latest fault that started before it.
    let fault_starts: Vec<(usize, f64)> = fault_events
        .iter()
        .filter_map(|i| events[*i]["t"].as_f64().map(|t| (*i, t.floor())))
        .collect();
    for i in &fault_events {
        events[*i]["seconds_over_budget"] = json!(0);
    }
    for o in &over_in {
        let t = o["t"].as_f64().unwrap_or(0.0);
        if let Some((i, _)) = fault_starts.iter().rev().find(|(_, t0)| *t0 <= t) {
            let n = events[*i]["seconds_over_budget"].as_u64().unwrap_or(0);
            events[*i]["seconds_over_budget"] = json!(n + 1);
        }
    }
    let budget_ok = seconds > 0 && over.is_empty() && over_in.is_empty();

    // Lost: 5 documents per acknowledged response against what the collection gained.
    let before = num("records_before");
    let after = num("records_after");
    let acked = data.as_ref().map(|d| {
        d["acknowledged_responses"]
            .as_f64()
            .unwrap_or(0.0)
            .max(d["successful_requests"].as_f64().unwrap_or(0.0))
    });
    // The database's own ceiling, measured after the load on the same database and under
    // the same limits (examples/insert_ceiling.rs, sluice's batch shape): its best rate,
    // and the documents it added, which are not sluice's.
    let ceiling_runs: Vec<Value> = load_json(&st.join("insert-ceiling.json"))
        .and_then(|c| c["runs"].as_array().cloned())
        .unwrap_or_default();
    let db_ceiling = ceiling_runs
        .iter()
        .filter_map(|r| r["documents_per_second"].as_f64())
        .reduce(f64::max);
    let ceiling_documents: f64 = ceiling_runs
        .iter()
        .filter_map(|r| r["documents"].as_f64())
        .sum();
    let (stored, expected, lost) = match (before, after, acked) {
        (Some(b), Some(a), Some(k)) => {
            let stored = a - b - ceiling_documents;
            let expected = DOCS_PER_REQUEST * k;
            (
                Some(stored),
                Some(expected),
                Some((expected - stored).max(0.0)),
            )
        }
        _ => (None, None, None),
    };

    // Memory: each replica's peak RSS against M(C) at its peak connection count.
    let mut per_pid: BTreeMap<u64, (u64, f64, f64)> = BTreeMap::new();
    for r in &timeline {
        for p in r["replica"].as_array().into_iter().flatten() {
            let (Some(pid), Some(slot)) = (p["pid"].as_u64(), p["slot"].as_u64()) else {
                continue;
            };
            let e = per_pid.entry(pid).or_insert((slot, 0.0, 0.0));
            let rss = p["hwm_kib"]
                .as_f64()
                .or(p["rss_kib"].as_f64())
                .unwrap_or(0.0)
                / 1024.0;
            e.1 = e.1.max(rss);
            e.2 = e.2.max(p["connections"].as_f64().unwrap_or(0.0));
        }
    }
    let memory: Vec<Value> = per_pid
        .iter()
        .map(|(pid, (slot, rss, c))| {
            let limit = mem_formula_mib(*c);
            json!({"slot": slot, "pid": pid, "peak_rss_mib": rss, "peak_connections": c,
                   "mib_per_1000_connections": if *c > 0.0 { Some(1000.0 * rss / c) } else { None },
                   "mib_per_1000_connections_above_base": if *c > 0.0 { Some(1000.0 * (rss - MEM_BASE_MIB) / c) } else { None },
                   "formula_mib": limit, "ok": *rss <= limit})
        })
        .collect();
    let memory_ok = memory.iter().all(|m| m["ok"] == true);

    // Prometheus: alerts that fired, replicas scraped, rules evaluated, p95 per second.
    let http = reqwest::Client::new();
    let (t_start, t_end) = (
        timeline
            .first()
            .and_then(|r| r["t"].as_f64())
            .unwrap_or(0.0),
        timeline.last().and_then(|r| r["t"].as_f64()).unwrap_or(0.0),
    );
    let mut alerts = vec![];
    let mut prom = json!({"url": a.prometheus});
    let mut p95: BTreeMap<i64, f64> = BTreeMap::new();
    let mut latency_outside: Option<(Vec<(f64, f64)>, f64)> = None;
    if let Some(base) = &a.prometheus {
        let range = |q: &str| {
            vec![
                ("query", q.to_string()),
                ("start", format!("{:.0}", t_start - 1.0)),
                ("end", format!("{:.0}", t_end + 60.0)),
                ("step", "1".to_string()),
            ]
        };
        if let Some(d) = prom_query(
            &http,
            base,
            "/api/v1/query_range",
            &range("ALERTS{alertstate=\"firing\"}"),
        )
        .await
        {
            for s in d["result"].as_array().into_iter().flatten() {
                let ts: Vec<f64> = s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v[0].as_f64())
                    .collect();
                let (Some(first), Some(last)) = (ts.first(), ts.last()) else {
                    continue;
                };
                let during_chaos = chaos && windows.first().is_some_and(|w| *first >= w.0);
                alerts.push(json!({"alert": s["metric"]["alertname"], "labels": s["metric"], "first_firing": first,
                                    "last_firing": last, "after_a_fault": during_chaos}));
            }
        }
        let mut scraped = BTreeSet::new();
        if let Some(d) = prom_query(&http, base, "/api/v1/query_range", &range("up == 1")).await {
            for s in d["result"].as_array().into_iter().flatten() {
                if let Some(i) = s["metric"]["instance"].as_str() {
                    scraped.insert(i.to_string());
                }
            }
        }
        let mut rules = 0;
        let mut evaluated = 0;
        if let Some(d) = prom_query(&http, base, "/api/v1/rules", &[]).await {
            for g in d["groups"].as_array().into_iter().flatten() {
                for r in g["rules"].as_array().into_iter().flatten() {
                    rules += 1;
                    if r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|s| !s.starts_with("0001"))
                    {
                        evaluated += 1;
                    }
                }
            }
        }
        let q = "histogram_quantile(0.95, sum by (le) (rate(sluice_http_request_duration_seconds_bucket{route=\"/api/data\"}[3s])))";
        if let Some(d) = prom_query(&http, base, "/api/v1/query_range", &range(q)).await {
            for s in d["result"].as_array().into_iter().flatten() {
                for v in s["values"].as_array().into_iter().flatten() {
                    if let (Some(t), Some(x)) = (
                        v[0].as_f64(),
                        v[1].as_str().and_then(|x| x.parse::<f64>().ok()),
                    ) {
                        if x.is_finite() {
                            p95.insert(t as i64, x * 1000.0);
                        }
                    }
                }
            }
        }
        // sluice's own latency outside the fault windows, for judging k6's latency
        // thresholds in a chaos run (k6's summary cannot be split by time).
        let q = "sum by (instance, le) (sluice_http_request_duration_seconds_bucket{route=\"/api/data\"})";
        if let Some(d) = prom_query(&http, base, "/api/v1/query_range", &range(q)).await {
            let data_t: Vec<f64> = timeline
                .iter()
                .filter(|r| r["phase"] == "data")
                .filter_map(|r| r["t"].as_f64())
                .collect();
            if let (Some(first), Some(last)) = (data_t.first(), data_t.last()) {
                let (first, last) = (first.floor(), last.ceil());
                latency_outside = Some(answered_within(&d, |t| {
                    t >= first && t <= last && !in_window(t)
                }));
            }
        }
        // Replicas that were ready for 10 s or more: Prometheus' discovery hands new
        // targets to its scrapers at most every 5 s, so a shorter life may go unseen.
        let mut ready_secs: BTreeMap<u64, u32> = BTreeMap::new();
        for r in &timeline {
            for p in r["replica"].as_array().into_iter().flatten() {
                if p["state"] == "Ready" {
                    if let Some(port) = p["port"].as_u64() {
                        *ready_secs.entry(port).or_insert(0) += 1;
                    }
                }
            }
        }
        let replicas_seen: Vec<u64> = ready_secs
            .iter()
            .filter(|(_, n)| **n >= 10)
            .map(|(p, _)| *p)
            .collect();
        let want: BTreeSet<String> = replicas_seen
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let missing: Vec<&String> = want.difference(&scraped).collect();
        prom["scraped_instances"] = json!(scraped);
        prom["replica_instances"] = json!(want);
        prom["unscraped_replicas"] = json!(missing);
        prom["rules"] = json!(rules);
        prom["rules_evaluated"] = json!(evaluated);
    }
    let alerts_ok = alerts.iter().all(|x| x["after_a_fault"] == true);

    // Cache hit ratios, from each replica's /api/cache/status (sluice's own type).
    let mut caches = BTreeMap::new();
    let (mut l1, mut l2) = ((0u64, 0u64), (0u64, 0u64));
    for entry in std::fs::read_dir(st)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !(name.starts_with("cache-") && name.ends_with(".json")) {
            continue;
        }
        let Some(text) = read_to_string(entry.path()) else {
            continue;
        };
        if let Ok(s) = serde_json::from_str::<sluice::status::Status>(&text) {
            l1 = (l1.0 + s.l1.hits, l1.1 + s.l1.misses);
            l2 = (l2.0 + s.l2.hits, l2.1 + s.l2.misses);
            caches.insert(s.pod.clone(), json!({"l1_hits": s.l1.hits, "l1_misses": s.l1.misses,
                "l2_hits": s.l2.hits, "l2_misses": s.l2.misses, "documents_stored": s.writer.documents_stored}));
        }
    }
    let ratio = |(h, m): (u64, u64)| {
        if h + m > 0 {
            Some(h as f64 / (h + m) as f64)
        } else {
            None
        }
    };

    // The timeline, trimmed to what the chart and a reader need.
    let tl: Vec<Value> = timeline
        .iter()
        .map(|r| {
            let sec = r["second"].as_i64().unwrap_or(0);
            json!({"t": r["t"], "phase": r["phase"], "replicas": r["replicas"], "live_pods": r["live_pods"],
                   "req_per_s": r["requests"], "failed_per_s": r["failed"], "p95_ms": p95.get(&sec),
                   "db_commands": r["db_commands"], "db_span_s": r["span_s"], "db_other_commands": r["db_other"],
                   "documents": r["documents"], "queue_depth": r["queue_depth"], "all_ready": r["all_ready"],
                   "memory_util_pct": r["memory_util_pct"]})
        })
        .collect();

    // Thresholds: sluice's unless /healthz fails the same one on this machine, or the
    // database's own ceiling is below what it asks.
    let best_stored = best_mean(
        &timeline
            .iter()
            .filter(|r| r["phase"] == "data")
            .map(|r| r["documents"].as_f64().unwrap_or(0.0))
            .collect::<Vec<_>>(),
        10,
    );
    let mut thresholds = vec![];
    let mut sluice_threshold_fail = false;
    let (req_out, failed_out) = timeline
        .iter()
        .filter(|r| r["phase"] == "data" && !r["t"].as_f64().is_some_and(in_window))
        .fold((0.0, 0.0), |(q, fl), r| {
            (
                q + r["requests"].as_f64().unwrap_or(0.0),
                fl + r["failed"].as_f64().unwrap_or(0.0),
            )
        });
    // Failures k6 saw that HAProxy never answered with a 5xx (client timeouts, refused
    // connections) cannot be placed in time: all of them count as outside the windows.
    let haproxy_5xx: f64 = timeline
        .iter()
        .filter(|r| r["phase"] == "data")
        .filter_map(|r| r["failed"].as_f64())
        .sum();
    let k6_failed = data.as_ref().map_or(0.0, |d| {
        d["requests"].as_f64().unwrap_or(0.0) * d["http_req_failed_rate"].as_f64().unwrap_or(0.0)
    });
    let unplaced = (k6_failed - haproxy_5xx).max(0.0).round();
    let failed_rate_outside = if req_out > 0.0 {
        Some((failed_out + unplaced) / req_out)
    } else {
        None
    };
    // Share of sluice's answers outside the fault windows within `limit_ms`, and how many
    // answers that is over.
    let within = |limit_ms: f64| {
        let (shares, answers) = latency_outside.as_ref()?;
        let share = shares
            .iter()
            .find(|(le, _)| (le - limit_ms / 1000.0).abs() < 1e-9)
            .map(|(_, share)| *share)?;
        Some((share, *answers))
    };
    if let Some(d) = &data {
        for (name, passed) in d["thresholds"].as_object().into_iter().flatten() {
            let k6_passed = passed.as_bool().unwrap_or(false);
            let healthz = ceil.as_ref().and_then(|c| c["thresholds"][name].as_bool());
            let mut passed = k6_passed;
            let mut how = "k6".to_string();
            // In a chaos run, `http_req_failed` and `error_rate`, if k6 failed them over
            // the whole run and /healthz passed them (so they decide the exit code), are
            // judged again outside the fault windows: failed requests placed in time by
            // HAProxy's 5xx, failed iterations (errors, wrong bodies, answers slower than
            // 2 s) by k6's own log of each. The latency percentiles are never re-judged:
            // k6's summary cannot be split by time.
            if chaos && !k6_passed && healthz == Some(true) {
                let failed = |r: f64| {
                    format!("HAProxy's 5xx outside the fault windows plus the {unplaced:.0} failures k6 saw and HAProxy did not: {:.3}%", 100.0 * r)
                };
                let rejudged = if name.starts_with("http_req_failed") {
                    failed_rate_outside.map(|r| (r < 0.01, failed(r)))
                } else if name.starts_with("error_rate") {
                    // Any failed check (an error, a wrong body, an answer slower than 2 s),
                    // placed in time by k6's own log of each failed iteration; failed
                    // iterations k6 counted but did not log count as outside.
                    let k6_failed = data.as_ref().and_then(|d| d["failed_iterations"].as_f64());
                    let log = read_to_string(st.join("k6-data.log")).unwrap_or_default();
                    let (logged, outside) = failed_checks(&log, &windows);
                    k6_failed.filter(|_| logged > 0.0 && req_out > 0.0).map(|k6_failed| {
                        let unlogged = (k6_failed - logged).max(0.0).round();
                        let rate = (outside + unlogged) / req_out;
                        (rate < 0.01, format!(
                            "k6's log of each failed iteration: {logged:.0} logged, {outside:.0} of them overlapping no fault window, plus {unlogged:.0} k6 counted and did not log, over {req_out:.0} requests outside the windows: {:.3}%",
                            100.0 * rate
                        ))
                    })
                } else {
                    None
                };
                if let Some((ok, text)) = rejudged {
                    passed = ok;
                    how = text;
                }
            }
            // For reference only: sluice's own histogram cannot see HAProxy's queue or
            // k6's own time, so it never turns a failed latency threshold into a pass.
            if !passed {
                if let Some((limit_ms, (share, n))) = latency_threshold(name)
                    .and_then(|(_, limit_ms)| within(limit_ms).map(|w| (limit_ms, w)))
                {
                    how = format!(
                        "k6; for reference, sluice's own histogram has {:.3}% of {n:.0} answers within {limit_ms} ms{} (server side, without HAProxy's queue and k6's time)",
                        100.0 * share,
                        if chaos { " outside the fault windows" } else { "" }
                    );
                }
            }
            // The database's ceiling: a latency this run's clients could not get from a
            // database that stores at most `db_ceiling` documents a second.
            // Only while sluice itself stored near that ceiling (0.9 of it over its best
            // 10 s, the load report's goal for stored ÷ ceiling): a sluice that stores
            // less is the bound, not the database.
            let db_bound = latency_limit_ms(name)
                .zip(data.as_ref().and_then(|d| d["vus_max"].as_f64()))
                .zip(db_ceiling)
                .map(|((limit_ms, vus), ceiling)| (documents_needed(vus, limit_ms), ceiling, vus))
                .filter(|(needed, ceiling, _)| ceiling < needed);
            if let (false, Some((needed, ceiling, vus))) = (passed, db_bound) {
                how = format!(
                    "{how}; {vus:.0} clients answered within the limit need {needed:.0} documents stored a second; the database stores at most {ceiling:.0} (its insert ceiling, this run), sluice stored {best_stored:.0} over its best 10 s ({:.2} of it)",
                    best_stored / ceiling
                );
            }
            let db_bound = db_bound.filter(|(_, ceiling, _)| best_stored >= 0.9 * ceiling);
            let verdict = match (passed, healthz) {
                (true, _) if k6_passed => "pass",
                (true, _) => "pass outside the fault windows",
                (false, Some(false)) => "machine's ceiling (/healthz fails it too)",
                (false, _) if db_bound.is_some() => {
                    "the database's ceiling (no service could pass it on this database)"
                }
                (false, _) => {
                    sluice_threshold_fail = true;
                    "FAIL (sluice: /healthz passes it)"
                }
            };
            thresholds.push(
                json!({"threshold": name, "k6_passed": k6_passed, "api_data_passed": passed,
                       "judged_by": how, "healthz_passed": healthz, "verdict": verdict}),
            );
        }
    }

    let replica_restarts: f64 = read_to_string(st.join("replica-restarts"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0);
    let db_restarts = num("db_restarts").unwrap_or(0.0);
    // The supervisor logs each restart with its Unix time first; one inside a fault's
    // window (a kill, a full disk that keeps it from starting) is the fault's.
    let unexpected_db_restarts = read_to_string(st.join("db-restarts.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .filter(|t| !in_window(*t))
        .count() as f64;
    let faults_failed: Vec<&Value> = fault_events
        .iter()
        .map(|i| &events[*i])
        .filter(|e| e["ok"] != true)
        .collect();

    let formula = format!("{MEM_BASE_MIB} MiB + {MEM_PER_CONN_KIB} KiB x connections");
    let mut checks = json!({
        "lost == 0": lost.map(|l| l == 0.0),
        "budget held in every second, faults included (within the tolerance)": budget_ok,
        "no replica restarted unexpectedly": replica_restarts == 0.0,
        "the database never died unless a fault killed it": unexpected_db_restarts == 0.0,
        "no alert fired except after an injected fault": alerts_ok,
        "every injected fault happened": faults_failed.is_empty(),
    });
    checks[format!("peak RSS within {formula}")] = json!(memory_ok);
    let stalls: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "chaos-db-stall" && e["replicas_taken_out"].is_array())
        .collect();
    if !stalls.is_empty() {
        checks["a database stall kept every replica in HAProxy (sluice answered, not HAProxy)"] =
            json!(stalls.iter().all(|e| {
                e["replicas_taken_out"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
                    && e["haproxy_own_5xx"].as_f64() == Some(0.0)
            }));
    }
    let sluice_ok = checks
        .as_object()
        .unwrap()
        .values()
        .all(|v| v == &json!(true));
    let pass = sluice_ok && !sluice_threshold_fail;
    let rule = "exit 0 when sluice passed every one of its own checks and every k6 threshold that /healthz passed on this machine; a threshold /healthz also fails is the machine's ceiling; a latency threshold that asks more documents a second than the database's own insert ceiling (measured after the load, same database, same limits; clients x 5 documents / the limit, ASSESSMENT.md's arithmetic) is the database's ceiling, as long as sluice stored at least 0.9 of that ceiling over its best 10 s; with --chaos, failed requests inside a fault's window (its start to 10 s after, or until every replica is ready again and HAProxy has seen it) are reported per event and left out, and so are iterations that failed a check (k6 logs each one with its start and end) and overlapped such a window; latency percentiles are k6's over the whole run";
    let tol_text = format!(
        "commands counted per wall-clock second from serverStatus ({}) may exceed DB_COMMAND_BUDGET = {budget} (times the sample's window when serverStatus answered late) by one token on the window's edge, plus each live pod's in-flight cap (FLUSH_CONCURRENCY + 1 = {}: the server counts a command when it completes), plus, for 3 s after a Redis restart, one forgotten token and each pod's fallback share (budget / BUDGET_FALLBACK_PODS = {budget} / {fallback_pods})",
        COUNTED_COMMANDS.join(", "),
        flush_c + 1.0
    );

    let report = json!({
        "meta": meta,
        "autoscaler": autoscaler,
        "verdict": if pass { "PASS" } else { "FAIL" },
        "exit_rule": rule,
        "checks": checks,
        "lost": lost,
        "documents": {"stored": stored, "expected_5x_acknowledged": expected, "before": before, "after": after},
        "db_insert_ceiling": {"documents_per_second": db_ceiling, "documents_added": ceiling_documents, "runs": ceiling_runs},
        "budget": {"db_command_budget": budget, "flush_concurrency": flush_c, "counted_commands": COUNTED_COMMANDS,
                   "tolerance": tol_text, "seconds_checked": seconds, "seconds_over": over,
                   "seconds_over_in_fault_windows": over_in},
        "peak_commands_per_s": peak,
        "api_data": data,
        "healthz_ceiling": ceil,
        "thresholds": thresholds,
        "failed_rate_outside_fault_windows": failed_rate_outside,
        "memory": {"formula": format!("M(C) = {formula} (docs/deploy.md, sizing)"), "replicas": memory},
        "restarts": {"replicas_unexpected": replica_restarts, "database": db_restarts, "database_unexpected": unexpected_db_restarts},
        "prometheus": prom,
        "cache": {"replicas": caches, "l1_hit_ratio": ratio(l1), "l2_hit_ratio": ratio(l2)},
        "alerts": alerts,
        "events": events,
        "timeline": tl,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)? + "\n")?;
    let svg = a.out.with_extension("svg");
    if let Err(e) = chart(&svg, &tl, &events, budget) {
        eprintln!("chart: {e}");
    }

    // ---- the terminal
    let show = |p: &Path| {
        p.strip_prefix(&a.root)
            .map(|x| x.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    };
    let ok = |b: &Value| match b.as_bool() {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "n/a",
    };
    let line = "-".repeat(100);
    println!("{line}");
    println!(
        "profile {} · {} · database {}",
        meta.get("profile").map_or("?", |s| s),
        autoscaler["mode"].as_str().unwrap_or("?"),
        meta.get("constraints").map_or("?", |s| s)
    );
    if let Some(d) = &data {
        println!(
            "/api/data: {:.0} req/s, p95 {:.0} ms, {:.0} ok / {:.0} failed   /healthz (same run, same profile): {:.0} req/s, p95 {:.0} ms",
            d["req_per_s"].as_f64().unwrap_or(0.0),
            d["p95_ms"].as_f64().unwrap_or(0.0),
            d["successful_requests"].as_f64().unwrap_or(0.0),
            d["failed_requests"].as_f64().unwrap_or(0.0),
            ceil.as_ref().and_then(|c| c["req_per_s"].as_f64()).unwrap_or(0.0),
            ceil.as_ref().and_then(|c| c["p95_ms"].as_f64()).unwrap_or(0.0)
        );
    }
    let n = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.0}"));
    if let Some(c) = db_ceiling {
        println!(
            "database insert ceiling (after the load, same database and limits): {c:.0} documents/s; sluice stored {best_stored:.0}/s over its best 10 s ({:.2} of it)",
            best_stored / c
        );
    }
    println!(
        "documents stored {} / 5 x acknowledged {} (lost {}); peak database commands in one second {peak}",
        n(stored),
        n(expected),
        n(lost)
    );
    println!("budget tolerance: {tol_text}");
    if !events.is_empty() {
        println!("\nevents (time from the first sample):");
        println!(
            "  {:>6}  {:<22} {:>8} {:>10}  detail",
            "t (s)", "event", "failed/10s", "ready after"
        );
        for e in &events {
            println!(
                "  {:>6.0}  {:<22} {:>8} {:>10}  {}",
                e["t"].as_f64().unwrap_or(0.0) - t_start,
                e["kind"].as_str().unwrap_or(""),
                e["failed_in_10s"]
                    .as_f64()
                    .map_or("-".to_string(), |x| format!("{x:.0}")),
                e["recovered_after_s"]
                    .as_f64()
                    .map_or("-".to_string(), |s| format!("{s:.0} s")),
                e["detail"].as_str().unwrap_or("")
            );
            if let Some(out) = e["replicas_taken_out"].as_array() {
                println!(
                    "  {:>6}  {:<22} replicas HAProxy took out: {}; HAProxy's own 5xx: {}",
                    "",
                    "",
                    if out.is_empty() {
                        "none".to_string()
                    } else {
                        out.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    e["haproxy_own_5xx"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    println!(
        "\nalerts fired: {}",
        if alerts.is_empty() {
            "none".to_string()
        } else {
            alerts
                .iter()
                .map(|x| {
                    format!(
                        "{} at +{:.0} s{}",
                        x["alert"].as_str().unwrap_or("?"),
                        x["first_firing"].as_f64().unwrap_or(0.0) - t_start,
                        if x["after_a_fault"] == true {
                            " (after a fault)"
                        } else {
                            ""
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    if let Some(u) = &a.prometheus {
        println!(
            "prometheus {u}: {} rules, {} evaluated; scraped {} of {} replica instances",
            prom["rules"],
            prom["rules_evaluated"],
            prom["replica_instances"].as_array().map_or(0, |v| v.len())
                - prom["unscraped_replicas"].as_array().map_or(0, |v| v.len()),
            prom["replica_instances"].as_array().map_or(0, |v| v.len())
        );
    }
    if !caches.is_empty() {
        let pct = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{:.1}%", 100.0 * r));
        println!(
            "cache hit ratios: L1 {}, L2 {}",
            pct(ratio(l1)),
            pct(ratio(l2))
        );
        for (pod, c) in &caches {
            println!(
                "  {pod}: L1 {} hits / {} misses, L2 {} hits / {} misses, {} documents stored",
                c["l1_hits"], c["l1_misses"], c["l2_hits"], c["l2_misses"], c["documents_stored"]
            );
        }
    }
    for m in &memory {
        let c = m["peak_connections"].as_f64().unwrap_or(0.0);
        let per_1000 = if c >= 1000.0 {
            format!(
                ", {:.0} MiB per 1,000 connections",
                m["mib_per_1000_connections"].as_f64().unwrap_or(0.0)
            )
        } else {
            String::new()
        };
        println!(
            "memory sluice-local-{} (pid {}): peak RSS {:.0} MiB at {c:.0} open connections; M({c:.0}) = {:.0} MiB{per_1000}",
            m["slot"],
            m["pid"],
            m["peak_rss_mib"].as_f64().unwrap_or(0.0),
            m["formula_mib"].as_f64().unwrap_or(0.0)
        );
    }
    println!("\nSLUICE'S OWN CHECKS");
    for (k, v) in checks.as_object().unwrap() {
        println!("  {:<6} {k}", ok(v));
    }
    if !over.is_empty() {
        println!(
            "         seconds over the budget: {}",
            serde_json::to_string(&over)?
        );
    }
    if !over_in.is_empty() {
        println!(
            "         seconds over the budget inside fault windows: {}",
            serde_json::to_string(&over_in)?
        );
    }
    println!("K6 THRESHOLDS (/api/data, against /healthz on this machine)");
    for t in &thresholds {
        let how = t["judged_by"].as_str().unwrap_or("k6");
        println!(
            "  {:<34} {}{}",
            t["threshold"].as_str().unwrap_or(""),
            t["verdict"].as_str().unwrap_or(""),
            if how == "k6" {
                String::new()
            } else {
                format!(" (k6 failed it over the whole run; judged by {how})")
            }
        );
    }
    println!("\nrule: {rule}");
    println!(
        "VERDICT: {}  (report {}, chart {})",
        if pass { "PASS" } else { "FAIL" },
        show(&a.out),
        show(&svg)
    );
    println!("{line}");
    Ok(if pass { 0 } else { 3 })
}

/// What the CI smoke demands of a short chaos run with autoscaling.
fn check_report(r: &Value, path: &Path, constrained: bool) -> Vec<(bool, String)> {
    let mut out = vec![];
    let mut check = |ok: bool, what: String| out.push((ok, what));
    let events = r["events"].as_array().cloned().unwrap_or_default();
    for kind in [
        "chaos-kill-replica",
        "chaos-redis-restart",
        "chaos-db-stall",
        "chaos-db-kill",
        "chaos-disk-full",
    ] {
        let e = events.iter().find(|e| e["kind"] == kind);
        let happened =
            e.is_some_and(|e| e["ok"] == true && e["t"].is_number() && e["end"].is_number());
        let recovered = e.and_then(|e| e["recovered_after_s"].as_f64());
        // The CI run is long enough for every fault; only a machine without a disk to
        // fill may skip one.
        let skipped = e.is_some_and(|e| e["skipped"] == true);
        let no_time = e.is_some_and(|e| e["not_enough_time"] == true);
        check(
            happened && (recovered.is_some() || (skipped && !no_time)),
            format!(
                "fault {kind} happened and was recorded (ready again after {} s{})",
                recovered.map_or("?".into(), |s| format!("{s:.0}")),
                match e.filter(|_| skipped) {
                    Some(e) => format!(", {}", e["detail"].as_str().unwrap_or("skipped")),
                    None => String::new(),
                }
            ),
        );
    }
    let scaled = events
        .iter()
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("scale-")))
        .count();
    check(
        scaled > 0,
        format!("the autoscaler scaled ({scaled} events)"),
    );
    check(
        r["lost"] == json!(0.0),
        format!("lost == 0 ({})", r["lost"]),
    );
    let over = r["budget"]["seconds_over"]
        .as_array()
        .map_or(usize::MAX, |v| v.len());
    let secs = r["budget"]["seconds_checked"].as_u64().unwrap_or(0);
    let over_in = r["budget"]["seconds_over_in_fault_windows"]
        .as_array()
        .map_or(usize::MAX, |v| v.len());
    check(
        over == 0 && over_in == 0 && secs > 0,
        format!(
            "no second over the budget beyond the tolerance, faults included ({secs} seconds checked, {over} over outside fault windows, {over_in} inside; peak {} commands/s)",
            r["peak_commands_per_s"]
        ),
    );
    let p = &r["prometheus"];
    let want = p["replica_instances"].as_array().map_or(0, |v| v.len());
    let missing = p["unscraped_replicas"]
        .as_array()
        .map_or(usize::MAX, |v| v.len());
    check(
        want > 0 && missing == 0,
        format!("Prometheus scraped every replica ({want} instances, {missing} missed)"),
    );
    let rules = p["rules"].as_u64().unwrap_or(0);
    check(
        rules > 0 && p["rules_evaluated"].as_u64() == Some(rules),
        format!(
            "Prometheus evaluated every alert rule ({} of {rules})",
            p["rules_evaluated"]
        ),
    );
    check(
        r["alerts"].is_array(),
        "the report lists the alerts that fired".into(),
    );
    let tl = r["timeline"].as_array().cloned().unwrap_or_default();
    let fields = [
        "replicas",
        "req_per_s",
        "p95_ms",
        "db_commands",
        "documents",
        "queue_depth",
    ];
    let full = fields
        .iter()
        .all(|f| tl.iter().any(|row| row[*f].is_number()));
    check(
        tl.len() > 10 && full,
        format!(
            "the timeline has a row per second with {} ({} rows)",
            fields.join(", "),
            tl.len()
        ),
    );
    check(
        path.with_extension("svg").exists(),
        "the SVG chart is beside the report".into(),
    );
    let stem = path.with_extension("");
    let html = PathBuf::from(format!("{}-k6-data.html", stem.display()));
    check(
        html.exists(),
        "k6's HTML report is beside the report".into(),
    );
    if constrained {
        check(
            r["meta"]["constrained"] == "true",
            "the database ran constrained (the machine allows it)".into(),
        );
    }
    out
}

fn chart(path: &Path, tl: &[Value], events: &[Value], budget: f64) -> Result<(), Error> {
    let t0 = tl.first().and_then(|r| r["t"].as_f64()).unwrap_or(0.0);
    let xs = |k: &'static str| -> Vec<(f64, f64)> {
        tl.iter()
            .filter_map(|r| Some((r["t"].as_f64()? - t0, r[k].as_f64()?)))
            .collect()
    };
    let x_max = tl
        .last()
        .and_then(|r| r["t"].as_f64())
        .map_or(1.0, |t| (t - t0).max(1.0));
    let root = SVGBackend::new(path, (1100, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((4, 1));
    let specs: [(&str, Vec<(&'static str, RGBColor)>); 4] = [
        (
            "requests per second (HAProxy) and failed",
            vec![("req_per_s", BLUE), ("failed_per_s", RED)],
        ),
        (
            "database commands per second (budget dashed)",
            vec![("db_commands", BLACK)],
        ),
        (
            "replicas and p95 of /api/data (ms / 100)",
            vec![("replicas", GREEN), ("p95_ms", MAGENTA)],
        ),
        (
            "write queue depth (all replicas)",
            vec![("queue_depth", CYAN)],
        ),
    ];
    for (area, (title, series)) in panels.iter().zip(specs) {
        type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
        let data: Vec<Series> = series
            .iter()
            .map(|(k, c)| {
                let mut v = xs(k);
                if *k == "p95_ms" {
                    v.iter_mut().for_each(|p| p.1 /= 100.0);
                }
                (*k, *c, v)
            })
            .collect();
        let mut y_max = data
            .iter()
            .flat_map(|d| d.2.iter().map(|p| p.1))
            .fold(1.0, f64::max);
        if title.starts_with("database") {
            y_max = y_max.max(budget * 1.3);
        }
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.05)?;
        c.configure_mesh()
            .x_desc("seconds")
            .light_line_style(WHITE)
            .draw()?;
        for e in events {
            if let Some(t) = e["t"].as_f64() {
                let k = e["kind"].as_str().unwrap_or("");
                let col = if k.starts_with("chaos") {
                    RED.mix(0.4)
                } else {
                    GREEN.mix(0.3)
                };
                c.draw_series(LineSeries::new(vec![(t - t0, 0.0), (t - t0, y_max)], col))?;
            }
        }
        if title.starts_with("database") {
            c.draw_series(DashedLineSeries::new(
                vec![(0.0, budget), (x_max, budget)],
                6,
                4,
                BLACK.mix(0.5).into(),
            ))?;
        }
        for (k, col, v) in data {
            c.draw_series(LineSeries::new(v, col))?
                .label(k)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn reads_the_hpa_and_the_surge() {
        let h = Hpa::load(&repo()).unwrap();
        assert!(h.min >= 1 && h.max >= h.min);
        assert!(h.target_pct > 0.0 && h.memory_request_mib > 0.0);
        assert!(!h.up.policies.is_empty() && !h.down.policies.is_empty());
        assert!(h.surge >= 1);
    }

    fn hpa() -> Hpa {
        Hpa::parse(
            "spec:
  minReplicas: 2
  maxReplicas: 6
  metrics:
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: 70
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 0
      selectPolicy: Max
      policies:
        - type: Percent
          value: 100
          periodSeconds: 15
        - type: Pods
          value: 2
          periodSeconds: 15
    scaleDown:
      selectPolicy: Min
      policies:
        - type: Pods
          value: 1
          periodSeconds: 60
",
            "spec:
  strategy:
    rollingUpdate:
      maxSurge: 1
  template:
    spec:
      containers:
        - name: sluice
          resources:
            requests:
              memory: 192Mi
",
        )
        .unwrap()
    }

    #[test]
    fn scales_up_fast_and_down_slowly() {
        let h = hpa();
        assert_eq!(h.up.policies.len(), 2);
        assert_eq!(h.down.window_s, 300.0);
        let mut s = Autoscaler::default();
        // 2 pods at 3x the target want 6; the policies allow max(2 x 2, 2 + 2) = 4.
        assert_eq!(s.decide(&h, 1.0, 0.0, 2, 210.0), 4);
        // Within the same 15 s period no more; after it, the rest.
        assert_eq!(s.decide(&h, 1.0, 5.0, 4, 210.0), 4);
        assert_eq!(s.decide(&h, 1.0, 20.0, 4, 210.0), 6);
        // Load gone: nothing for the 300 s window, then one pod a minute.
        assert_eq!(s.decide(&h, 1.0, 100.0, 6, 5.0), 6);
        assert_eq!(s.decide(&h, 1.0, 330.0, 6, 5.0), 5);
        assert_eq!(s.decide(&h, 1.0, 350.0, 5, 5.0), 5);
        assert_eq!(s.decide(&h, 1.0, 395.0, 5, 5.0), 4);
        // Inside the 10% tolerance nothing moves.
        let mut s = Autoscaler::default();
        assert_eq!(s.decide(&h, 1.0, 0.0, 3, 75.0), 3);
        // Time-scaled by 10: the 300 s window is 30 s.
        let mut s = Autoscaler::default();
        assert_eq!(s.decide(&h, 10.0, 0.0, 4, 5.0), 4);
        assert_eq!(s.decide(&h, 10.0, 31.0, 4, 5.0), 3);
    }

    #[test]
    fn the_tolerance_is_the_edge_token_and_each_pods_in_flight_cap() {
        assert_eq!(tolerance(50.0, 1.0, 3.0, 2.0, None), 57.0);
        assert_eq!(tolerance(50.0, 1.3, 2.0, 2.0, None), 70.0);
        // Around a Redis restart: one forgotten token, each pod's fallback share.
        assert_eq!(
            tolerance(50.0, 1.0, 3.0, 2.0, Some(8.0)),
            57.0 + 1.0 + 3.0 * 7.0
        );
    }

    #[test]
    fn a_latency_the_database_cannot_give_is_its_ceiling() {
        assert_eq!(documents_needed(10_000.0, 2000.0), 25_000.0);
        assert_eq!(documents_needed(10_000.0, 5000.0), 10_000.0);
        assert_eq!(latency_limit_ms("error_rate rate<0.01"), Some(2000.0));
        assert_eq!(
            latency_limit_ms("http_req_duration p(99)<5000"),
            Some(5000.0)
        );
        assert_eq!(latency_limit_ms("http_req_failed rate<0.01"), None);
        assert_eq!(best_mean(&[1.0, 5.0, 3.0, 0.0], 2), 4.0);
        assert_eq!(best_mean(&[2.0], 10), 2.0);
        assert_eq!(best_mean(&[], 10), 0.0);
    }

    #[test]
    fn memory_formula_is_the_deploy_checks() {
        // The same figures as scripts/deploy/check_manifests.py's SIZING, which sizes
        // the Deployment: the lab checks each replica against what the pod is given.
        let py = include_str!("../../scripts/deploy/check_manifests.py");
        let line = py
            .lines()
            .find(|l| l.trim_start().starts_with("\"sluice\": {\"base\":"))
            .expect("SIZING has a sluice line");
        let figure = |key: &str| -> f64 {
            let rest = &line[line.find(key).unwrap() + key.len()..];
            rest.trim_start_matches([' ', ':'])
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(
            (MEM_BASE_MIB, MEM_PER_CONN_KIB),
            (figure("\"base\""), figure("\"k_kib\""))
        );
        assert_eq!(mem_formula_mib(1024.0), MEM_BASE_MIB + MEM_PER_CONN_KIB);
    }

    #[test]
    fn free_ports_skip_the_listed_and_the_bound_and_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let used = dir.path().join("ports");
        let first = free_port(7, &used).unwrap();
        assert!((20_000..32_000).contains(&first));
        let second = free_port(7, &used).unwrap();
        assert_ne!(first, second, "a listed port is not handed out again");
        // Held here, or by something else if this bind fails: taken either way.
        let _held = std::net::TcpListener::bind(("127.0.0.1", second + 1));
        let third = free_port(7, &used).unwrap();
        assert!(![first, second, second + 1].contains(&third));
        assert_eq!(
            std::fs::read_to_string(&used).unwrap(),
            format!("{first}\n{second}\n{third}\n")
        );
        // The search wraps around the top of the range.
        std::fs::write(&used, "31999\n").unwrap();
        let wrapped = free_port(11_999, &used).unwrap();
        assert!(wrapped != 31_999 && (20_000..32_000).contains(&wrapped));
    }

    #[test]
    fn failed_iterations_that_overlap_a_fault_window_are_left_out() {
        let log = r#"time="2026-11-23T18:00:00Z" level=info msg="failed-check 100000 102500" source=console
time="2026-11-23T18:00:01Z" level=info msg="failed-check 108000 108100" source=console
time="2026-11-23T18:00:02Z" level=info msg="failed-check 119900 120300" source=console
running (0m30.0s), 30/30 VUs, 1200 complete and 0 interrupted iterations
time="2026-11-23T18:00:03Z" level=info msg="failed-check 130000" source=console"#;
        // A fault from 101 s to 110 s: the first two overlap it; the third ends after
        // it and starts before the next one; the last line is cut and not counted.
        assert_eq!(
            failed_checks(log, &[(101.0, 110.0), (120.5, 130.0)]),
            (3.0, 1.0)
        );
        // An iteration ending exactly where a window starts overlaps it.
        assert_eq!(failed_checks(log, &[(120.3, 125.0)]), (3.0, 2.0));
        assert_eq!(failed_checks("", &[]), (0.0, 0.0));
    }

    #[test]
    fn latency_shares_come_from_bucket_increases_outside_the_windows() {
        assert_eq!(
            latency_threshold("http_req_duration p(99)<5000"),
            Some((0.99, 5000.0))
        );
        assert_eq!(latency_threshold("http_req_failed rate<0.01"), None);
        let series = |inst: &str, le: &str, v: &[f64]| {
            json!({"metric": {"instance": inst, "le": le},
                   "values": v.iter().enumerate().map(|(i, x)| json!([i as f64, x.to_string()])).collect::<Vec<_>>()})
        };
        // Two replicas; the second restarts (its counters drop) at t=2. Step 3 is in a
        // fault window, where every answer took longer than 5 s.
        let data = json!({"result": [
            series("a", "5.0", &[0.0, 10.0, 20.0, 20.0]),
            series("a", "+Inf", &[0.0, 10.0, 20.0, 120.0]),
            series("b", "5", &[50.0, 60.0, 5.0, 5.0]),
            series("b", "+Inf", &[50.0, 70.0, 5.0, 5.0]),
        ]});
        let (within, answers) = answered_within(&data, |t| t < 3.0);
        // a: 20 of 20; b: 10 of 20, then 5 of 5 after the restart.
        assert_eq!(answers, 45.0);
        assert!(within.contains(&(5.0, 35.0 / 45.0)));
        assert!(within.contains(&(f64::INFINITY, 1.0)));
    }

    #[test]
    fn recovery_waits_for_readiness_that_lags_the_fault() {
        let row = |t: f64, ready: bool| json!({"t": t, "all_ready": ready});
        // A kill at 10 ends at 10.2; replicas still look ready at 11, then not until 18.
        let timeline: Vec<Value> = [(11.0, true), (12.0, false), (17.0, false), (18.0, true)]
            .iter()
            .map(|&(t, r)| row(t, r))
            .chain([row(40.0, false), row(41.0, true)])
            .collect();
        assert_eq!(recovered_at(&timeline, 10.0, 10.2, 30.0), Some(18.0));
        // Never unready: back at the first ready sample after the fault's end.
        let calm = vec![row(11.0, true), row(12.0, true)];
        assert_eq!(recovered_at(&calm, 10.0, 11.5, 30.0), Some(12.0));
    }

    #[test]
    fn configmap_data_is_read_as_environment() {
        let d = configmap_data(
            "metadata:\n  name: x\ndata:\n  # c\n  A_B: \"50\"\n  LOG: json\nother:\n  C: 1\n",
        )
        .unwrap();
        assert_eq!(
            d,
            vec![("A_B".into(), "50".into()), ("LOG".into(), "json".into())]
        );
    }

    #[test]
    fn db_name_from_uri() {
        assert_eq!(
            db_name("mongodb://127.0.0.1:1/assessmentdb"),
            "assessmentdb"
        );
        assert_eq!(db_name("mongodb://h:1/x?directConnection=true"), "x");
        assert_eq!(db_name("mongodb://h:1"), "assessmentdb");
    }
}
