//! What every part of the lab reads the same way: the clock, files that may be absent,
//! JSON and `KEY=VALUE` files.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The largest share of failed requests a CPU or profiling run may have and still be a
/// measure of the request: a healthy run fails none (its load stays below sluice's
/// shedding), while a run past this measured the error path (a database gone away
/// answers every request 503 at once); the margin leaves room for a stray few.
pub const MAX_FAILED_SHARE: f64 = 0.01;

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn read_to_string(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

pub fn load_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&read_to_string(p)?).ok()
}

pub fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_f64()
}

pub fn env_file(p: &Path) -> BTreeMap<String, String> {
    read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}
