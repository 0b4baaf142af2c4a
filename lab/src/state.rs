//! The lab's state files that Rust writes during a run and reads when it judges it, as
//! types: the conductor's `timeline.jsonl` (a [`Row`] each wall-clock second),
//! `events.json` (the [`Event`]s: faults, scaling, replicas) and `autoscaler.json` (the
//! [`Autoscaling`] it played). This module alone names those files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::util::{read_to_string, Error};

const TIMELINE: &str = "timeline.jsonl";
const EVENTS: &str = "events.json";
const AUTOSCALER: &str = "autoscaler.json";

/// One wall-clock second of the run, as the conductor sampled it. What a sample could not
/// read (the database stalled, HAProxy's first sample, no autoscaler decision that
/// second) is `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Unix seconds when the sample started, and its whole second.
    pub t: f64,
    pub second: i64,
    /// setup-local.sh's phase (warmup, data, settle, healthz, finished).
    pub phase: String,
    /// Counted database commands (`COUNTED_COMMANDS`) since the last sample; the other
    /// commands; documents inserted.
    pub db_commands: Option<u64>,
    pub db_other: Option<u64>,
    pub documents: Option<u64>,
    /// Whole seconds since the last serverStatus, and the longest stretch of time the
    /// difference can cover (from the last request to this answer).
    pub span_s: Option<f64>,
    pub window_s: Option<f64>,
    /// The counted commands by name, those that moved.
    pub db_by_name: Option<BTreeMap<String, u64>>,
    /// HAProxy: the replicas its health check has taken out; requests and 5xx at the
    /// front door since the last sample; of those 5xx, the ones HAProxy answered itself.
    pub replicas_checked_down: Option<Vec<String>>,
    pub requests: Option<u64>,
    pub failed: Option<u64>,
    pub haproxy_own_5xx: Option<u64>,
    /// Ready replicas, live replica processes, and whether every ready one answered
    /// /readyz 200.
    pub replicas: u32,
    pub live_pods: u32,
    pub all_ready: bool,
    /// Write queue depth summed over the replicas.
    pub queue_depth: f64,
    pub replica: Vec<ReplicaSample>,
    /// The average memory utilisation the autoscaler decided on, when it decided.
    pub memory_util_pct: Option<f64>,
}

/// One replica in one [`Row`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSample {
    pub slot: usize,
    pub pid: u32,
    pub port: u16,
    pub state: String,
    pub ready: bool,
    pub cpu_cores: Option<f64>,
    pub rss_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
    pub connections: u64,
    pub queue_depth: Option<f64>,
}

/// Something that happened in the run: the conductor writes `t`, `kind` and `detail`
/// and what the act itself knows; the report adds what followed it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub t: f64,
    pub kind: String,
    pub detail: String,
    /// Whether the act did what it set out to (a fault injected, a replica killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// When the lab stopped injecting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<f64>,
    /// Why the act failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A fault not injected; because the load had too little time left for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_enough_time: bool,
    /// The replica count a scaling decision asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// A database stall: when the database was let go again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_end: Option<f64>,
    /// The report's: requests failed in the window after it, seconds until every
    /// replica was ready again, and the seconds over the budget it is blamed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_in_10s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_after_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_over_budget: Option<u64>,
    /// The report's, for a database stall: which replicas HAProxy's health check took
    /// out, and the 5xx HAProxy answered itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_taken_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haproxy_own_5xx: Option<u64>,
}

impl Event {
    pub fn new(t: f64, kind: &str, detail: String) -> Event {
        Event {
            t,
            kind: kind.to_string(),
            detail,
            ..Event::default()
        }
    }

    /// A fault the conductor injected (or skipped), not the end-of-chaos marker.
    pub fn is_fault(&self) -> bool {
        self.kind.starts_with("chaos-") && self.kind != "chaos-done"
    }
}

/// The autoscaler the conductor played: hpa.yaml's rule (or a fixed count) and the time
/// scale; the report adds what the replicas held at the minimum count.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Autoscaling {
    pub mode: String,
    pub time_scale: f64,
    pub fixed_replicas: Option<u32>,
    pub min: u32,
    pub max: u32,
    pub surge: u32,
    pub target_pct: f64,
    pub memory_request_mib: f64,
    pub scale_up_window_s: f64,
    pub scale_down_window_s: f64,
    #[serde(default)]
    pub held_at_minimum_pct: Option<f64>,
}

/// Appends rows to STATE/timeline.jsonl, one JSON line each.
pub struct TimelineWriter(std::fs::File);

impl TimelineWriter {
    pub fn open(state: &Path) -> Result<TimelineWriter, Error> {
        Ok(TimelineWriter(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(state.join(TIMELINE))?,
        ))
    }

    pub fn append(&mut self, row: &Row) -> Result<(), Error> {
        writeln!(self.0, "{}", serde_json::to_string(row)?)?;
        Ok(())
    }
}

/// STATE/timeline.jsonl's rows; a line that is not a row (cut short when the conductor
/// was stopped) is left out.
pub fn read_timeline(state: &Path) -> Vec<Row> {
    read_to_string(state.join(TIMELINE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Writes STATE/events.json whole, through a temporary file, so that a reader never
/// sees half of it.
pub fn write_events(state: &Path, events: &[Event]) -> Result<(), Error> {
    let tmp = state.join(format!("{EVENTS}.new"));
    std::fs::write(&tmp, serde_json::to_string_pretty(events)?)?;
    std::fs::rename(tmp, state.join(EVENTS))?;
    Ok(())
}

pub fn read_events(state: &Path) -> Result<Vec<Event>, Error> {
    match read_to_string(state.join(EVENTS)) {
        Some(text) => Ok(serde_json::from_str(&text)
            .map_err(|e| format!("{}: {e}", state.join(EVENTS).display()))?),
        None => Ok(vec![]),
    }
}

pub fn write_autoscaling(state: &Path, a: &Autoscaling) -> Result<(), Error> {
    std::fs::write(state.join(AUTOSCALER), serde_json::to_string(a)?)?;
    Ok(())
}

pub fn read_autoscaling(state: &Path) -> Option<Autoscaling> {
    serde_json::from_str(&read_to_string(state.join(AUTOSCALER))?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_conductor_writes_the_report_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let row = Row {
            t: 10.5,
            second: 10,
            phase: "data".into(),
            db_commands: Some(49),
            replicas: 2,
            replica: vec![ReplicaSample {
                slot: 1,
                pid: 42,
                connections: 3000,
                ..ReplicaSample::default()
            }],
            ..Row::default()
        };
        let mut w = TimelineWriter::open(dir.path()).unwrap();
        w.append(&row).unwrap();
        w.append(&Row::default()).unwrap();
        assert_eq!(read_timeline(dir.path()), vec![row, Row::default()]);

        let mut kill = Event::new(11.0, "chaos-kill-replica", "kill -9 sluice-local-1".into());
        kill.ok = Some(true);
        let events = vec![kill, Event::new(12.0, "chaos-done", String::new())];
        write_events(dir.path(), &events).unwrap();
        assert_eq!(read_events(dir.path()).unwrap(), events);
        assert!(events[0].is_fault() && !events[1].is_fault());
        // Only what was set is written.
        let text = std::fs::read_to_string(dir.path().join(EVENTS)).unwrap();
        assert!(
            !text.contains("skipped") && !text.contains("stall_end"),
            "{text}"
        );
    }
}
