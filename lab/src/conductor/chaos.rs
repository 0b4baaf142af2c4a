//! The faults `--chaos` injects, one at a time, each only if it fits in the load.

use std::time::Duration;

use super::{event, event_update, start_replica, ConductorArgs, SharedState, SlotState};
use crate::k8s::sluice_config;
use nix::sys::signal::Signal;

use crate::procs::{ctl, kill_and_wait, running_database, signal};
use crate::replica::Replica;
use crate::util::{env_file, now, Error};

/// Seconds after an event whose failed requests belong to it.
pub const EVENT_WINDOW_S: f64 = 10.0;

/// When the faults come in a run of `load_s` seconds: a long run leaves the ramp-up alone
/// and spaces them 20 s apart; a short one starts at once and spreads them over the run.
/// Each fault still starts only if it and the report's window after it fit before the
/// run ends (`chaos`).
pub fn chaos_schedule(load_s: f64, start: Option<f64>, gap: Option<f64>) -> (f64, f64) {
    let (start0, gap0) = if load_s >= 120.0 {
        (20.0, 20.0)
    } else {
        (3.0, ((load_s - 6.0) / 6.0).floor().max(3.0))
    };
    (start.unwrap_or(start0), gap.unwrap_or(gap0))
}

/// The faults, each once the last one is over; each event's `end` is when the lab stopped
/// injecting it (the report measures recovery from its start). A fault that would not be
/// over, with the report's window after it, before the load ends is skipped and says so:
/// a fault during the /healthz phase would fail the wrong run.
pub async fn run(a: ConductorArgs, sh: SharedState) {
    let load_s = a.load_seconds.unwrap_or(0.0);
    let end = now() + load_s;
    let (start, gap) = chaos_schedule(load_s, a.chaos_start, a.chaos_gap);
    let hold = (gap / 2.0).clamp(2.0, 10.0);
    // The replicas' own DB_TIMEOUT_MS (their settings file; sluice's default if unreadable).
    let db_timeout = sluice_config(&env_file(&a.state.join("sluice.env")))
        .or_else(|_| sluice_config(&Default::default()))
        .map_or(Duration::ZERO, |c| c.store.db_timeout);
    let stall = db_timeout + Duration::from_secs(2);
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
        event_update(sh, i, |e| {
            e.skipped = true;
            e.not_enough_time = true;
        });
        finish(sh, i, true);
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
            let ok = fault_ok(&sh, i, Replica::new(&a.state, idx).kill().await);
            finish(&sh, i, ok);
            sh.lock().unwrap().slots[idx].state = SlotState::Off;
            start_replica(&a, &sh, idx, "replacing the killed replica");
        } else {
            let i = event(&sh, "chaos-kill-replica", "no ready replica to kill".into());
            event_update(&sh, i, |e| e.ok = Some(false));
        }
        settle(sh.clone()).await;
    }

    // 2. Redis restarted empty (ctl.sh starts it as setup did).
    if fits(&sh, "chaos-redis-restart", 2.0) {
        let i = event(
            &sh,
            "chaos-redis-restart",
            "Redis killed and started again, empty, on the same port".into(),
        );
        let (ok, _) = run(&["redis-restart"]).await;
        finish(&sh, i, ok);
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
        let stalled = stall_database(&a.state, stall).await;
        event_update(&sh, i, |e| e.stall_end = Some(now()));
        let ok = fault_ok(&sh, i, stalled);
        finish(&sh, i, ok);
        settle(sh.clone()).await;
    }

    // 4. The database killed; its supervisor starts it again on the same files.
    if fits(&sh, "chaos-db-kill", 3.0) {
        let i = event(
            &sh,
            "chaos-db-kill",
            "kill -9 the database; the supervisor restarts it on the same files".into(),
        );
        let killed = kill_database(&a.state).await;
        let ok = fault_ok(&sh, i, killed);
        finish(&sh, i, ok);
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

/// SIGSTOP the running database, and SIGCONT the same process `stall` later. A stop that
/// finds no database is an error, and then nothing waits.
async fn stall_database(state: &std::path::Path, stall: Duration) -> Result<(), Error> {
    let pid = running_database(state)?;
    if !signal(pid, Signal::SIGSTOP)? {
        return Err(format!("the database (pid {pid}) exited before its SIGSTOP").into());
    }
    tokio::time::sleep(stall).await;
    signal(pid, Signal::SIGCONT)?;
    Ok(())
}

/// kill -9 the database, as the node's OOM killer or a crash would, and wait up to 5 s for
/// it to be gone (the supervisor in setup-local.sh starts it again). A database already
/// gone is an error: the fault did not happen.
async fn kill_database(state: &std::path::Path) -> Result<(), Error> {
    kill_and_wait(running_database(state)?, "the database").await
}

/// Whether a fault happened; its error, if any, goes on its event.
fn fault_ok(sh: &SharedState, i: usize, result: Result<(), Error>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            let error = e.to_string();
            event_update(sh, i, |e| e.error = Some(error));
            false
        }
    }
}

/// The fault's event is over: when, and whether the lab could inject it.
fn finish(sh: &SharedState, i: usize, ok: bool) {
    event_update(sh, i, |e| {
        e.end = Some(now());
        e.ok = Some(ok);
    });
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
        event_update(sh, i, |e| {
            e.detail = format!("filled the database's disk ({out}), held it full, freed it")
        });
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
        let (ok2, out2) = run(&["disk-free"]).await;
        event_update(sh, i, |e| {
            e.ok = Some(ok2);
            if !out2.is_empty() {
                e.detail =
                    format!("filled the database's disk ({out}), held it full, freed it; {out2}");
            }
        });
    } else {
        event_update(sh, i, |e| {
            e.detail = format!("skipped: {out}");
            e.skipped = true;
            e.ok = Some(true);
        });
    }
    event_update(sh, i, |e| e.end = Some(now()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::start_ticks;
    use crate::procs::alive;

    /// A process in the database's place, recorded as setup's supervisor records it
    /// (STATE/pids and STATE/mongo.pid); killed when the test ends, however it ends, so
    /// a failed assertion never leaves it stopped.
    struct StandIn(std::process::Child);

    impl StandIn {
        fn start(state: &std::path::Path) -> StandIn {
            let child = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap();
            let pid = child.id();
            let start = start_ticks(pid).unwrap();
            std::fs::write(state.join("pids"), format!("mongo {pid} {start}\n")).unwrap();
            std::fs::write(state.join("mongo.pid"), format!("{pid}\n")).unwrap();
            StandIn(child)
        }
    }

    impl Drop for StandIn {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Whether the process is stopped (state T in /proc/PID/stat), once a signal sent to
    /// it has been delivered: delivery is asynchronous, so this waits up to 5 s for
    /// `stopped`, and says what it saw last.
    fn is_stopped_within(pid: u32, stopped: bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let now = stat.rsplit_once(") ").unwrap().1.starts_with('T');
            if now == stopped || std::time::Instant::now() >= deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // Multi-threaded: the stall runs on a worker while this thread watches the process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stall_stops_the_database_and_resumes_the_same_process() {
        let dir = tempfile::tempdir().unwrap();
        let db = StandIn::start(dir.path());
        let pid = db.0.id();
        let stall = tokio::spawn({
            let state = dir.path().to_path_buf();
            async move { stall_database(&state, Duration::from_secs(1)).await }
        });
        assert!(is_stopped_within(pid, true), "SIGSTOP did not stop it");
        stall.await.unwrap().unwrap();
        assert!(!is_stopped_within(pid, false), "SIGCONT did not resume it");
    }

    #[tokio::test]
    async fn the_kill_ends_the_database_and_a_second_kill_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StandIn::start(dir.path());
        let pid = db.0.id();
        // The child is ours: reap it as it dies, so it is gone and not a zombie.
        let reaper = std::thread::spawn(move || {
            let status = db.0.wait();
            (db, status)
        });
        kill_database(dir.path()).await.unwrap();
        assert!(!alive(pid));
        reaper.join().unwrap().1.unwrap();
        let again = kill_database(dir.path()).await.unwrap_err().to_string();
        assert!(again.contains("not running"), "{again}");
    }

    /// Between the database's exit and its restart, mongo.pid names a pid that another
    /// process may hold: no fault may signal it.
    #[tokio::test]
    async fn a_pid_file_naming_another_process_is_not_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = StandIn::start(dir.path());
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(dir.path().join("mongo.pid"), format!("{}\n", other.id())).unwrap();
        let e = stall_database(dir.path(), Duration::ZERO)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not running"), "{e}");
        assert!(kill_database(dir.path()).await.is_err());
        assert!(alive(other.id()) && !is_stopped_within(other.id(), false));
        let _ = other.kill();
        let _ = other.wait();
        drop(db);
        std::fs::write(dir.path().join("mongo.pid"), "starting\n").unwrap();
        let e = running_database(dir.path()).unwrap_err().to_string();
        assert!(e.contains("mongo.pid") && e.contains("starting"), "{e}");
    }
}
