//! The conductor: runs beside k6. Every wall-clock second it samples serverStatus,
//! HAProxy's counters and each replica (CPU, RSS, open connections, queue depth,
//! /readyz); it autoscales like the HPA (replicas join and leave HAProxy through its
//! runtime API, and Prometheus through a file_sd file) and, with `--chaos`, injects the
//! faults. It writes the timeline, the events and the autoscaling it played through
//! `state`.

mod chaos;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::autoscaler::Autoscaler;
use crate::database::{client, server_status, DbCounters, COUNTED_COMMANDS};
use crate::k8s::Hpa;
use crate::procs::{
    alive, connections_by_port, free_port, haproxy, haproxy_stat, http_get, metric_value,
};
use crate::replica::Replica;
use crate::state::{
    write_autoscaling, write_events, Autoscaling, Event, ReplicaSample, Row, TimelineWriter,
};
use crate::util::{now, read_to_string, Error};

pub use chaos::EVENT_WINDOW_S;

#[derive(clap::Args, Clone)]
pub struct ConductorArgs {
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

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SlotState {
    Off,
    Starting,
    Ready,
    Draining,
}

#[derive(Debug)]
pub struct Slot {
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
pub struct Shared {
    slots: Vec<Slot>,
    events: Vec<Event>,
    restarts: u64,
    /// Every ready replica answered /readyz 200 in the last tick.
    all_ready: bool,
    /// A fault is being injected or recovered from.
    faulting: bool,
}

pub type SharedState = Arc<Mutex<Shared>>;

pub fn event(sh: &SharedState, kind: &str, detail: String) -> usize {
    let t = now();
    eprintln!("    [lab] {kind}: {detail}");
    let mut s = sh.lock().unwrap();
    s.events.push(Event::new(t, kind, detail));
    s.events.len() - 1
}

/// Adds to event `i` what became known after it was recorded.
pub fn event_update(sh: &SharedState, i: usize, update: impl FnOnce(&mut Event)) {
    if let Some(e) = sh.lock().unwrap().events.get_mut(i) {
        update(e);
    }
}

pub fn write_targets(state: &Path, slots: &[Slot]) {
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

pub fn server_name(idx: usize) -> String {
    format!("replicas/sluice-local-{idx}")
}

/// Starts slot `idx` on a fresh port, as a new pod gets a new address, waits for its
/// /readyz, then lets HAProxy send it requests.
pub fn start_replica(a: &ConductorArgs, sh: &SharedState, idx: usize, why: &str) {
    {
        let mut s = sh.lock().unwrap();
        s.slots[idx].state = SlotState::Starting;
        s.slots[idx].expected_exit = false;
    }
    let (a, sh, why) = (a.clone(), sh.clone(), why.to_string());
    tokio::spawn(async move {
        let started = match free_port(a.port_tag, &a.state.join("ports")) {
            Ok(port) => Replica::new(&a.state, idx)
                .start(port)
                .await
                .map(|pid| (pid, port)),
            Err(e) => Err(e),
        };
        // HAProxy's runtime API and the shared state block: off the async workers, so
        // the second-by-second sampling never waits behind them.
        tokio::task::block_in_place(|| {
            let mut s = sh.lock().unwrap();
            match started {
                Ok((pid, port)) => {
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
                }
                Err(e) => {
                    s.slots[idx].state = SlotState::Off;
                    drop(s);
                    event(
                        &sh,
                        "replica-failed",
                        format!("sluice-local-{idx} did not become ready ({why}): {e}"),
                    );
                }
            }
        });
    });
}

/// As Kubernetes removes a pod: out of the endpoints (HAProxy drain, Prometheus), then
/// SIGTERM, which sluice answers by draining and flushing, and the wait for its exit.
pub fn stop_replica(a: &ConductorArgs, sh: &SharedState, idx: usize, why: &str) {
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
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopped = Replica::new(&a.state, idx).stop().await;
        tokio::task::block_in_place(|| {
            haproxy(
                &a.state,
                &format!("set server {} state maint", server_name(idx)),
            )
        });
        let mut s = sh.lock().unwrap();
        s.slots[idx].state = SlotState::Off;
        s.slots[idx].pid = None;
        drop(s);
        let how = stopped.unwrap_or_else(|e| e.to_string());
        event(
            &sh,
            "replica-stopped",
            format!("sluice-local-{idx} ({why}; SIGTERM, {how})"),
        );
    });
}

pub async fn run(a: ConductorArgs) -> Result<(), Error> {
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
            let pid = Replica::new(&a.state, idx).pid().filter(|p| alive(*p));
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
    write_autoscaling(
        &a.state,
        &Autoscaling {
            mode,
            time_scale: scale,
            fixed_replicas: a.replicas,
            min: hpa.min,
            max: hpa.max,
            surge: hpa.surge,
            target_pct: hpa.target_pct,
            memory_request_mib: hpa.memory_request_mib,
            scale_up_window_s: hpa.up.window_s,
            scale_down_window_s: hpa.down.window_s,
            held_at_minimum_pct: None,
        },
    )?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let db = client(&a.mongo_uri).await?;
    let mut timeline = TimelineWriter::open(&a.state)?;
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
        let mut row = Row {
            t,
            second: t.floor() as i64,
            phase: phase.clone(),
            ..Row::default()
        };
        if let Some(cur) = db_now {
            if let Some((pt, prev)) = &prev_db {
                // Counters restart from 0 when the database restarts.
                let d = |a: u64, b: u64| if b >= a { b - a } else { b };
                row.db_commands = Some(d(prev.counted(), cur.counted()));
                row.db_other = Some(d(
                    prev.total() - prev.counted(),
                    cur.total() - cur.counted(),
                ));
                row.documents = Some(d(prev.inserted, cur.inserted));
                row.span_s = Some(((t - pt).round()).max(1.0));
                // The counters were read somewhere between each request and its answer:
                // the longest stretch of time this difference can cover.
                row.window_s = Some(t_answer - pt);
                let mut by = BTreeMap::new();
                for c in COUNTED_COMMANDS {
                    let v = d(
                        prev.commands.get(c).copied().unwrap_or(0),
                        cur.commands.get(c).copied().unwrap_or(0),
                    );
                    if v > 0 {
                        by.insert(c.to_string(), v);
                    }
                }
                row.db_by_name = Some(by);
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
            row.replicas_checked_down =
                Some(checked_down.into_iter().map(str::to_string).collect());
            let cur = (g("req_tot"), g("hrsp_5xx"), replicas_5xx);
            if let Some(p) = prev_fe {
                row.requests = Some(cur.0.saturating_sub(p.0));
                row.failed = Some(cur.1.saturating_sub(p.1));
                // HAProxy's own answers: no replica to send the request to.
                row.haproxy_own_5xx = Some(
                    cur.1
                        .saturating_sub(p.1)
                        .saturating_sub(cur.2.saturating_sub(p.2)),
                );
            }
            prev_fe = Some(cur);
        }

        // The replicas.
        let conns = connections_by_port();
        let snapshot: Vec<(usize, u16, Option<u32>, SlotState)> = {
            let s = sh.lock().unwrap();
            s.slots
                .iter()
                .map(|x| (x.idx, x.port, x.pid, x.state))
                .collect()
        };
        let mut all_ready = true;
        let mut queue = 0.0;
        let mut utils = vec![];
        let (mut n_ready, mut n_live) = (0, 0);
        for (idx, port, pid, st) in snapshot {
            let Some(pid) = pid else { continue };
            if !alive(pid) {
                // Judged on the slot as it is now, not as the snapshot had it: the
                // replicas before this one took their HTTP time, and meanwhile the chaos
                // may have killed this one on purpose (and marked it so).
                let unexpected = {
                    let mut s = sh.lock().unwrap();
                    let slot = &s.slots[idx];
                    let died = slot.state == SlotState::Ready
                        && !slot.expected_exit
                        && slot.pid == Some(pid);
                    if died {
                        s.restarts += 1;
                    }
                    died
                };
                if unexpected {
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
            let cpu_s = crate::procfs::cpu_seconds(pid);
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
                // The resident set: what metrics-server's working set of a pod that
                // writes no files mostly is (the cgroup also charges the kernel's socket
                // buffers to it, which this leaves out).
                if let Some(kib) = crate::procfs::status_kib(pid, "VmRSS:") {
                    utils.push(100.0 * kib as f64 / 1024.0 / hpa.memory_request_mib);
                }
            }
            row.replica.push(ReplicaSample {
                slot: idx,
                pid,
                port,
                state: format!("{st:?}"),
                ready,
                cpu_cores: cpu,
                rss_kib: crate::procfs::status_kib(pid, "VmRSS:"),
                hwm_kib: crate::procfs::status_kib(pid, "VmHWM:"),
                connections: conns.get(&port).copied().unwrap_or(0),
                queue_depth: depth,
            });
        }
        row.replicas = n_ready;
        row.live_pods = n_live;
        row.all_ready = all_ready && n_ready > 0;
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
        row.queue_depth = queue;

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
            row.memory_util_pct = Some(util);
            if !busy {
                let want = scaler.decide(&hpa, scale, t, current, util);
                if want != current {
                    let i = event(
                        &sh,
                        if want > current { "scale-up" } else { "scale-down" },
                        format!("{current} -> {want} replicas (average memory {util:.0}% of the request, target {}%)", hpa.target_pct),
                    );
                    event_update(&sh, i, |e| e.replicas = Some(want));
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
            tokio::spawn(chaos::run(a.clone(), sh.clone()));
        }

        timeline.append(&row)?;
        let s = sh.lock().unwrap();
        write_events(&a.state, &s.events)?;
        std::fs::write(a.state.join("replica-restarts"), s.restarts.to_string())?;
    }
    let s = sh.lock().unwrap();
    write_events(&a.state, &s.events)?;
    Ok(())
}
