//! Processes and what they serve: liveness, signals, the database's pid, open
//! connections, free ports, HAProxy's runtime API, `lab/ctl.sh` (the faults on Redis and
//! the database's disk), and a replica's HTTP endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{read_to_string, Error};

pub fn alive(pid: u32) -> bool {
    read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false)
}

/// Sends `sig` to `pid`: true when it was delivered, false when the process was gone
/// already (what a SIGTERM or SIGKILL was for; a SIGSTOP that found nobody is the
/// caller's error).
pub fn signal(pid: u32, sig: Signal) -> Result<bool, Error> {
    let pid = i32::try_from(pid)?;
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(format!("{sig} to pid {pid}: {e}").into()),
    }
}

/// True once `pid` has exited, polling every 100 ms for at most `within`.
pub async fn gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// kill -9 `pid` and wait up to 5 s for it to be gone, as a fault that ends a process
/// does; `what` names the process in the error.
pub async fn kill_and_wait(pid: u32, what: &str) -> Result<(), Error> {
    signal(pid, Signal::SIGKILL)?;
    if gone(pid, Duration::from_secs(5)).await {
        Ok(())
    } else {
        Err(format!("{what} (pid {pid}) outlived SIGKILL by 5 s").into())
    }
}

/// The running database's pid. setup's supervisor writes STATE/mongo.pid each time it
/// starts the database, and records "mongo PID START" in STATE/pids; between an exit and
/// the next start the file names a dead pid, which another process may have taken. So the
/// pid counts only while it runs with the start time recorded for it.
pub fn running_database(state: &Path) -> Result<u32, Error> {
    let path = state.join("mongo.pid");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|e| format!("mongo.pid holds {:?}: {e}", text.trim()))?;
    let recorded = read_to_string(state.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["mongo", p, start] if p == pid.to_string() => Some(start.to_string()),
            _ => None,
        })
        .next_back();
    match (recorded, crate::procfs::start_ticks(pid)) {
        (Some(want), Some(have)) if want == have && alive(pid) => Ok(pid),
        _ => Err(format!(
            "the database is not running (pid {pid} in mongo.pid is gone or another process's)"
        )
        .into()),
    }
}

/// Established TCP connections per local port, from /proc/net/tcp{,6}.
pub fn connections_by_port() -> BTreeMap<u16, u64> {
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
/// `tag`, unique to the state folder, so that two labs look in different places. The
/// file is locked from reading to appending: the conductor starts replicas on several
/// threads at once (a scale-up by two, a killed replica's replacement), and two that
/// read it together once chose the same port, so that one replica could not listen.
pub fn free_port(tag: u64, used: &Path) -> Result<u16, Error> {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    let span = u64::from(HIGH - LOW);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(used)?;
    file.lock()?;
    let mut listed = String::new();
    file.read_to_string(&mut listed)?;
    let taken: BTreeSet<u16> = listed
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let port = (0..span)
        .map(|i| LOW + ((tag % span + i) % span) as u16)
        .filter(|p| !taken.contains(p))
        .find(|p| bindable(*p))
        .ok_or("no free port")?;
    writeln!(file, "{port}")?;
    Ok(port)
}

/// Whether 127.0.0.1:`port` can be bound without SO_REUSEADDR (which std's listener
/// would set): then a port anything still holds, a connection in TIME_WAIT included,
/// counts as taken.
pub fn bindable(port: u16) -> bool {
    tokio::net::TcpSocket::new_v4()
        .and_then(|s| s.bind(([127, 0, 0, 1], port).into()))
        .is_ok()
}

pub fn ctl(root: &Path, args: &[&str]) -> (bool, String) {
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
pub fn haproxy_sockets(state: &Path) -> Vec<PathBuf> {
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
pub fn haproxy(state: &Path, cmd: &str) -> Vec<String> {
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
pub fn haproxy_stat(state: &Path) -> Vec<BTreeMap<String, String>> {
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

pub async fn http_get(c: &reqwest::Client, url: &str, ms: u64) -> Option<(u16, String)> {
    let r = c
        .get(url)
        .timeout(Duration::from_millis(ms))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.unwrap_or_default()))
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_chosen_at_once_on_many_threads_differ() {
        let dir = tempfile::tempdir().unwrap();
        let used = dir.path().join("ports");
        let ports: BTreeSet<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| free_port(3, &used).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ports.len(), 8, "{ports:?}");
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
}
