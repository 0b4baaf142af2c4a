//! The faults `--chaos` injects, one at a time, each only if it fits in the load.

use std::time::Duration;

use super::{event, event_update, start_replica, ConductorArgs, SharedState, SlotState};
use crate::k8s::sluice_config;
use crate::procs::ctl;
use crate::replica::Replica;
use crate::util::{env_file, now};

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
            let killed = Replica::new(&a.state, idx).kill().await;
            if let Err(e) = &killed {
                let error = e.to_string();
                event_update(&sh, i, |e| e.error = Some(error));
            }
            finish(&sh, i, killed.is_ok());
            sh.lock().unwrap().slots[idx].state = SlotState::Off;
            start_replica(&a, &sh, idx, "replacing the killed replica");
        } else {
            let i = event(&sh, "chaos-kill-replica", "no ready replica to kill".into());
            event_update(&sh, i, |e| e.ok = Some(false));
        }
        settle(sh.clone()).await;
    }

    // One ctl.sh command as a fault: its event, the command, its end, then the settle.
    let one_command = |kind: &'static str, detail: &'static str, args: &'static [&'static str]| {
        let (sh, run, settle) = (sh.clone(), &run, &settle);
        async move {
            let i = event(&sh, kind, detail.into());
            let (ok, _) = run(args).await;
            finish(&sh, i, ok);
            settle(sh.clone()).await;
        }
    };

    // 2. Redis restarted empty.
    if fits(&sh, "chaos-redis-restart", 2.0) {
        one_command(
            "chaos-redis-restart",
            "Redis killed and started again, empty, on the same port",
            &["redis-restart"],
        )
        .await;
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
        event_update(&sh, i, |e| e.stall_end = Some(now()));
        finish(&sh, i, ok1 && ok2);
        settle(sh.clone()).await;
    }

    // 4. The database killed; its supervisor starts it again on the same files.
    if fits(&sh, "chaos-db-kill", 3.0) {
        one_command(
            "chaos-db-kill",
            "kill -9 the database; the supervisor restarts it on the same files",
            &["db-kill"],
        )
        .await;
    }

    // 5. The database's disk filled until it refuses writes, then freed (filling takes a
    // few seconds).
    if fits(&sh, "chaos-disk-full", 5.0 + hold) {
        disk_full(&sh, &run, hold).await;
    }
    event(&sh, "chaos-done", "every fault injected or skipped".into());
    sh.lock().unwrap().faulting = false;
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
