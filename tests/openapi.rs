//! `api/openapi.json` against the real service.
//!
//! - The document is valid OpenAPI 3.1 (`openapi-spec-validator`).
//! - sluice serves it, byte for byte, at `GET /openapi.json`.
//! - schemathesis fuzzes a real sluice (real Redis, real MongoDB-wire server) from the
//!   document, valid and invalid data alike, plus the paths, methods, headers and query
//!   strings a careless or hostile client sends, and checks every answer against the
//!   document. Its recording (HAR) is then read here: how many requests, how many distinct
//!   bad inputs, the `X-Request-Id` and `Idempotency-Key` rules a schema cannot express,
//!   and that every write id of every 200 is stored in MongoDB.
//! - The drift check: a copy of the document with one response field changed must make
//!   the same conformance check fail against the same sluice.
//!
//! The raw-socket cases a schema fuzzer cannot send (NUL bytes, broken heads, oversized
//! heads) stay in `tests/bad_input.rs`.
//!
//! Tools come from the venv `scripts/tools.sh` installs (`$SLUICE_TOOLS/venv`, default
//! `~/.cache/sluice/tools/venv`); a missing tool fails the test with a pointer to
//! `scripts/test.sh` instead of skipping. `SLUICE_FUZZ_SEED` replays a run's seed;
//! `SLUICE_FUZZ_EXAMPLES` changes how many examples each operation gets;
//! `SLUICE_FUZZ_KEEP` keeps the documents, configs, logs and recordings of a run.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

/// The document, relative to the crate root.
const DOCUMENT: &str = "api/openapi.json";

/// What the fuzzing runs may take at most before they are killed and the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(150);

/// Examples per operation in the main run (49 operations) unless `SLUICE_FUZZ_EXAMPLES`.
const DEFAULT_EXAMPLES: u32 = 25;

/// schemathesis settings the CLI has no flag for. Every 5xx is a failure except 503,
/// which the document lists (with `Retry-After`) wherever sluice can shed; whether one was
/// documented for that operation is `status_code_conformance`'s to say. Checks are left
/// at schemathesis's default, all of them, because naming them on the command line would
/// override the per-operation settings below.
const CONFIG: &str = r#"
[generation]
database = "none"

[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]
"#;

/// Per-operation settings; the first block that names a setting for an operation wins.
const OPERATIONS: &str = r#"
# Documented only to describe their 405: valid data must get exactly that answer, and
# that valid data "mostly rejected" is no news.
[[operations]]
include-method = ["PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE"]
checks.positive_data_acceptance.expected-statuses = ["405"]
warnings = false

[[operations]]
include-name = "HEAD /api/data"
checks.positive_data_acceptance.expected-statuses = ["405"]
warnings = false

# The 405 operations are listed so their answers are described, not because sluice
# supports them: `Allow` is checked against the exact value the document gives instead.
[[operations]]
include-method = "OPTIONS"
checks.allow_header_conformance.enabled = false
"#;

/// The hostile run's additions. Its query parameter stands for any query string, which
/// sluice ignores by design, so "invalid" query data is not invalid to sluice: the
/// negative-data check is off for that run (the recording's rules still check that each
/// bad input gets its answer). Probe paths come ahead of the blocks above: any value of
/// `unknown` is a path sluice lacks, but a negated schema would draw real route names,
/// so they get valid data only, and every method's answer is 404.
const HOSTILE: &str = r#"
[checks.negative_data_rejection]
enabled = false

[[operations]]
include-path-regex = "\\{unknown\\}"
generation.mode = "positive"
checks.positive_data_acceptance.expected-statuses = ["404"]
warnings = false
"#;

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn document_text() -> String {
    std::fs::read_to_string(crate_root().join(DOCUMENT)).unwrap()
}

fn document() -> Value {
    serde_json::from_str(&document_text()).expect("api/openapi.json is JSON")
}

/// A scratch directory, kept (and named) when `SLUICE_FUZZ_KEEP` is set.
fn scratch() -> TempDir {
    let mut dir = TempDir::new().unwrap();
    if std::env::var_os("SLUICE_FUZZ_KEEP").is_some() {
        dir.disable_cleanup(true);
        println!("keeping {}", dir.path().display());
    }
    dir
}

/// A program from the tools venv, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    let tools = std::env::var("SLUICE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice/tools")
        });
    let path = tools.join("venv/bin").join(name);
    assert!(
        path.is_file(),
        "{name} is missing ({} does not exist): run scripts/test.sh, which installs it \
         into the tools venv",
        path.display()
    );
    path
}

/// What one CLI run printed and how it ended.
struct Run {
    ok: bool,
    output: String,
    took: Duration,
}

/// Runs `cmd` in `dir` with stdout and stderr to one file, killed after `limit`.
fn run(mut cmd: Command, dir: &Path, label: &str, limit: Duration) -> Run {
    let log = dir.join(format!("{label}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    let mut child = cmd
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let status = common::wait_child(&mut child, limit);
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some(),
        "{label} did not finish within {limit:?} and was killed; it printed:\n{output}"
    );
    Run {
        ok: status.unwrap().success(),
        output,
        took: started.elapsed(),
    }
}

/// The last `n` lines of `text`, for failure messages that stay readable.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn schemathesis_version() -> String {
    let out = Command::new(tool("schemathesis"))
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One schemathesis run of `document` against `base_url`, recorded as HAR in `dir`.
struct Fuzz {
    label: &'static str,
    config: String,
    document: PathBuf,
    base_url: String,
    dir: PathBuf,
    args: Vec<String>,
}

impl Fuzz {
    fn har(&self) -> PathBuf {
        self.dir.join(format!("{}.har", self.label))
    }

    fn command(&self) -> Command {
        let config = self.dir.join(format!("{}.toml", self.label));
        std::fs::write(&config, &self.config).unwrap();
        let mut cmd = Command::new(tool("schemathesis"));
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--no-color")
            .arg("run")
            .arg(&self.document)
            .args(["--url", &self.base_url])
            .args(["--report", "har"])
            .arg("--report-har-path")
            .arg(self.har())
            // Record exactly what was sent and answered: ids and keys are what is checked.
            .args(["--output-sanitize", "false"])
            .args(["--request-timeout", "10"])
            .args(&self.args);
        cmd
    }

    fn run(&self) -> Run {
        let cmd = self.command();
        println!("$ {}", shell_line(&cmd));
        run(cmd, &self.dir, self.label, RUN_LIMIT)
    }
}

/// A command as one line a person could paste (temporary paths and all).
fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,".contains(c))
            {
                a.into_owned()
            } else {
                format!("'{a}'")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn seed() -> u64 {
    std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        })
}

fn examples() -> u32 {
    std::env::var("SLUICE_FUZZ_EXAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_EXAMPLES)
}

// ---------------------------------------------------------------------------------------
// The recording
// ---------------------------------------------------------------------------------------

/// One request and its answer, as the HAR recorded them.
#[derive(Debug)]
struct Exchange {
    method: String,
    url: String,
    path: String,
    query: String,
    request_headers: Vec<(String, String)>,
    status: u16,
    response_headers: HashMap<String, String>,
    body: String,
}

impl Exchange {
    fn request_header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn response_header(&self, name: &str) -> Option<&str> {
        self.response_headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    fn short(&self) -> String {
        let mut url = format!("{} {}", self.method, self.url);
        if url.len() > 160 {
            url.truncate(160);
            url.push('…');
        }
        let headers: Vec<String> = self
            .request_headers
            .iter()
            .filter(|(n, _)| !BORING_HEADERS.contains(&n.to_ascii_lowercase().as_str()))
            .map(|(n, v)| format!("{n}: {v:?}"))
            .collect();
        format!("{url} [{}] -> {}", headers.join(", "), self.status)
    }

    /// Answers hyper writes itself, before sluice sees the request: empty, not JSON.
    fn answered_by_hyper(&self) -> bool {
        matches!(self.status, 400 | 431) && self.body.is_empty()
    }
}

/// Headers every request carries; anything else was chosen by the fuzzer.
const BORING_HEADERS: &[&str] = &[
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "connection",
    "content-length",
    "x-schemathesis-testcaseid",
];

fn read_har(path: &Path) -> Vec<Exchange> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no recording at {}: {e}", path.display()));
    let har: Value = serde_json::from_str(&text).expect("the HAR is JSON");
    let entries = har["log"]["entries"].as_array().expect("HAR log.entries");
    entries
        .iter()
        .map(|e| {
            let req = &e["request"];
            let resp = &e["response"];
            let url = req["url"].as_str().unwrap_or_default().to_string();
            let after_authority = url
                .split_once("://")
                .map(|(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]))
                .unwrap_or(&url);
            let (path, query) = after_authority
                .split_once('?')
                .unwrap_or((after_authority, ""));
            let pairs = |v: &Value| -> Vec<(String, String)> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|h| {
                        (
                            h["name"].as_str().unwrap_or_default().to_string(),
                            h["value"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            };
            Exchange {
                method: req["method"].as_str().unwrap_or_default().to_string(),
                path: path.to_string(),
                query: query.to_string(),
                url: after_authority.to_string(),
                request_headers: pairs(&req["headers"]),
                status: resp["status"].as_u64().unwrap_or(0) as u16,
                response_headers: pairs(&resp["headers"])
                    .into_iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), v))
                    .collect(),
                body: resp["content"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The rules a schema cannot express
// ---------------------------------------------------------------------------------------

const ROUTES: &[&str] = &[
    "/healthz",
    "/readyz",
    "/readyz/pod",
    "/api/data",
    "/api/stats",
    "/api/cache/status",
    "/metrics",
    "/openapi.json",
];

/// HTTP drops a field value's surrounding spaces and tabs; sluice sees the rest.
fn field_value(v: &str) -> &str {
    v.trim_matches([' ', '\t'])
}

/// 1 to 128 characters of visible ASCII: sluice uses it as the request's id.
fn usable_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len()) && v.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn is_generated_id(v: &str) -> bool {
    v.len() == 32
        && v.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The key inside a well-formed `Idempotency-Key` (an sf-string or the same bare), or None.
fn idempotency_key(v: &str) -> Option<&str> {
    let v = field_value(v);
    let key = v
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(v);
    let ok = (8..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:~-".contains(&b));
    ok.then_some(key)
}

fn is_object_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 24
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Why a request is one a careful client would not send, if it is.
fn bad_input_kinds(x: &Exchange) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    let known = ROUTES.contains(&x.path.as_str());
    if !known {
        kinds.push("unknown path");
    }
    let allowed = if x.path == "/api/data" {
        &["GET"][..]
    } else {
        &["GET", "HEAD"][..]
    };
    if known && !allowed.contains(&x.method.as_str()) {
        kinds.push("method not allowed");
    }
    if !x.query.is_empty() {
        kinds.push("query string");
    }
    if let Some(v) = x.request_header("idempotency-key") {
        if idempotency_key(v).is_none() {
            kinds.push("malformed Idempotency-Key");
        }
    }
    if let Some(v) = x.request_header("x-request-id") {
        if !usable_request_id(field_value(v)) {
            kinds.push("unusable X-Request-Id");
        }
    }
    let declared = ["x-request-id", "idempotency-key"];
    if x.request_headers.iter().any(|(n, _)| {
        let n = n.to_ascii_lowercase();
        !BORING_HEADERS.contains(&n.as_str()) && !declared.contains(&n.as_str())
    }) {
        kinds.push("undeclared header");
    }
    kinds
}

/// A bad input's identity: what was sent, less what every request carries.
fn signature(x: &Exchange) -> String {
    let mut headers: Vec<String> = x
        .request_headers
        .iter()
        .filter(|(n, _)| !BORING_HEADERS.contains(&n.to_ascii_lowercase().as_str()))
        .map(|(n, v)| format!("{}={v}", n.to_ascii_lowercase()))
        .collect();
    headers.sort();
    format!("{} {} {}", x.method, x.url, headers.join("\n"))
}

/// What the recordings show, and every way they break a rule.
#[derive(Default)]
struct Findings {
    requests: usize,
    by_status: BTreeMap<u16, usize>,
    bad_inputs: HashSet<String>,
    bad_kinds: BTreeMap<&'static str, HashSet<String>>,
    data_ok: usize,
    acknowledged: Vec<String>,
    replays: usize,
    problems: BTreeMap<String, Vec<String>>,
}

impl Findings {
    fn problem(&mut self, rule: &str, x: &Exchange, detail: impl Into<String>) {
        let list = self.problems.entry(rule.to_string()).or_default();
        list.push(format!("{} {}", x.short(), detail.into()));
    }

    fn read(&mut self, exchanges: &[Exchange]) {
        // Idempotency key -> the write ids of its first 200.
        let mut keyed: HashMap<String, Vec<String>> = HashMap::new();
        for x in exchanges {
            self.requests += 1;
            *self.by_status.entry(x.status).or_default() += 1;
            let kinds = bad_input_kinds(x);
            if !kinds.is_empty() {
                let sig = signature(x);
                for k in &kinds {
                    self.bad_kinds.entry(k).or_default().insert(sig.clone());
                }
                self.bad_inputs.insert(sig);
            }
            self.check(x, &kinds);
            if x.method == "GET" && x.path == "/api/data" && x.status == 200 {
                self.data_ok += 1;
                let body: Value = serde_json::from_str(&x.body).unwrap_or(Value::Null);
                let ids = body["writes"].as_array().cloned().unwrap_or_default();
                if ids.len() != 5 || !ids.iter().all(is_object_id) {
                    self.problem("a 200 from /api/data has 5 write ids", x, &x.body);
                }
                let writes: Vec<String> = ids
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                if let Some(key) = x
                    .request_header("idempotency-key")
                    .and_then(idempotency_key)
                {
                    match keyed.get(key) {
                        Some(first) => {
                            self.replays += 1;
                            if *first != writes {
                                self.problem(
                                    "a replayed Idempotency-Key answers the first request's write ids",
                                    x,
                                    format!("first {first:?}, now {writes:?}"),
                                );
                            }
                        }
                        None => {
                            keyed.insert(key.to_string(), writes.clone());
                        }
                    }
                }
                self.acknowledged.extend(writes);
            }
        }
    }

    /// The rules of the contract that a response schema cannot state.
    fn check(&mut self, x: &Exchange, kinds: &[&str]) {
        if x.status >= 500 && x.status != 503 {
            self.problem("no 5xx but the documented 503", x, "");
        }
        if x.status == 0 {
            self.problem("every request is answered", x, "no response");
        }
        if x.answered_by_hyper() {
            return;
        }
        // The request's id, echoed or made.
        match x.response_header("x-request-id") {
            None => self.problem("every answer carries X-Request-Id", x, "none"),
            Some(got) => {
                let sent = x.request_header("x-request-id").map(field_value);
                match sent {
                    Some(sent) if usable_request_id(sent) => {
                        if got != sent {
                            self.problem(
                                "a usable X-Request-Id is echoed",
                                x,
                                format!("sent {sent:?}, got {got:?}"),
                            );
                        }
                    }
                    _ => {
                        if !is_generated_id(got) {
                            self.problem(
                                "sluice makes a 32-hex X-Request-Id when none is usable",
                                x,
                                format!("got {got:?}"),
                            );
                        }
                    }
                }
            }
        }
        // Every error body sluice writes is JSON with a message (HEAD answers have none).
        if x.status >= 400 && x.method != "HEAD" {
            let body: Value = serde_json::from_str(&x.body).unwrap_or(Value::Null);
            let not_ready = x.path.starts_with("/readyz") && body["status"] == "not ready";
            if !not_ready && (body["status"] != "error" || !body["message"].is_string()) {
                self.problem(
                    "every error body is JSON with a message",
                    x,
                    format!("{:?}", x.body),
                );
            }
        }
        // Each kind of bad input gets its own answer (a longer URI's 414 comes first).
        let expected = if x.status == 414 {
            None
        } else if kinds.contains(&"unknown path") {
            Some(("an unknown path gets 404", 404))
        } else if kinds.contains(&"method not allowed") {
            Some(("a method the path lacks gets 405", 405))
        } else if kinds.contains(&"malformed Idempotency-Key") && x.path == "/api/data" {
            Some(("a malformed Idempotency-Key gets 400", 400))
        } else {
            None
        };
        if let Some((rule, status)) = expected {
            if x.status != status {
                self.problem(rule, x, format!("(expected {status})"));
            }
        }
        if x.status == 405 {
            let want = if x.path == "/api/data" {
                "GET"
            } else {
                "GET, HEAD"
            };
            if x.response_header("allow") != Some(want) {
                self.problem(
                    &format!("405 on {} says Allow: {want}", x.path),
                    x,
                    format!("got {:?}", x.response_header("allow")),
                );
            }
        }
    }

    fn report(&self) -> String {
        let mut out = format!(
            "requests sent: {}\nby status: {:?}\ndistinct bad inputs: {}\n",
            self.requests,
            self.by_status,
            self.bad_inputs.len()
        );
        for (kind, sigs) in &self.bad_kinds {
            out += &format!("  {kind}: {}\n", sigs.len());
        }
        out += &format!(
            "GET /api/data 200s: {} ({} write ids, {} idempotent replays)\n",
            self.data_ok,
            self.acknowledged.len(),
            self.replays
        );
        out
    }

    fn problems_text(&self) -> String {
        let mut out = String::new();
        for (rule, cases) in &self.problems {
            out += &format!("rule broken ({}×): {rule}\n", cases.len());
            for c in cases.iter().take(3) {
                out += &format!("    e.g. {c}\n");
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// The hostile supplement
// ---------------------------------------------------------------------------------------

/// The committed document plus what a careless or hostile client adds: paths sluice does
/// not have, arbitrary query parameters and headers sluice ignores (forwarding, cookies,
/// caching, ranges, `Expect`) with any value on every operation, and TRACE on every
/// route. The answers documented for the real operations are not touched.
fn hostile_document(doc: &Value) -> Value {
    let mut doc = doc.clone();
    let any_query = json!({
        "name": "anything",
        "in": "query",
        "required": false,
        "description": "Test only: any query parameters, which sluice ignores.",
        "style": "form",
        "explode": true,
        "schema": {"type": "object", "additionalProperties": {"type": "string"}}
    });
    // Headers a careless or hostile client sends, with any value schemathesis makes up:
    // sluice must ignore them (proxies' forwarding headers, cookies, caching and
    // content negotiation it does not do).
    let any_headers: Vec<Value> = [
        "X-Forwarded-For",
        "Forwarded",
        "Cookie",
        "If-None-Match",
        "Range",
        "Expect",
    ]
    .iter()
    .map(|name| {
        json!({"name": name, "in": "header", "required": false,
               "description": "Test only: a header sluice ignores.", "schema": {"type": "string"}})
    })
    .collect();
    let paths = doc["paths"].as_object_mut().unwrap();
    for item in paths.values_mut() {
        let item = item.as_object_mut().unwrap();
        // TRACE, which no route allows: the same 405 as DELETE.
        if let Some(delete) = item.get("delete").cloned() {
            let mut trace = delete;
            let id = trace["operationId"]
                .as_str()
                .unwrap_or("")
                .replacen("delete", "trace", 1);
            trace["operationId"] = json!(id);
            item.insert("trace".into(), trace);
        }
        for op in item.values_mut() {
            if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                params.push(any_query.clone());
                params.extend(any_headers.iter().cloned());
            }
        }
    }
    let unknown = |not: &[&str]| {
        json!({
            "name": "unknown",
            "in": "path",
            "required": true,
            "schema": {"type": "string", "minLength": 1, "not": {"enum": not}}
        })
    };
    let not_found = json!({
        "404": {"$ref": "#/components/responses/NotFound"},
        "400": {"$ref": "#/components/responses/MalformedHead"},
        "414": {"$ref": "#/components/responses/UriTooLong"},
        "431": {"$ref": "#/components/responses/HeadTooLarge"}
    });
    let mut not_found_head = not_found.clone();
    not_found_head["404"] = json!({
        "description": "Unknown path. No body: this is a HEAD.",
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    });
    not_found_head["414"] = json!({"$ref": "#/components/responses/UriTooLongHead"});
    for (path, name, not) in [
        (
            "/{unknown}",
            "Root",
            &["healthz", "readyz", "metrics", "openapi.json"][..],
        ),
        ("/api/{unknown}", "Api", &["data", "stats"][..]),
        ("/api/data/{unknown}", "ApiData", &[][..]),
    ] {
        let mut item = serde_json::Map::new();
        for method in ["get", "head", "put", "post", "delete", "options", "patch"] {
            let mut params = vec![
                unknown(not),
                json!({"$ref": "#/components/parameters/X-Request-Id"}),
                any_query.clone(),
            ];
            params.extend(any_headers.iter().cloned());
            if not.is_empty() {
                params[0]["schema"].as_object_mut().unwrap().remove("not");
            }
            let responses = if method == "head" {
                not_found_head.clone()
            } else {
                not_found.clone()
            };
            item.insert(
                method.into(),
                json!({"operationId": format!("{method}Unknown{name}"),
                       "parameters": params, "responses": responses}),
            );
        }
        paths.insert(path.into(), Value::Object(item));
    }
    doc
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn the_document_is_valid_openapi_3_1() {
    let doc = document();
    assert!(
        doc["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.1"),
        "an OpenAPI 3.1 document"
    );
    for route in ROUTES {
        let item = &doc["paths"][route];
        for method in ["get", "head", "put", "post", "delete", "options", "patch"] {
            assert!(item[method].is_object(), "{method} {route} is described");
        }
    }
    assert!(
        doc["components"]["schemas"]["CacheStatus"].is_object(),
        "the status page's schema is named CacheStatus"
    );
    let dir = TempDir::new().unwrap();
    let mut cmd = Command::new(tool("openapi-spec-validator"));
    cmd.args(["--schema", "3.1"])
        .arg(crate_root().join(DOCUMENT));
    let validated = run(cmd, dir.path(), "validator", Duration::from_secs(60));
    println!("{}", validated.output.trim());
    assert!(
        validated.ok,
        "openapi-spec-validator rejects {DOCUMENT}:\n{}",
        validated.output
    );
}

/// Every object schema in the status page's shape is closed, so a field added to or
/// dropped from `cache_status` fails the fuzzing test instead of drifting silently.
#[test]
fn the_status_page_schema_is_closed() {
    fn closed(schema: &Value, at: &str, open: &mut Vec<String>) {
        match schema {
            Value::Object(map) => {
                if map.get("type") == Some(&json!("object"))
                    && map.get("additionalProperties") != Some(&json!(false))
                {
                    open.push(at.to_string());
                }
                for (k, v) in map {
                    closed(v, &format!("{at}/{k}"), open);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    closed(v, &format!("{at}/{i}"), open);
                }
            }
            _ => {}
        }
    }
    let doc = document();
    let mut open = Vec::new();
    closed(
        &doc["components"]["schemas"]["CacheStatus"],
        "CacheStatus",
        &mut open,
    );
    assert!(
        open.is_empty(),
        "objects without additionalProperties: false: {open:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sluice_serves_the_committed_document() {
    let (_redis, _mongo, sluice) = common::spawn_app(&[]).await;
    let response = reqwest::get(sluice.url("/openapi.json")).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let body = response.bytes().await.unwrap();
    assert_eq!(
        status,
        200,
        "GET /openapi.json answers the document; got {status}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert!(
        body == document_text().as_bytes(),
        "GET /openapi.json is not byte for byte {DOCUMENT}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzed_answers_conform_to_the_document() {
    let started = Instant::now();
    let version = schemathesis_version();
    let (_redis, mongo, sluice) = common::spawn_app(&[]).await;
    let dir = scratch();
    let hostile = dir.path().join("hostile.json");
    std::fs::write(
        &hostile,
        serde_json::to_string_pretty(&hostile_document(&document())).unwrap(),
    )
    .unwrap();
    let seed = seed();
    let examples = examples();
    println!("{version}; seed {seed} (SLUICE_FUZZ_SEED replays it)");

    let committed = crate_root().join(DOCUMENT);
    let base_url = sluice.url("");
    let main = Fuzz {
        label: "main",
        config: format!("{CONFIG}{OPERATIONS}"),
        document: committed,
        base_url: base_url.clone(),
        dir: dir.path().to_path_buf(),
        args: vec![
            "--phases=examples,coverage,fuzzing".into(),
            "--max-response-time=5".into(),
            format!("--max-examples={examples}"),
            format!("--seed={seed}"),
            "--workers=2".into(),
            "--continue-on-failure".into(),
        ],
    };
    let hostile_run = Fuzz {
        label: "hostile",
        config: format!("{CONFIG}{HOSTILE}{OPERATIONS}"),
        document: hostile,
        base_url,
        dir: dir.path().to_path_buf(),
        args: vec![
            "--phases=coverage,fuzzing".into(),
            "--max-response-time=5".into(),
            format!("--max-examples={}", examples.div_ceil(2)),
            format!("--seed={seed}"),
            "--workers=2".into(),
            "--continue-on-failure".into(),
        ],
    };
    let (main_har, hostile_har) = (main.har(), hostile_run.har());
    let (main_run, hostile_run) =
        tokio::task::spawn_blocking(move || (main.run(), hostile_run.run()))
            .await
            .unwrap();

    let mut findings = Findings::default();
    findings.read(&read_har(&main_har));
    let main_requests = findings.requests;
    findings.read(&read_har(&hostile_har));
    let stored = mongo.stored_ids().await;
    let lost: Vec<&String> = findings
        .acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();

    println!(
        "--- schemathesis, committed document ({:.1?}) ---",
        main_run.took
    );
    println!("{}", tail(&main_run.output, 150));
    println!(
        "--- schemathesis, hostile supplement ({:.1?}) ---",
        hostile_run.took
    );
    println!("{}", tail(&hostile_run.output, 80));
    println!("--- counts ---");
    print!("{}", findings.report());
    println!(
        "  of which {main_requests} from the committed document, {} from the hostile supplement",
        findings.requests - main_requests
    );
    println!(
        "acknowledged writes checked: {} ({} stored, {} missing)",
        findings.acknowledged.len(),
        findings.acknowledged.len() - lost.len(),
        lost.len()
    );
    let problems = findings.problems_text();
    if !problems.is_empty() {
        println!("--- rules broken, from the recordings ---\n{problems}");
    }
    println!("took {:.1?} in all", started.elapsed());

    // Not vacuous: the fuzzer reached sluice, bad inputs among them, and stored data.
    assert!(
        main_requests >= 200,
        "only {main_requests} requests were recorded"
    );
    assert!(
        findings.bad_inputs.len() >= 50,
        "only {} distinct bad inputs were sent",
        findings.bad_inputs.len()
    );
    assert!(findings.data_ok > 0, "no GET /api/data was answered 200");
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged write ids are not stored, e.g. {:?}",
        lost.len(),
        findings.acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
    let alive = reqwest::get(sluice.url("/healthz"))
        .await
        .is_ok_and(|r| r.status() == 200);
    assert!(
        alive,
        "sluice does not answer /healthz after the fuzzing:\n{}",
        tail(&sluice.log(), 40)
    );
    assert!(
        main_run.ok && hostile_run.ok && findings.problems.is_empty(),
        "sluice's answers do not conform to {DOCUMENT}: see schemathesis's report and \
         the broken rules above\n{problems}"
    );
}

/// The drift check: the same conformance check, against the same sluice, passes with the
/// committed document and fails with one response field changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_drifted_document_fails_the_conformance_check() {
    let (_redis, _mongo, sluice) = common::spawn_app(&[]).await;
    let dir = scratch();
    let mut drifted = document();
    let status = &mut drifted["components"]["schemas"]["Data"]["properties"]["status"];
    assert_eq!(*status, json!({"enum": ["success"]}), "the field to drift");
    *status = json!({"enum": ["ok"]});
    let drifted_path = dir.path().join("drifted.json");
    std::fs::write(&drifted_path, serde_json::to_vec_pretty(&drifted).unwrap()).unwrap();
    let committed = crate_root().join(DOCUMENT);

    let args = vec![
        "--include-path=/api/data".to_string(),
        "--include-method=GET".into(),
        "--checks=response_schema_conformance".into(),
        "--phases=examples,fuzzing".into(),
        "--mode=positive".into(),
        "--max-examples=5".into(),
        "--seed=1".into(),
        "--workers=1".into(),
    ];
    let base_url = sluice.url("");
    let dir_path = dir.path().to_path_buf();
    let (control, drift) = tokio::task::spawn_blocking(move || {
        let control = Fuzz {
            label: "control",
            config: format!("{CONFIG}{OPERATIONS}"),
            document: committed,
            base_url: base_url.clone(),
            dir: dir_path.clone(),
            args: args.clone(),
        };
        let drift = Fuzz {
            label: "drift",
            config: format!("{CONFIG}{OPERATIONS}"),
            document: drifted_path,
            base_url,
            dir: dir_path,
            args,
        };
        (control.run(), drift.run())
    })
    .await
    .unwrap();
    println!("--- committed document ---\n{}", tail(&control.output, 40));
    println!("--- drifted document ---\n{}", tail(&drift.output, 60));
    assert!(
        control.ok,
        "the committed document must pass this check for the drift test to mean anything"
    );
    assert!(
        !drift.ok,
        "a document whose /api/data 200 says status \"ok\" passed the conformance check"
    );
    assert!(
        drift.output.contains("Response violates schema")
            && drift
                .output
                .contains("/components/schemas/Data/properties/status"),
        "the drifted run failed, but not on the drifted field"
    );
}

/// The document's `CacheStatus` is the serde type's shape: every field the type writes
/// is a required property of the schema and nothing else is, at every level, and what a
/// running sluice answers reads back as the type.
#[tokio::test(flavor = "multi_thread")]
async fn the_status_schema_is_the_status_type() {
    fn compare(value: &Value, schema: &Value, at: &str, problems: &mut Vec<String>) {
        let schema = schema
            .get("anyOf")
            .and_then(|alts| alts.as_array())
            .and_then(|alts| alts.iter().find(|a| a.get("properties").is_some()))
            .unwrap_or(schema);
        let (Some(fields), Some(props)) = (value.as_object(), schema.get("properties")) else {
            return;
        };
        let props = props.as_object().unwrap();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for name in fields.keys() {
            if !props.contains_key(name) {
                problems.push(format!("{at}.{name} is not in the schema"));
            }
            if !required.contains(&name.as_str()) {
                problems.push(format!("{at}.{name} is not required by the schema"));
            }
        }
        for name in props.keys() {
            match fields.get(name) {
                Some(v) => compare(v, &props[name], &format!("{at}.{name}"), problems),
                None => problems.push(format!("{at}.{name} is in the schema, not the type")),
            }
        }
    }
    let (_redis, _mongo, sluice) = common::spawn_app(&[]).await;
    // Two requests: the second reads the first's documents, so L1 holds a value (a
    // nested object) to compare.
    let client = common::client();
    for _ in 0..2 {
        let answer = common::get(&client, &sluice.url("/api/data")).await;
        assert_eq!(answer.status, 200);
    }
    let answered = sluice.status().await;
    let status: sluice::status::Status =
        serde_json::from_value(answered).expect("the status page reads back as Status");
    assert!(status.l1.value.is_some());
    let mut problems = Vec::new();
    compare(
        &serde_json::to_value(&status).unwrap(),
        &document()["components"]["schemas"]["CacheStatus"],
        "CacheStatus",
        &mut problems,
    );
    assert!(problems.is_empty(), "{problems:#?}");
}
