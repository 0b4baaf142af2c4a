//! A process's CPU time, memory and start time from `/proc`, for the lab's per-replica
//! samples, `sluice-cost`, `insert-ceiling` and the replicas' pid checks.

/// utime + stime in seconds: `/proc` counts them in clock ticks (`USER_HZ`, 100 a
/// second on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// When `pid` started, in clock ticks since boot (field 22 of stat): with the pid, what
/// tells a process from a later one that got the same pid.
pub fn start_ticks(pid: u32) -> Option<String> {
    stat_fields(pid)?.get(19).cloned()
}

/// `/proc/PID/stat`'s fields after the command name (field 3 on), which is in
/// parentheses and may hold spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        s.rsplit_once(") ")?
            .1
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// A `/proc/PID/status` line's value in KiB, such as `VmRSS:`.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
