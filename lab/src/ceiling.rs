//! The database's own ceiling for sluice's write pattern: unordered `insert_many` of
//! stored-shape documents, at sluice's batch sizes, through the same Rust driver and the
//! same write concern (`w:1, j:true`), as fast as the database acknowledges them.
//!
//! No budget, no cache, no HTTP: whatever sluice stores per second can only approach this
//! figure, so the load report sets sluice's documents/s against it.
//!
//! ```text
//! cargo run --release -p sluice-lab -- insert-ceiling \
//!     --uri mongodb://127.0.0.1:27017/assessmentdb --batch 250 --batch 2000 \
//!     --seconds 15 --out ceiling.json
//! ```
//!
//! Each run also says what the client spent: this process's CPU per document stored,
//! making the documents and driving them through the driver. That is the work an
//! `/api/data` request does beyond answering HTTP, five documents' worth, measured with a
//! real server answering, so it is the floor under what a request can cost more than
//! `/healthz`. With `--db-pid`, the database's CPU too: documents stored per database
//! CPU-second is the efficiency to hold sluice's inserts against when a load run leaves
//! the database less CPU than this idle machine did.
//!
//! With `--raw-command` each insert is instead one command document this tool builds,
//! sent by the driver's `run_raw_command`: the same documents, write concern and
//! `ordered: false`, but none of `insert_many`'s per-document work (its `_id` check of
//! each raw document, serde's copy of each, the maps of inserted ids it builds for every
//! call); the command document is a copy of its own instead. What the driver's own API
//! offers against that work, measured the same way.
//!
//! It writes into the collection sluice uses, so point it at a lab database, never at one
//! whose data matters.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use bson::{rawdoc, RawArrayBuf, RawDocumentBuf};
use mongodb::options::{Acknowledgment, WriteConcern};
use mongodb::Client;
use serde::Serialize;

use sluice::record::{self, PER_REQUEST};
use sluice::store::{COLLECTION, DEFAULT_DATABASE};

use crate::util::Error;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The database to measure; its path names the database (default assessmentdb).
    #[arg(long, env = "MONGO_URI")]
    uri: String,
    /// Documents per insert command; repeat for several sizes (default: 250, about one insert's
    /// worth at 100 VUs, and 2000, sluice's BATCH_MAX_DOCS).
    #[arg(long = "batch")]
    batches: Vec<usize>,
    /// How long to insert at each batch size.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Insert commands in flight at once; repeat for several (default 1). sluice has at
    /// most FLUSH_CONCURRENCY per replica in flight.
    #[arg(long = "concurrency")]
    concurrencies: Vec<usize>,
    /// Where to write the JSON result (it is printed either way).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// The database server's process, to read its CPU time from `/proc` (same machine).
    #[arg(long)]
    db_pid: Option<u32>,
    /// Send each insert as one command document through `run_raw_command` instead of
    /// `insert_many` (see the module's comment).
    #[arg(long)]
    raw_command: bool,
}

#[derive(Debug, Serialize)]
struct Run {
    batch_docs: usize,
    concurrency: usize,
    seconds: f64,
    commands: u64,
    documents: u64,
    documents_per_second: f64,
    commands_per_second: f64,
    command_ms_p50: f64,
    command_ms_max: f64,
    errors: u64,
    /// This process's user + system CPU over the run, per document stored.
    client_cpu_us_per_document: f64,
    /// The database's CPU over the run, in cores (with `--db-pid`).
    database_cores: Option<f64>,
    /// Documents stored per second of the database's CPU (with `--db-pid`).
    documents_per_database_cpu_second: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    what: &'static str,
    write_concern: &'static str,
    runs: Vec<Run>,
}

fn batch(docs: usize) -> Vec<RawDocumentBuf> {
    let mut out = Vec::with_capacity(docs + PER_REQUEST);
    while out.len() < docs {
        out.extend(record::new_batch(None).1);
    }
    out.truncate(docs);
    out
}

/// One unordered insert of `docs` as a command document, with the write concern sluice
/// uses (`w:1, j:true`).
fn insert_command(docs: Vec<RawDocumentBuf>) -> RawDocumentBuf {
    let mut documents = RawArrayBuf::new();
    for doc in docs {
        documents.push(doc);
    }
    rawdoc! {
        "insert": COLLECTION,
        "documents": documents,
        "ordered": false,
        "writeConcern": { "w": 1, "j": true },
    }
}

pub async fn run(mut args: Args) -> Result<(), Error> {
    if args.batches.is_empty() {
        args.batches = vec![250, 2000];
    }
    if args.concurrencies.is_empty() {
        args.concurrencies = vec![1];
    }
    let client = Client::with_uri_str(&args.uri).await?;
    let database = client
        .default_database()
        .unwrap_or_else(|| client.database(DEFAULT_DATABASE));
    let records = database.collection_with_options::<RawDocumentBuf>(
        COLLECTION,
        mongodb::options::CollectionOptions::builder()
            .write_concern(
                WriteConcern::builder()
                    .w(Acknowledgment::Nodes(1))
                    .journal(true)
                    .build(),
            )
            .build(),
    );
    // One untimed command first: connection set-up and the collection's creation are not
    // part of the rate.
    records.insert_many(batch(PER_REQUEST)).await?;

    let mut runs = Vec::new();
    let plan: Vec<(usize, usize)> = args
        .concurrencies
        .iter()
        .flat_map(|&c| args.batches.iter().map(move |&b| (b, c.max(1))))
        .collect();
    for (docs, concurrency) in plan {
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let started = Instant::now();
        let own_pid = std::process::id();
        let cpu_before = crate::procfs::cpu_seconds(own_pid).unwrap_or(0.0);
        let db_before = args.db_pid.and_then(crate::procfs::cpu_seconds);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let records = records.clone();
            let database = database.clone();
            let raw_command = args.raw_command;
            workers.spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut next = batch(docs);
                while Instant::now() < deadline {
                    let sending = std::mem::take(&mut next);
                    let t = Instant::now();
                    let insert = async {
                        if raw_command {
                            let reply = database.run_raw_command(insert_command(sending)).await?;
                            match reply.get_array("writeErrors") {
                                Ok(errors) => Err(format!("{} write errors", errors.len()).into()),
                                Err(_) => Ok(()),
                            }
                        } else {
                            records
                                .insert_many(sending)
                                .ordered(false)
                                .into_future()
                                .await?;
                            Ok::<_, Error>(())
                        }
                    };
                    // The next batch is made while this one is in flight, as sluice's
                    // requests make theirs while the flusher waits.
                    let (result, made) = tokio::join!(insert, async { batch(docs) });
                    next = made;
                    match result {
                        Ok(()) => latencies.push(t.elapsed()),
                        Err(e) => {
                            errors += 1;
                            eprintln!("insert of {docs} failed: {e}");
                        }
                    }
                }
                (latencies, errors)
            });
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        while let Some(done) = workers.join_next().await {
            let (l, e) = done?;
            latencies.extend(l);
            errors += e;
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = crate::procfs::cpu_seconds(own_pid).unwrap_or(0.0) - cpu_before;
        let db_cpu = match (db_before, args.db_pid.and_then(crate::procfs::cpu_seconds)) {
            (Some(b), Some(a)) => Some(a - b),
            _ => None,
        };
        latencies.sort_unstable();
        let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let commands = latencies.len() as u64;
        let documents = commands * docs as u64;
        let run = Run {
            batch_docs: docs,
            concurrency,
            seconds,
            commands,
            documents,
            documents_per_second: documents as f64 / seconds,
            commands_per_second: commands as f64 / seconds,
            command_ms_p50: ms(latencies.get(latencies.len() / 2)),
            command_ms_max: ms(latencies.last()),
            errors,
            client_cpu_us_per_document: 1e6 * cpu / documents.max(1) as f64,
            database_cores: db_cpu.map(|c| c / seconds),
            documents_per_database_cpu_second: db_cpu
                .filter(|c| *c > 0.0)
                .map(|c| documents as f64 / c),
        };
        eprintln!(
            "batch {docs} x{concurrency} in flight: {:.0} documents/s, {:.1} commands/s, p50 {:.0} ms per command, client {:.1} µs CPU a document",
            run.documents_per_second, run.commands_per_second, run.command_ms_p50, run.client_cpu_us_per_document
        );
        runs.push(run);
    }
    let report = Report {
        what: if args.raw_command {
            "unordered inserts of stored-shape documents as command documents (run_raw_command), back to back"
        } else {
            "unordered insert_many of stored-shape documents, back to back"
        },
        write_concern: "w:1, j:true",
        runs,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &json)?;
    }
    println!("{json}");
    // Dropped instead, the client ends its sessions from a task that outlives the
    // runtime, and that task panics on the way out.
    client.shutdown().await;
    Ok(())
}
