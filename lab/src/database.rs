//! The database, through the real driver: ping, exact counts, serverStatus' counters.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::util::{now, Error};

/// The commands counted against DB_COMMAND_BUDGET, per second, from serverStatus'
/// `metrics.commands.<name>.total`: the one set, used by the sampler, the report and the
/// smoke. Everything else (the lab's own serverStatus, drivers' hello/isMaster, buildInfo)
/// is reported apart as `db_other`.
pub const COUNTED_COMMANDS: [&str; 4] = ["insert", "find", "count", "ping"];

pub async fn client(uri: &str) -> Result<mongodb::Client, Error> {
    let mut opts = mongodb::options::ClientOptions::parse(uri).await?;
    opts.direct_connection = Some(true);
    opts.server_selection_timeout = Some(Duration::from_secs(2));
    opts.connect_timeout = Some(Duration::from_secs(2));
    opts.app_name = Some("sluice-lab".into());
    Ok(mongodb::Client::with_options(opts)?)
}

pub fn db_name(uri: &str) -> String {
    let path = uri
        .split("://")
        .nth(1)
        .and_then(|r| r.split_once('/'))
        .map(|x| x.1);
    let name = path.unwrap_or("").split('?').next().unwrap_or("");
    if name.is_empty() {
        "assessmentdb".into()
    } else {
        name.into()
    }
}

pub async fn ping(uri: &str) -> Result<(), Error> {
    let c = client(uri).await?;
    c.database("admin")
        .run_command(bson::doc! {"ping": 1})
        .await?;
    Ok(())
}

pub async fn count(uri: &str) -> Result<u64, Error> {
    let c = client(uri).await?;
    let coll = c
        .database(&db_name(uri))
        .collection::<bson::Document>("records");
    Ok(coll
        .count_documents(bson::doc! {})
        .max_time(Duration::from_secs(600))
        .await?)
}

pub fn bson_num(b: Option<&bson::Bson>) -> Option<u64> {
    match b? {
        bson::Bson::Int32(v) => Some(*v as u64),
        bson::Bson::Int64(v) => Some(*v as u64),
        bson::Bson::Double(v) => Some(*v as u64),
        _ => None,
    }
}

/// serverStatus' command totals by name and documents inserted.
#[derive(Clone, Debug, Default)]
pub struct DbCounters {
    pub commands: BTreeMap<String, u64>,
    pub inserted: u64,
}

impl DbCounters {
    pub fn counted(&self) -> u64 {
        COUNTED_COMMANDS
            .iter()
            .map(|c| self.commands.get(*c).copied().unwrap_or(0))
            .sum()
    }
    pub fn total(&self) -> u64 {
        self.commands.values().sum()
    }
}

pub async fn server_status(c: &mongodb::Client) -> Result<DbCounters, Error> {
    let s = c
        .database("admin")
        .run_command(bson::doc! {"serverStatus": 1})
        .await?;
    let metrics = s.get_document("metrics").ok();
    let mut out = DbCounters::default();
    if let Some(cmds) = metrics.and_then(|m| m.get_document("commands").ok()) {
        for (name, v) in cmds {
            let n = match v {
                bson::Bson::Document(d) => bson_num(d.get("total")),
                other => bson_num(Some(other)),
            };
            if let Some(n) = n {
                out.commands.insert(name.clone(), n);
            }
        }
    }
    out.inserted = metrics
        .and_then(|m| m.get_document("document").ok())
        .and_then(|d| bson_num(d.get("inserted")))
        .unwrap_or(0);
    Ok(out)
}

pub async fn settle(uri: &str) -> Result<u64, Error> {
    let c = client(uri).await?;
    let mut prev = None;
    for _ in 0..30 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), server_status(&c)).await {
            if prev == Some(s.inserted) {
                return Ok(s.inserted);
            }
            prev = Some(s.inserted);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Err("the inserted-documents counter kept moving".into())
}

pub async fn snapshot(uri: &str, with_count: bool, out: &Path) -> Result<(), Error> {
    let c = client(uri).await?;
    let s = server_status(&c).await?;
    let mut v = json!({
        "t": now(),
        "commands": s.commands,
        "commands_total": s.total(),
        "probe_commands": s.commands.get("serverStatus").copied().unwrap_or(0),
        "counted_commands": s.counted(),
        "documents_inserted": s.inserted,
    });
    if with_count {
        v["records"] = json!(count(uri).await?);
    }
    v["t_end"] = json!(now());
    std::fs::write(out, serde_json::to_string(&v)?)?;
    Ok(())
}

/// The `data:` map of a ConfigMap, in the file's order: the replicas' environment.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_name_from_uri() {
        assert_eq!(
            db_name("mongodb://127.0.0.1:1/assessmentdb"),
            "assessmentdb"
        );
        assert_eq!(db_name("mongodb://h:1/x?directConnection=true"), "x");
        assert_eq!(db_name("mongodb://h:1"), "assessmentdb");
    }
}
