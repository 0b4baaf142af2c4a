//! Malformed and hostile input, sent as raw bytes: each gets its expected answer, and the
//! service is still healthy afterwards.

mod common;

use std::collections::VecDeque;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::sluice::metrics::ShedReason;
use ::sluice::server::{fit_connections, reserved_descriptors, Fit};
use common::*;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a fresh connection and reads until the server closes or `limit`.
async fn exchange(port: u16, request: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until_closed(&mut stream, limit).await
}

async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let until = Instant::now() + limit;
    while let Ok(Ok(n)) = tokio::time::timeout(
        until.saturating_duration_since(Instant::now()),
        stream.read(&mut buf),
    )
    .await
    {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn get_with(extra_headers: &str, target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra_headers}Connection: close\r\n\r\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_their_expected_answers() {
    let (_redis, _mongo, sluice) = spawn_app(&[("HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let port = sluice.port;
    let big_header = format!("X-Big: {}\r\n", "a".repeat(20 * 1024));
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_uri = format!("/api/data?{}", "q".repeat(9 * 1024));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unknown path", get_with("", "/nope"), 404),
        ("unknown method", b"BREW /api/data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 405),
        ("DELETE", b"DELETE /api/data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 405),
        ("POST with a body", b"POST /api/data HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_vec(), 405),
        ("oversized header", get_with(&big_header, "/healthz"), 431),
        ("too many headers", get_with(&many_headers, "/healthz"), 431),
        ("oversized URI", get_with("", &long_uri), 414),
        ("GET with a body", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_vec(), 200),
        ("HTTP/1.0", b"GET /healthz HTTP/1.0\r\n\r\n".to_vec(), 200),
        ("garbage bytes", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(), 400),
        ("not HTTP at all", b"hello there\r\n\r\n".to_vec(), 400),
        ("bad version", b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(), 0),
        ("conflicting lengths", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(), 400),
        // RFC 9112: chunked wins and the connection closes after, so nothing can be smuggled.
        ("length and chunked", b"POST /api/data HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n".to_vec(), 405),
        ("negative length", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(), 400),
        ("NUL in path", b"GET /heal\x00thz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("non-UTF-8 path", get_with("", "/api/%FF%FE"), 404),
        ("query string on data", get_with("", "/api/data?x=1&y=%00"), 200),
    ];
    let tried = cases.len();
    for (name, request, expected) in cases {
        let response = exchange(port, &request, Duration::from_secs(5)).await;
        let status = status_of(&response);
        if expected == 0 {
            assert!(
                status == 0 || (400..500).contains(&status),
                "{name}: {response:.200}"
            );
        } else {
            assert_eq!(status, expected, "{name}: {response:.300}");
        }
        if name == "length and chunked" {
            assert!(
                response.contains("connection: close") && !response.contains("200 OK"),
                "{response}"
            );
        }
        if (400..500).contains(&status) && status != 400 && status != 431 {
            assert!(
                response.contains("\"message\""),
                "{name}: JSON error body: {response:.300}"
            );
        }
    }

    // Two pipelined requests on one connection: two answers, in order.
    let pipelined = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let response = exchange(port, pipelined, Duration::from_secs(5)).await;
    let first = response.find("HTTP/1.1 200").expect("first answer");
    let second = response.find("HTTP/1.1 404").expect("second answer");
    assert!(first < second, "answers in order: {response}");

    // Still healthy after all of it.
    let ok = get(&client(), &sluice.url("/api/data")).await;
    assert_eq!(ok.status, 200);
    println!("{} malformed inputs answered as expected", tried + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_off() {
    let (_redis, _mongo, sluice) = spawn_app(&[("HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let mut stream = TcpStream::connect(("127.0.0.1", sluice.port))
        .await
        .unwrap();
    let started = Instant::now();
    let mut closed_after = None;
    // One byte every 300 ms: the head would take seconds; the server stops waiting at 1 s.
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1234567890\r\n\r\n" {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await
        {
            assert!(
                n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
                "no answer but a close or 408"
            );
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the server closed a connection that dribbles its head");
    assert!(
        closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );
}

/// Opens `n` connections that each complete one keep-alive request, so each has surely
/// been accepted and holds its slot.
async fn hold_slots(port: u16, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (status, _) = ask(&mut stream, "/healthz").await;
        assert_eq!(status, 200);
        held.push(stream);
    }
    held
}

/// Sends a keep-alive GET for `path` on `stream` and reads its answer: status and body.
async fn ask(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        if body.len() >= length {
            return (status_of(&text), body.to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_cap_get_503() {
    let (_redis, _mongo, sluice) = spawn_app(&[("MAX_CONNECTIONS", "5")]).await;
    let mut held = hold_slots(sluice.port, 5).await;
    let asked = Instant::now();
    let response = exchange(
        sluice.port,
        &get_with("", "/healthz"),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_of(&response), 503, "{response}");
    assert!(response.to_lowercase().contains("retry-after: 1"));
    assert!(response.contains("too many open connections"));
    // Not at once: a client that ignores Retry-After must not be able to spin.
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "refused after {:?}, without waiting for a slot",
        asked.elapsed()
    );
    // A slot that frees while a connection waits is that connection's. (The waiting
    // pool, 1 for a cap of 5, frees once the refused client above has closed.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    let waiting = tokio::spawn(async move {
        exchange(
            sluice.port,
            &get_with("", "/healthz"),
            Duration::from_secs(3),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.pop();
    let response = waiting.await.unwrap();
    assert_eq!(
        status_of(&response),
        200,
        "served once a slot freed: {response}"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(250),
        "answered before any slot was freed"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = exchange(
        sluice.port,
        &get_with("", "/healthz"),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        status_of(&response),
        200,
        "a slot frees when a connection closes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_database_at_start_degrades_instead_of_hanging() {
    let redis = Redis::start();
    let nowhere = format!("mongodb://127.0.0.1:{}/assessmentdb", free_port());
    let sluice = Sluice::start(&nowhere, &redis.url(), &[("DB_TIMEOUT_MS", "500")]).await;
    let client = client();
    assert_eq!(get(&client, &sluice.url("/healthz")).await.status, 200);
    let ready = get(&client, &sluice.url("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert!(ready.body["reason"].as_str().unwrap().contains("mongodb"));
    let data = get(&client, &sluice.url("/api/data")).await;
    assert_eq!(data.status, 503);
    assert!(data.retry_after && data.latency < Duration::from_secs(1));
}

#[test]
fn malformed_mongo_uri_stops_start_up() {
    for uri in [
        "mongodb://",
        "mongodb://host:notaport/db",
        "mongodb://a/b?w=banana&journal=maybe",
    ] {
        let (code, stderr) = run_to_exit(&[("MONGO_URI", uri)]);
        assert_eq!(code, Some(2), "{uri}: {stderr}");
        assert!(stderr.contains("MONGO_URI"), "{uri}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_refusals_are_closed_unanswered() {
    // A cap of 5: 1 may wait for a slot and 1 be refused at once (an eighth and a
    // thirty-second, rounded up).
    let (_redis, _mongo, sluice) = spawn_app(&[("MAX_CONNECTIONS", "5")]).await;
    let shed = || sluice.app().metrics.shed.get(ShedReason::Connections).get();
    let held = hold_slots(sluice.port, 5).await;
    let connect = || TcpStream::connect(("127.0.0.1", sluice.port));
    let waiting = connect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Refused at once, and (never closing) it keeps its place until its refusal's limit.
    let mut refused = connect().await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_millis(500), refused.read(&mut buf))
        .await
        .expect("a 503 at once")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 503"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(shed(), 1);
    // Past both: closed at once, with no answer (the close can beat the request).
    let asked = Instant::now();
    let mut closed = connect().await.unwrap();
    let _ = closed.write_all(&get_with("", "/healthz")).await;
    let response = read_until_closed(&mut closed, Duration::from_secs(3)).await;
    assert_eq!(response, "", "no answer past the refusals");
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "closed after {:?}",
        asked.elapsed()
    );
    assert_eq!(shed(), 2, "counted as shed");

    // Everything frees: the next connection is served.
    drop((held, waiting, refused));
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let response = exchange(
            sluice.port,
            &get_with("", "/healthz"),
            Duration::from_secs(3),
        )
        .await;
        if status_of(&response) == 200 {
            break;
        }
        assert!(Instant::now() < until, "never served again: {response}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// sluice's binary with its open-files limit (soft and hard) set to `limit`, `env` only.
fn sluice_with_open_files(limit: u64, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    // SAFETY: runs in the child between fork and exec; setrlimit is async-signal-safe and
    // touches no memory.
    unsafe {
        cmd.pre_exec(move || {
            setrlimit(Resource::RLIMIT_NOFILE, limit, limit).map_err(std::io::Error::from)
        });
    }
    cmd
}

#[test]
fn an_open_files_limit_too_low_for_a_small_cap_stops_start_up() {
    let env = [("APP_PORT".to_string(), free_port().to_string())];
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("stderr");
    let mut child = sluice_with_open_files(100, &env)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(10));
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(
        stderr.contains("MAX_CONNECTIONS") && stderr.contains("open-files limit"),
        "{stderr}"
    );
}

/// Under an open-files limit of 512, sluice lowers `MAX_CONNECTIONS` (20,000 by default)
/// to what fits, and a flood of three times that many connections never takes the
/// descriptors MongoDB and Redis need: both restarted mid-flood, sluice reconnects to them
/// and stores a write.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_under_a_low_open_files_limit_leaves_room_to_reconnect() {
    const LIMIT: u64 = 512;
    let mut redis = Redis::start();
    let mut mongo = Mongo::start().await;
    let port = free_port();
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("sluice.log");
    let env: Vec<(String, String)> = [
        ("MONGO_URI", mongo.uri()),
        ("REDIS_URL", redis.url()),
        ("APP_HOST", "127.0.0.1".into()),
        ("APP_PORT", port.to_string()),
        ("POD_NAME", format!("test-{}", free_port())),
        ("BUDGET_FALLBACK_PODS", "1".into()),
        ("LOG_LEVEL", "info".into()),
        // The flood's idle connections keep their slots for the whole test.
        ("HEADER_READ_TIMEOUT_MS", "120000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let sluice = Proc::spawn("sluice", &mut sluice_with_open_files(LIMIT, &env), &log);
    wait_for_port(port, Duration::from_secs(10));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let Fit::Lowered(cap) = fit_connections(20_000, LIMIT, reserved_descriptors(1, 8)) else {
        panic!("20,000 connections cannot fit under {LIMIT} open files");
    };
    let lowered = read_log()
        .lines()
        .find(|l| l.contains("WARN") && l.contains("MAX_CONNECTIONS"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no warning about MAX_CONNECTIONS:\n{}", read_log()));
    for field in [
        "max_connections=20000".to_string(),
        format!("open_files_limit={LIMIT}"),
        format!("lowered_to={cap}"),
    ] {
        assert!(lowered.contains(&field), "{field} in {lowered}");
    }

    // A keep-alive connection of the test's own, taken before the flood.
    let mut probe = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while ask(&mut probe, "/readyz").await.0 != 200 {
        assert!(Instant::now() < until, "never ready:\n{}", read_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The flood: about 500 connections a second, none of which sends a byte or reads its
    // answer. The first three times the limit stay open (so those served hold their
    // slots); the rest are closed after a second, as a refusal's limit.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let flood_size = (3 * LIMIT as usize).min(hard.saturating_sub(256) as usize);
    assert!(
        flood_size > LIMIT as usize,
        "this test needs an open-files limit over 768"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut kept, mut recent) = (Vec::new(), VecDeque::new());
            let mut made = 0u64;
            for tried in 1u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
                    made += 1;
                    if kept.len() < flood_size {
                        kept.push(stream);
                    } else {
                        recent.push_back((Instant::now(), stream));
                    }
                }
                while recent
                    .front()
                    .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(1))
                {
                    recent.pop_front();
                }
                if tried % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            made
        })
    };
    let flood_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Both dependencies go away and come back mid-flood: sluice must open new sockets.
    mongo.kill();
    redis.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();
    mongo.restart().await;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (data, _) = ask(&mut probe, "/api/data").await;
        let (ready, body) = ask(&mut probe, "/readyz").await;
        if data == 200 && ready == 200 && body.contains(r#""redis":"up""#) {
            break;
        }
        assert!(
            Instant::now() < until,
            "no reconnect during the flood: /api/data {data}, /readyz {ready} {body}\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The accept loop reports what it closed unanswered every 10 s.
    let until = flood_started + Duration::from_secs(15);
    while !read_log().contains("connections closed unanswered") {
        assert!(
            Instant::now() < until,
            "no report of the flood:\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let made = flood.await.unwrap();
    assert!(made > 3 * LIMIT, "the flood made only {made} connections");
    let (status, metrics) = ask(&mut probe, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"sluice_shed_total{reason="connections"} "#))
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0),
        "refusals counted"
    );
    let log_text = read_log();
    for exhausted in ["accept failed", "Too many open files", "os error 24"] {
        assert!(!log_text.contains(exhausted), "{exhausted}:\n{log_text}");
    }
    drop(sluice);
}
