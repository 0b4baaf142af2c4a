//! What sluice itself costs, read from its own process: CPU per request and memory per
//! idle connection. The two rows of the performance table no other command measured.
//!
//! ```text
//! cargo run --release -p sluice-lab -- sluice-cost --url http://127.0.0.1:8000 --pid PID \
//!     --clients 1000 --seconds 20 --idle 5000 --out cost.json
//! ```
//!
//! 1. **CPU per request.** `--clients` keep-alive connections in a closed loop, first on
//!    `/healthz` (the same server's floor), then on `/api/data`, each for `--seconds`.
//!    CPU is sluice's own user + system time from `/proc/PID/stat` over the window,
//!    divided by the requests answered in it; the ratio of the two is what the table
//!    asks for. Only 2xx answers count as requests (a shed 503 costs less). Then
//!    `/healthz` once more, its clients held to the rate `/api/data` reached: the
//!    database sets that rate, far below what `/healthz` alone reaches, and a request
//!    costs more CPU when fewer share each wake-up and system call, so this second ratio
//!    compares the two paths at the same request rate (their arrivals still differ:
//!    paced ones come one at a time, `/api/data`'s in bursts as batches are answered).
//! 2. **Memory per idle connection.** `--idle` connections each send one `/healthz` and
//!    then stay open and idle; the growth of sluice's RSS (`VmRSS`) divided by their
//!    number is the cost of one. Then they close, and the RSS 12 seconds later says
//!    whether that memory went back.
//!
//! The client is a minimal HTTP/1.1 loop over raw sockets, so the load generator takes as
//! little of the machine's CPU as it can; run sluice pinned elsewhere if the machine has
//! the cores. Needs the open-files limit raised for `--idle` (`ulimit -n 65536`).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::util::{Error, MAX_FAILED_SHARE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of the running sluice (plain http, an IP address).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// The sluice process to read `/proc` of.
    #[arg(long, required_unless_present = "top")]
    pid: Option<u32>,
    /// Concurrent keep-alive clients for the CPU measure.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Seconds of load per path.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Idle connections for the memory measure (0 skips it).
    #[arg(long, default_value_t = 5000)]
    idle: usize,
    /// Where to write the JSON result (it is printed either way).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Only this path's CPU run (bench-report/cost.sh profiles one path at a time).
    #[arg(long)]
    only: Option<String>,
    /// Instead of measuring: the functions that take the most samples in a folded perf
    /// profile (inferno-collapse-perf's output), by self and by inclusive share.
    #[arg(long, value_name = "FOLDED")]
    top: Option<std::path::PathBuf>,
}

impl Args {
    fn pid(&self) -> u32 {
        self.pid.expect("clap requires --pid unless --top")
    }
}

#[derive(Debug, Serialize)]
struct CpuRun {
    path: String,
    /// The rate the clients were held to, if any.
    paced_to_per_second: Option<f64>,
    requests: u64,
    non_2xx: u64,
    cpu_seconds: f64,
    cpu_us_per_request: f64,
    requests_per_second: f64,
}

#[derive(Debug, Serialize)]
struct MemoryRun {
    connections: usize,
    rss_before_kib: u64,
    rss_open_kib: u64,
    rss_closed_kib: u64,
    kib_per_connection: f64,
    /// Of the memory the open connections took, how much was back `AFTER_CLOSE` after
    /// they closed; none when they took none.
    returned_share: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: Vec<CpuRun>,
    /// /api/data against /healthz each as fast as it goes (the issue's table).
    data_over_healthz_cpu: Option<f64>,
    /// /api/data against /healthz held to /api/data's rate.
    data_over_healthz_cpu_same_rate: Option<f64>,
    memory: Option<MemoryRun>,
}

/// How long after the idle connections close their memory is looked for: longer than
/// sluice's check for closed connections (every 10 s), so a trim has had its chance.
const AFTER_CLOSE: Duration = Duration::from_secs(12);

fn cpu_seconds(pid: u32) -> f64 {
    crate::procfs::cpu_seconds(pid).expect("sluice's /proc/PID/stat")
}

fn rss_kib(pid: u32) -> u64 {
    crate::procfs::status_kib(pid, "VmRSS:").expect("sluice's VmRSS")
}

/// Sends one GET and reads its whole answer; returns the status code.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end]).unwrap_or_default();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if buf.len() >= head_end + 4 + length {
            let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            return Ok(status);
        }
    }
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// `clients` keep-alive connections asking for `path` until `window` is over; with a
/// `rate`, spread evenly over them, each waits for its turn before asking again (unless
/// the answer came too late for it), so together they ask at most `rate` a second.
async fn closed_loop(
    addr: &str,
    path: &str,
    clients: usize,
    window: Duration,
    rate: Option<f64>,
) -> (u64, u64) {
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: application/json\r\n\r\n");
    let start = Instant::now();
    let until = start + window;
    let period = rate.map(|r| Duration::from_secs_f64(clients as f64 / r));
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (addr, request) = (addr.to_string(), request.clone());
            // Staggered, so the clients' turns do not all fall on the same instant.
            let mut turns = period.map(|p| {
                let first = start + p.mul_f64(i as f64 / clients as f64);
                let mut t = tokio::time::interval_at(first.into(), p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            tokio::spawn(async move {
                let (mut ok, mut other) = (0u64, 0u64);
                let mut buf = Vec::with_capacity(4096);
                'connect: while Instant::now() < until {
                    let Ok(mut stream) = TcpStream::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    while Instant::now() < until {
                        if let Some(turns) = &mut turns {
                            turns.tick().await;
                            if Instant::now() >= until {
                                break 'connect;
                            }
                        }
                        match exchange(&mut stream, request.as_bytes(), &mut buf).await {
                            Ok(s) if (200..300).contains(&s) => ok += 1,
                            Ok(_) => other += 1,
                            Err(_) => continue 'connect,
                        }
                    }
                }
                (ok, other)
            })
        })
        .collect();
    let mut total = (0, 0);
    for t in tasks {
        let (ok, other) = t.await.unwrap();
        total.0 += ok;
        total.1 += other;
    }
    total
}

async fn cpu_run(args: &Args, path: &str, rate: Option<f64>) -> CpuRun {
    let addr = host_port(&args.url);
    // A short warm-up, so connection set-up is not in the window.
    closed_loop(&addr, path, args.clients, Duration::from_secs(2), rate).await;
    let cpu0 = cpu_seconds(args.pid());
    let t0 = Instant::now();
    let (requests, non_2xx) = closed_loop(
        &addr,
        path,
        args.clients,
        Duration::from_secs(args.seconds),
        rate,
    )
    .await;
    let cpu = cpu_seconds(args.pid()) - cpu0;
    let elapsed = t0.elapsed().as_secs_f64();
    CpuRun {
        path: path.into(),
        paced_to_per_second: rate,
        requests,
        non_2xx,
        cpu_seconds: cpu,
        cpu_us_per_request: 1e6 * cpu / requests.max(1) as f64,
        requests_per_second: requests as f64 / elapsed,
    }
}

async fn memory_run(args: &Args) -> MemoryRun {
    let addr = host_port(&args.url);
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    let rss_before = rss_kib(args.pid());
    let mut open = Vec::with_capacity(args.idle);
    let mut buf = Vec::new();
    for _ in 0..args.idle {
        let mut stream = TcpStream::connect(&addr).await.expect("a connection");
        exchange(&mut stream, request.as_bytes(), &mut buf)
            .await
            .expect("an answer");
        open.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = rss_kib(args.pid());
    drop(open);
    tokio::time::sleep(AFTER_CLOSE).await;
    let rss_closed = rss_kib(args.pid());
    let grew = rss_open.saturating_sub(rss_before);
    MemoryRun {
        connections: args.idle,
        rss_before_kib: rss_before,
        rss_open_kib: rss_open,
        rss_closed_kib: rss_closed,
        kib_per_connection: grew as f64 / args.idle.max(1) as f64,
        returned_share: (grew > 0)
            .then(|| rss_open.saturating_sub(rss_closed) as f64 / grew as f64),
    }
}

/// Prints the `n` frames with the most samples in a folded profile (`frame;frame;... count`
/// per line): by self (the leaf) and by inclusive share (anywhere on the stack, once per
/// stack), as percentages of all samples.
fn top(folded: &std::path::Path, n: usize) {
    use std::collections::{HashMap, HashSet};
    let text = std::fs::read_to_string(folded).expect("the folded profile");
    let (mut own, mut inclusive) = (HashMap::<&str, u64>::new(), HashMap::<&str, u64>::new());
    let mut total = 0u64;
    for line in text.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        total += count;
        let frames: Vec<&str> = stack.split(';').collect();
        *own.entry(frames.last().copied().unwrap_or("?"))
            .or_default() += count;
        for f in frames.iter().copied().collect::<HashSet<_>>() {
            *inclusive.entry(f).or_default() += count;
        }
    }
    for (title, table) in [("self", own), ("inclusive", inclusive)] {
        let mut rows: Vec<_> = table.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        println!("{title} (of {total} samples):");
        for (frame, count) in rows.into_iter().take(n) {
            let frame: String = frame.chars().take(110).collect();
            println!(
                "  {:5.1}%  {frame}",
                100.0 * count as f64 / total.max(1) as f64
            );
        }
    }
}

pub async fn run(args: Args) -> Result<(), Error> {
    if let Some(folded) = &args.top {
        top(folded, 25);
        return Ok(());
    }
    let mut cpu = vec![];
    for path in ["/healthz", "/api/data"] {
        if args.only.as_deref().is_none_or(|only| only == path) {
            cpu.push(cpu_run(&args, path, None).await);
        }
    }
    let ratio =
        |healthz: &CpuRun, data: &CpuRun| data.cpu_us_per_request / healthz.cpu_us_per_request;
    let (mut full_rate, mut same_rate) = (None, None);
    if let [healthz, data] = cpu.as_slice() {
        full_rate = Some(ratio(healthz, data));
        // The same work per request costs more CPU at a lower rate: fewer requests share
        // each wake-up and each system call. /api/data's rate is set by the database, so
        // /healthz held to that rate is the reference at the same request rate.
        if data.requests_per_second > 0.0 {
            let paced = cpu_run(&args, "/healthz", Some(data.requests_per_second)).await;
            same_rate = Some(ratio(&paced, data));
            cpu.push(paced);
        }
    }
    let memory = if args.idle > 0 {
        Some(memory_run(&args).await)
    } else {
        None
    };
    let report = Report {
        cpu,
        data_over_healthz_cpu: full_rate,
        data_over_healthz_cpu_same_rate: same_rate,
        memory,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, &json)?;
    }
    failed_runs(&report.cpu)
}

/// An error naming the runs whose answers were more than [`MAX_FAILED_SHARE`] failures:
/// such a run measured (and its flame graph shows) the error path, not the request, as
/// when the database went away during a long `--seconds` of `/api/data`.
fn failed_runs(runs: &[CpuRun]) -> Result<(), Error> {
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| r.non_2xx as f64 > MAX_FAILED_SHARE * (r.requests + r.non_2xx) as f64)
        .map(|r| {
            format!(
                "{} answered {} of {} with no 2xx",
                r.path,
                r.non_2xx,
                r.requests + r.non_2xx
            )
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: not a measure of the request (is the database still up?)",
            failed.join("; ")
        )
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(requests: u64, non_2xx: u64) -> CpuRun {
        CpuRun {
            path: "/api/data".into(),
            paced_to_per_second: None,
            requests,
            non_2xx,
            cpu_seconds: 1.0,
            cpu_us_per_request: 1.0,
            requests_per_second: 1.0,
        }
    }

    #[test]
    fn a_run_of_mostly_failures_is_refused() {
        assert!(failed_runs(&[run_of(110_954, 0), run_of(99, 1)]).is_ok());
        let e = failed_runs(&[run_of(110_954, 0), run_of(2_000, 561_613)]).unwrap_err();
        assert!(
            e.to_string()
                .contains("/api/data answered 561613 of 563613"),
            "{e}"
        );
    }
}
