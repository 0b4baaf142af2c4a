//! `lab`: the subcommands `lab/setup-local.sh`, `bench-report/` and the CI smoke run
//! (`cargo run --release -p sluice-lab -- <subcommand>`); the lab itself is the library
//! beside it (lib.rs).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use sluice_lab::util::{load_json, Error};
use sluice_lab::{
    ceiling, conductor, cost, database, db_args, k6, k8s, load_report, manifests, procs, replica,
    report, sizing,
};

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
    /// Print a replica's settings as KEY=VALUE lines, a later line winning: the cluster's
    /// (k8s/app/configmap.yaml), then the lab's own (--lab), then every setting sluice
    /// reads (clap's names) that the caller exported.
    Settings {
        root: PathBuf,
        /// KEY=VALUE the lab sets over the cluster's (readable logs, the fallback split).
        #[arg(long)]
        lab: Vec<String>,
    },
    /// Check every memory request and limit against docs/deploy.md's formula and their
    /// sum against the k3d nodes (k8s/cluster.env); print the table; exit 1 on a problem.
    Sizing { root: PathBuf },
    /// Check k8s/app's manifests against each other, the settings sluice reads and the
    /// other components' manifests, and evaluate the NetworkPolicies for every connection
    /// the system makes and a few it must refuse; print the summary and that table; exit 1
    /// on a problem.
    Manifests { root: PathBuf },
    /// Print the seconds of load in PLAN, `k6 inspect`'s output: the longest scenario's
    /// start and stages (or duration), without the graceful stop.
    LoadSeconds { plan: PathBuf },
    /// Start replica slot IDX on PORT with the lab's settings (STATE/sluice.env, lab.env),
    /// wait for its /readyz, print its pid; fail with the end of its log.
    ReplicaStart {
        #[arg(long)]
        state: PathBuf,
        idx: usize,
        port: u16,
    },
    /// Sample, autoscale and inject faults until SIGTERM or STATE/conductor.stop.
    Conductor(conductor::ConductorArgs),
    /// Write the report JSON and SVG, print the verdict; exit 0 or 3.
    Report(report::ReportArgs),
    /// bench-report's tables and chart of one run folder (report.json, report.md, chart.svg).
    LoadReport { dir: PathBuf },
    /// One k6 --summary-export as bench-report's line: req/s, p95, failed, ok.
    K6Line { summary: PathBuf },
    /// bench-report/flame.sh's check of its k6 run: sluice's µs of CPU a request from
    /// the ticks it spent; exit 1 when more than 1% of the requests failed.
    FlameCheck {
        summary: PathBuf,
        ticks: u64,
        clk_tck: u64,
    },
    /// The CI smoke's checks of one report: "ok ..." / "fail ..." lines; exit 1 on a fail.
    CheckReport {
        report: PathBuf,
        /// The machine allows the database's constraints (root, loop devices, cgroups).
        #[arg(long)]
        constrained: bool,
    },
    /// The database's own ceiling for sluice's write pattern: raw `insert_many` of
    /// stored-shape documents, in documents per second (and the client's CPU a document).
    InsertCeiling(ceiling::Args),
    /// sluice's CPU per request and memory per idle connection, from its own process.
    SluiceCost(cost::Args),
}

fn main() {
    let cli = Cli::parse();
    let name = std::env::args().nth(1).unwrap_or_default();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let rc = rt.block_on(run(cli.cmd)).unwrap_or_else(|e| {
        eprintln!("{name}: {e}");
        1
    });
    std::process::exit(rc);
}

/// Prints what a command found, on stdout for the script that asked, and succeeds.
fn say(what: impl std::fmt::Display) -> i32 {
    println!("{what}");
    0
}

async fn run(cmd: Cmd) -> Result<i32, Error> {
    Ok(match cmd {
        // Quiet: setup polls it until the database answers.
        Cmd::Ping { uri } => i32::from(database::ping(&uri).await.is_err()),
        Cmd::Count { uri } => say(database::count(&uri).await?),
        Cmd::Snapshot { count, uri, out } => {
            database::snapshot(&uri, count, &out).await?;
            0
        }
        Cmd::Settle { uri } => say(database::settle(&uri).await?),
        Cmd::Hpa { root } => {
            let h = k8s::Hpa::load(&root)?;
            say(format!("{} {} {} {}", h.min, h.max, h.surge, h.target_pct))
        }
        Cmd::Probe { root } => say(k8s::readiness_probe(&root)?),
        Cmd::DbArgs {
            server,
            port,
            dbpath,
            state,
        } => {
            for arg in db_args::db_args(&server, port, &dbpath, &state)? {
                println!("{}", arg.to_string_lossy());
            }
            0
        }
        Cmd::FreePort { tag, used } => say(procs::free_port(tag, &used)?),
        Cmd::Settings { root, lab } => {
            for line in k8s::replica_settings(&root, &lab)? {
                println!("{line}");
            }
            0
        }
        Cmd::Sizing { root } => sizing::run(&root)?,
        Cmd::Manifests { root } => manifests::run(&root)?,
        Cmd::LoadSeconds { plan } => say(load_json(&plan)
            .and_then(|p| k6::load_seconds(&p))
            .ok_or_else(|| {
                format!(
                    "{} holds no scenario with stages or a duration",
                    plan.display()
                )
            })?),
        Cmd::ReplicaStart { state, idx, port } => {
            say(replica::Replica::new(&state, idx).start(port).await?)
        }
        Cmd::Conductor(a) => {
            conductor::run(a).await?;
            0
        }
        Cmd::Report(a) => report::run(a).await?,
        Cmd::LoadReport { dir } => {
            load_report::run(&dir)?;
            0
        }
        Cmd::K6Line { summary } => say(k6::Summary::read(&summary)
            .and_then(|s| s.line())
            .ok_or_else(|| format!("no req/s, p95 and failed rate in {}", summary.display()))?),
        Cmd::FlameCheck {
            summary,
            ticks,
            clk_tck,
        } => {
            let summary = k6::Summary::read(&summary)
                .ok_or_else(|| format!("no k6 summary in {}", summary.display()))?;
            say(summary.cpu_per_request(ticks, clk_tck)?)
        }
        Cmd::CheckReport {
            report,
            constrained,
        } => report::check::run(&report, constrained),
        Cmd::InsertCeiling(a) => {
            ceiling::run(a).await?;
            0
        }
        Cmd::SluiceCost(a) => {
            cost::run(a).await?;
            0
        }
    })
}
