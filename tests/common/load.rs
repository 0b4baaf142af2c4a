//! Clients: single requests, bursts, closed loops, and the check every test ends with,
//! that nothing acknowledged was lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::servers::Mongo;

/// One `/api/data` answer as a client saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub latency: Duration,
    pub retry_after: bool,
    pub body: Value,
    pub at: Instant,
}

impl Outcome {
    pub fn write_ids(&self) -> Vec<String> {
        self.body["writes"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(4096)
        .build()
        .unwrap()
}

/// One GET, with failures to get an answer reported as status 0 and the error as body.
pub async fn get(client: &reqwest::Client, url: &str) -> Outcome {
    send(client.get(url)).await
}

/// Sends a request, with failures to get an answer reported as status 0.
pub async fn send(request: reqwest::RequestBuilder) -> Outcome {
    let at = Instant::now();
    match request.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            let body = r.json().await.unwrap_or(Value::Null);
            Outcome {
                status,
                latency: at.elapsed(),
                retry_after,
                body,
                at,
            }
        }
        Err(e) => Outcome {
            status: 0,
            latency: at.elapsed(),
            retry_after: false,
            body: Value::String(format!("{e:?}")),
            at,
        },
    }
}

/// `n` concurrent `GET /api/data`, all at once.
pub async fn burst(url: &str, n: usize) -> Vec<Outcome> {
    let client = client();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A burst of `n` concurrent `GET /api/data` on each pod at once.
pub async fn bursts(pods: &[super::Sluice], n: usize) -> Vec<Outcome> {
    let each = pods.iter().map(|p| {
        let url = p.url("/api/data");
        async move { burst(&url, n).await }
    });
    futures_util::future::join_all(each).await.concat()
}

/// A closed loop of `users` clients with no think time, until `stop` is set.
pub fn load(
    url: &str,
    users: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    let url = url.to_string();
    tokio::spawn(async move {
        let client = client();
        let workers: Vec<_> = (0..users)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let o = get(&client, &url).await;
                        if o.status == 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        seen.push(o);
                    }
                    seen
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all
    })
}

/// Asserts that every document of every 200 is stored, and returns how many were checked.
pub async fn assert_nothing_lost(mongo: &Mongo, outcomes: &[Outcome]) -> usize {
    let stored = mongo.stored_ids().await;
    let acknowledged: Vec<String> = outcomes
        .iter()
        .filter(|o| o.status == 200)
        .flat_map(Outcome::write_ids)
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged documents are not stored, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
    acknowledged.len()
}
