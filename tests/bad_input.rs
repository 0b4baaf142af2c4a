//! Malformed and hostile input, sent as raw bytes: each gets its expected answer, and the
//! service is still healthy afterwards.

mod common;

use std::time::{Duration, Instant};

use common::*;
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

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_cap_get_503() {
    let (_redis, _mongo, sluice) = spawn_app(&[("MAX_CONNECTIONS", "5")]).await;
    // Each held connection completes one keep-alive request, so it has surely been
    // accepted and holds its slot.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(("127.0.0.1", sluice.port))
            .await
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
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
    // A slot that frees while a connection waits is that connection's.
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
