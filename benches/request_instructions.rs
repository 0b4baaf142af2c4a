//! Instructions one `/api/data` request costs sluice in the parts of its path that run
//! without I/O, counted under Valgrind's Callgrind by gungraun. The timed benchmarks
//! (`request_path`) and the lab's µs per request move by a third with the machine's
//! load; a count does not: `records` is the same on every run of one build, and
//! `answer` moves by a few instructions with the clock (the timestamp it formats has
//! other digits, and trailing zeros of its milliseconds are left out). So this is the
//! figure that can hold a budget in CI.
//!
//! - `records`: the five documents of one request made (ids, 512 random characters of
//!   payload each, the timestamp) and encoded to BSON, `record::new_batch`.
//! - `answer`: the handler's 200 answer (`DataAnswer`) written into a hyper response.
//!
//! Each count may exceed its baseline in `benches/instructions.json` by at most 5%
//! (gungraun's hard limit on `Ir`; a run over it exits 3 and fails `scripts/test.sh`).
//! Why 5%: a count is deterministic for one binary, and what moves it between two
//! builds of the same code is the compiler's choices; a change to the request path that
//! costs more than 5% is one someone should look at and, if it is wanted, record by
//! writing the new counts into the baseline in the same commit.
//!
//! Run with `cargo bench --bench request_instructions` (needs `valgrind` and
//! `gungraun-runner` of the library's version; `scripts/test.sh` installs both).

use std::hint::black_box;

use bson::oid::ObjectId;
use bson::RawDocumentBuf;
use gungraun::{
    library_benchmark, library_benchmark_group, main, Callgrind, EventKind, LibraryBenchmarkConfig,
};

use sluice::http::{DataAnswer, Response};
use sluice::record::{self, PER_REQUEST};

/// How far above its baseline a count may go, in percent.
const THRESHOLD_PCT: u64 = 5;

/// The benchmark's configuration: its baseline from `benches/instructions.json`, plus
/// the threshold, as a hard limit on instructions.
fn limit(name: &str) -> LibraryBenchmarkConfig {
    let baseline: serde_json::Value =
        serde_json::from_str(include_str!("instructions.json")).expect("instructions.json");
    let base = baseline["instructions"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("benches/instructions.json has no instructions.{name}"));
    let mut config = LibraryBenchmarkConfig::default();
    config.tool(
        Callgrind::default().hard_limits([(EventKind::Ir, base * (100 + THRESHOLD_PCT) / 100)]),
    );
    config
}

/// Outside the count: the thread's random generator seeded, the allocator warm, as in a
/// replica that has served requests before.
fn warm() {
    black_box(record::new_batch(None));
}

#[library_benchmark]
#[bench::one_request(setup = warm, config = limit("records"))]
fn records(_: ()) -> ([ObjectId; PER_REQUEST], Vec<RawDocumentBuf>) {
    black_box(record::new_batch(None))
}

/// The ids the answer carries, made outside the count.
fn ids() -> ([Option<ObjectId>; PER_REQUEST], [ObjectId; PER_REQUEST]) {
    warm();
    let (writes, _) = record::new_batch(None);
    ([Some(ObjectId::new()); PER_REQUEST], writes)
}

#[library_benchmark]
#[bench::one_request(setup = ids, config = limit("answer"))]
fn answer(ids: ([Option<ObjectId>; PER_REQUEST], [ObjectId; PER_REQUEST])) -> Response {
    let (reads, writes) = black_box(ids);
    black_box(DataAnswer::new(reads, writes).into_response())
}

library_benchmark_group!(name = request; benchmarks = records, answer);

main!(library_benchmark_groups = request);
