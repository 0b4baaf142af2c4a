//! A replica's lifecycle, as the kubelet runs a pod: started with the cluster's settings
//! on an address of its own and waited for until `/readyz` answers, stopped with SIGTERM
//! (sluice drains and flushes) and waited for, or killed. setup-local.sh starts the first
//! replicas through `lab replica-start`; the conductor starts, stops and kills the rest
//! through these functions. Which replica and when is the conductor's to decide.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::procfs::start_ticks;
use crate::procs::{alive, gone, http_get, kill_and_wait, signal};
use crate::util::{env_file, read_to_string, Error};

/// Slot `idx`'s replica in `state`: its pid file, log and name.
pub struct Replica<'a> {
    state: &'a Path,
    idx: usize,
}

impl<'a> Replica<'a> {
    pub fn new(state: &'a Path, idx: usize) -> Replica<'a> {
        Replica { state, idx }
    }

    pub fn name(&self) -> String {
        format!("sluice-local-{}", self.idx)
    }

    fn file(&self, suffix: &str) -> std::path::PathBuf {
        self.state.join(format!("slot-{}.{suffix}", self.idx))
    }

    /// The pid setup or the conductor last started in this slot, while that process (and
    /// not a later one that got its pid) runs: its start time must be the one recorded.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = read_to_string(self.file("pid"))?.trim().parse().ok()?;
        let recorded = read_to_string(self.file("start"))?;
        (pid > 1 && start_ticks(pid).as_deref() == Some(recorded.trim())).then_some(pid)
    }

    /// Starts sluice on `port` with STATE/sluice.env's settings and lab.env's URIs, its
    /// output appended to STATE/sluice-IDX.log, and waits up to 30 s for `/readyz` 200.
    /// The replica gets a process group of its own: a Ctrl-C in setup's terminal is for
    /// setup's trap, which stops the replicas in order, not for every replica at once.
    pub async fn start(&self, port: u16) -> Result<u32, Error> {
        let bin = read_to_string(self.state.join("sluice.bin")).ok_or("no STATE/sluice.bin")?;
        let uris = env_file(&self.state.join("lab.env"));
        let settings = env_file(&self.state.join("sluice.env"));
        let log_path = self.state.join(format!("sluice-{}.log", self.idx));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(bin.trim());
        cmd.envs(&settings);
        for key in ["MONGO_URI", "REDIS_URL"] {
            cmd.env(
                key,
                uris.get(key).ok_or(format!("no {key} in STATE/lab.env"))?,
            );
        }
        let mut child = cmd
            .env("APP_PORT", port.to_string())
            .env("POD_NAME", self.name())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let pid = child.id();
        // Read while the process cannot be gone: a child not yet reaped keeps its /proc
        // entry, even as a zombie.
        let start = start_ticks(pid).unwrap_or_default();
        // Reaped when it exits, so that a stopped replica is not left a zombie of the
        // conductor's; `alive` already counts a zombie as gone.
        std::thread::spawn(move || child.wait());
        let ready = self.record_and_wait(pid, &start, port, &log_path).await;
        if ready.is_err() {
            // Not ready is not started: nothing may be left running in the slot.
            let _ = signal(pid, Signal::SIGKILL);
        }
        ready.map(|()| pid)
    }

    /// Records the new process (cleanup's list, the slot's files), then waits up to 30 s
    /// for its `/readyz` 200; fails with the end of its log.
    async fn record_and_wait(
        &self,
        pid: u32,
        start: &str,
        port: u16,
        log_path: &Path,
    ) -> Result<(), Error> {
        record_pid(self.state, &self.name(), pid, start)?;
        std::fs::write(self.file("pid"), format!("{pid}\n"))?;
        std::fs::write(self.file("start"), format!("{start}\n"))?;
        std::fs::write(self.file("port"), format!("{port}\n"))?;
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && alive(pid) {
            if matches!(http_get(&http, &url, 2000).await, Some((200, _))) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let log = read_to_string(log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "{} (pid {pid}) {} within 30 s; the end of its log:\n{}",
            self.name(),
            if alive(pid) {
                "was not ready"
            } else {
                "exited"
            },
            tail.join("\n")
        )
        .into())
    }

    /// SIGTERM, then waits up to 60 s for the exit; kills it after that. Says how long
    /// the drain took, or fails saying it had to be killed.
    pub async fn stop(&self) -> Result<String, Error> {
        let Some(pid) = self.pid().filter(|p| alive(*p)) else {
            return Ok("not running".into());
        };
        let t0 = Instant::now();
        signal(pid, Signal::SIGTERM)?;
        if gone(pid, Duration::from_secs(60)).await {
            return Ok(format!("exited after {} s", t0.elapsed().as_secs()));
        }
        signal(pid, Signal::SIGKILL)?;
        Err(format!(
            "{} did not exit within 60 s of SIGTERM: killed",
            self.name()
        )
        .into())
    }

    /// kill -9, as a node losing the pod would; waits up to 5 s for it to be gone. A
    /// replica already gone is an error: the fault did not happen.
    pub async fn kill(&self) -> Result<(), Error> {
        let pid = self
            .pid()
            .filter(|p| alive(*p))
            .ok_or(format!("{} is not running", self.name()))?;
        kill_and_wait(pid, &self.name()).await
    }
}

/// Appends "NAME PID START" to STATE/pids, as lab/lib.sh's `lab_record_pid` does for the
/// processes setup starts: cleanup signals a pid only while its start time still
/// matches, never a later process that got the same pid.
fn record_pid(state: &Path, name: &str, pid: u32, start: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("pids"))?;
    writeln!(
        f,
        "{name} {pid} {}",
        if start.is_empty() { "0" } else { start }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state folder whose "sluice" is `bin`.
    fn state_with(bin: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sluice.bin"), bin).unwrap();
        std::fs::write(
            dir.path().join("lab.env"),
            "MONGO_URI=mongodb://127.0.0.1:1\nREDIS_URL=redis://127.0.0.1:1\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("sluice.env"), "LOG_LEVEL=info\n").unwrap();
        dir
    }

    #[tokio::test]
    async fn a_replica_that_exits_fails_its_start_with_its_log_and_is_recorded() {
        let dir = state_with("/bin/false");
        let r = Replica::new(dir.path(), 3);
        let err = r.start(1).await.unwrap_err().to_string();
        assert!(
            err.contains("sluice-local-3") && err.contains("exited"),
            "{err}"
        );
        let pid = std::fs::read_to_string(r.file("pid")).unwrap();
        let pid = pid.trim();
        let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap();
        assert!(
            pids.starts_with(&format!("sluice-local-3 {pid} ")),
            "{pids}"
        );
        assert_eq!(r.stop().await.unwrap(), "not running");
    }

    #[tokio::test]
    async fn stop_and_kill_end_the_process_in_the_slot() {
        for how in ["stop", "kill"] {
            let dir = state_with("/bin/false");
            let r = Replica::new(dir.path(), 0);
            let mut child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
            std::fs::write(r.file("pid"), child.id().to_string()).unwrap();
            std::fs::write(r.file("start"), start_ticks(child.id()).unwrap()).unwrap();
            if how == "stop" {
                assert!(r.stop().await.unwrap().starts_with("exited after"));
            } else {
                r.kill().await.unwrap();
            }
            let status = child.wait().unwrap();
            assert!(!status.success(), "{how}: {status}");
            // Gone: a second kill is a fault that did not happen, and a stop has
            // nothing to do.
            assert!(r.kill().await.is_err());
            assert_eq!(r.stop().await.unwrap(), "not running");
        }
    }

    #[test]
    fn a_pid_counts_only_while_its_start_time_is_the_recorded_one() {
        let dir = state_with("/bin/false");
        let r = Replica::new(dir.path(), 1);
        let me = std::process::id();
        std::fs::write(r.file("pid"), me.to_string()).unwrap();
        std::fs::write(r.file("start"), start_ticks(me).unwrap()).unwrap();
        assert_eq!(r.pid(), Some(me));
        // Another process's start time: this pid is not the replica any more.
        std::fs::write(r.file("start"), "1").unwrap();
        assert_eq!(r.pid(), None);
        // Never pid 0 or 1, whatever the files say.
        std::fs::write(r.file("pid"), "0").unwrap();
        assert_eq!(r.pid(), None);
    }
}
