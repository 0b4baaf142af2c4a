//! The counters behind both `/metrics` and `/api/cache/status`.
//!
//! One registry per [`App`](crate::app::App), no globals, so a test or benchmark can
//! build several apps in one process. The status page reads the same counters that
//! Prometheus scrapes, so the two can never disagree.
//!
//! Label values are enums ([`Tier`], [`ShedReason`], ...), never strings at the call
//! site: a typo cannot quietly start a new series, and every value exists (at zero) from
//! the first scrape rather than from the first incident. A family with one enum label
//! keeps one counter per value, so counting costs no label lookup on the request path.

use std::marker::PhantomData;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A closed set of label values.
pub trait Label: Copy + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    fn index(self) -> usize;
}

macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }
        impl Label for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

labels!(
    /// A read cache tier.
    Tier { L1 => "l1", L2 => "l2" }
);
labels!(
    /// Why a request or connection was refused to protect the service.
    ShedReason {
        QueueFull => "queue_full",
        Database => "database",
        ShuttingDown => "shutting_down",
        Connections => "connections",
    }
);
labels!(
    /// Where a refreshed read came from.
    RefreshSource { Database => "database", Shared => "shared", Error => "error" }
);
labels!(
    /// A MongoDB command sluice sends. Each one sent costs one budget token.
    DbOp {
        Insert => "insert",
        Find => "find",
        Count => "count",
        Ping => "ping",
        BuildInfo => "buildInfo",
    }
);
labels!(
    /// Where the database budget's tokens come from.
    BudgetMode { Cluster => "cluster", Fallback => "fallback", Local => "local" }
);
labels!(
    /// How a MongoDB command ended. `duplicate`: every document an insert was refused was
    /// stored already (a retry, or a replayed Idempotency-Key), proof of storage and not
    /// an error.
    DbOutcome {
        Ok => "ok",
        Duplicate => "duplicate",
        Error => "error",
        Unavailable => "unavailable",
    }
);

/// A metric family with one enum label, one metric per value.
pub struct Family<L: Label, M> {
    by_value: Vec<M>,
    label: PhantomData<L>,
}

/// Counters by an enum label.
pub type Counters<L> = Family<L, IntCounter>;
/// Gauges by an enum label (a state: the one in force is 1, the others 0).
pub type Gauges<L> = Family<L, IntGauge>;

impl<L: Label, M> Family<L, M> {
    fn of<B>(registry: &Registry, family: prometheus::core::MetricVec<B>) -> Self
    where
        B: prometheus::core::MetricVecBuilder<M = M> + 'static,
    {
        registry
            .register(Box::new(family.clone()))
            .expect("unique metric");
        Family {
            by_value: L::ALL
                .iter()
                .map(|l| family.with_label_values(&[l.as_str()]))
                .collect(),
            label: PhantomData,
        }
    }

    pub fn get(&self, label: L) -> &M {
        &self.by_value[label.index()]
    }
}

impl<L: Label> Counters<L> {
    fn register(registry: &Registry, name: &str, help: &str, label: &str) -> Self {
        let family = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        Family::of(registry, family)
    }
}

impl<L: Label> Gauges<L> {
    fn register(registry: &Registry, name: &str, help: &str, label: &str) -> Self {
        let family = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        Family::of(registry, family)
    }
}

pub struct Metrics {
    registry: Registry,
    /// Requests by route and status code.
    pub http_requests: IntCounterVec,
    /// Latency by route and status code.
    pub http_duration: HistogramVec,
    /// Requests refused to protect the service.
    pub shed: Counters<ShedReason>,
    /// Connections past `MAX_CONNECTIONS` that waited for a slot: served if one freed,
    /// else also counted in `shed` (`connections`).
    pub connection_waits: IntCounter,
    pub cache_hits: Counters<Tier>,
    pub cache_misses: Counters<Tier>,
    pub cache_errors: Counters<Tier>,
    pub refreshes: Counters<RefreshSource>,
    /// MongoDB commands by operation and outcome.
    db_commands: IntCounterVec,
    /// 1 while MongoDB answers commands, else 0.
    pub db_up: IntGauge,
    pub queue_depth: IntGauge,
    pub queue_capacity: IntGauge,
    pub batch_documents: Histogram,
    pub flush_seconds: Histogram,
    pub documents_stored: IntCounter,
    pub write_retries: IntCounter,
    /// Requests answered 503 because their documents could not be stored in time.
    pub write_failures: IntCounter,
    /// MongoDB commands sent, by operation, counted as they leave (not when answered).
    pub db_commands_sent: Counters<DbOp>,
    /// `DB_COMMAND_BUDGET`: commands per second the whole cluster may send.
    pub db_command_budget: IntGauge,
    /// Commands sent and not yet answered (a stalled database runs them when it resumes).
    pub db_commands_in_flight: IntGauge,
    pub db_commands_in_flight_cap: IntGauge,
    /// Where the budget's tokens come from now: 1 for the mode in force.
    pub budget_mode: Gauges<BudgetMode>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };

        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_http_request_duration_seconds",
                "HTTP request latency",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
            ]),
            &["route", "status"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_duration.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "sluice_build_info",
                "The running sluice's version; always 1",
            ),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // CPU, memory, open files and start time, as every Prometheus client exposes them.
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");

        let db_commands = counter_vec(
            "sluice_db_commands_total",
            "MongoDB commands sent, by operation and outcome",
            &["op", "outcome"],
        );
        for op in DbOp::ALL {
            for outcome in DbOutcome::ALL {
                db_commands.with_label_values(&[op.as_str(), outcome.as_str()]);
            }
        }

        Metrics {
            http_requests: counter_vec(
                "sluice_http_requests_total",
                "HTTP requests",
                &["route", "status"],
            ),
            http_duration,
            shed: Counters::register(
                &registry,
                "sluice_shed_total",
                "Requests refused to protect the service",
                "reason",
            ),
            cache_hits: Counters::register(
                &registry,
                "sluice_cache_hits_total",
                "Read cache hits",
                "tier",
            ),
            cache_misses: Counters::register(
                &registry,
                "sluice_cache_misses_total",
                "Read cache misses",
                "tier",
            ),
            cache_errors: Counters::register(
                &registry,
                "sluice_cache_errors_total",
                "Read cache tier errors",
                "tier",
            ),
            refreshes: Counters::register(
                &registry,
                "sluice_cache_refreshes_total",
                "Read refreshes by where the value came from",
                "source",
            ),
            db_commands,
            db_up: int_gauge("sluice_db_up", "1 while MongoDB answers commands, else 0"),
            queue_depth: int_gauge(
                "sluice_writer_queue_depth",
                "Requests waiting in the write queue",
            ),
            queue_capacity: int_gauge(
                "sluice_writer_queue_capacity",
                "Requests the write queue holds at most",
            ),
            batch_documents: histogram(
                "sluice_writer_batch_documents",
                "Documents per insert command",
                vec![
                    5.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                ],
            ),
            flush_seconds: histogram(
                "sluice_writer_flush_seconds",
                "Time from sending a batch to its acknowledgement, retries included",
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            documents_stored: counter(
                "sluice_writer_documents_stored_total",
                "Documents acknowledged by MongoDB",
            ),
            write_retries: counter("sluice_writer_retries_total", "Insert commands retried"),
            connection_waits: counter(
                "sluice_connection_waits_total",
                "Connections past MAX_CONNECTIONS that waited for a slot (refused ones are in sluice_shed_total too)",
            ),
            write_failures: counter(
                "sluice_writer_failed_requests_total",
                "Requests whose documents could not be stored before their deadline",
            ),
            db_commands_sent: Counters::register(
                &registry,
                "sluice_db_commands_sent_total",
                "MongoDB commands sent, by operation, counted as they leave",
                "op",
            ),
            db_command_budget: int_gauge(
                "sluice_db_command_budget",
                "DB_COMMAND_BUDGET: MongoDB commands per second the whole cluster may send",
            ),
            db_commands_in_flight: int_gauge(
                "sluice_db_commands_in_flight",
                "MongoDB commands this pod sent that are not answered yet",
            ),
            db_commands_in_flight_cap: int_gauge(
                "sluice_db_commands_in_flight_cap",
                "MongoDB commands this pod may have sent and not yet seen answered",
            ),
            budget_mode: Gauges::register(
                &registry,
                "sluice_budget_mode",
                "Where the budget's tokens come from: cluster (Redis), fallback (Redis unreachable) or local; 1 for the mode in force",
                "mode",
            ),
            registry,
        }
    }

    pub fn db_command(&self, op: DbOp, outcome: DbOutcome) {
        self.db_commands
            .with_label_values(&[op.as_str(), outcome.as_str()])
            .inc();
    }

    /// `/api/data` answers so far: (200s, any other status). Logged at shutdown, so a
    /// drain can be checked against what its clients saw.
    pub fn data_answers(&self) -> (u64, u64) {
        use prometheus::core::Collector;
        let mut counts = (0, 0);
        for family in self.http_requests.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                };
                if label("route").as_deref() != Some("/api/data") {
                    continue;
                }
                let n = m.get_counter().get_value() as u64;
                if label("status").as_deref() == Some("200") {
                    counts.0 += n;
                } else {
                    counts.1 += n;
                }
            }
        }
        counts
    }

    /// The names of every metric family this registry exposes.
    pub fn family_names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        // Families labelled by route and status have no series before the first request,
        // so gathering alone would miss them.
        let unseeded = self
            .http_requests
            .desc()
            .into_iter()
            .chain(self.http_duration.desc())
            .map(|d| d.fq_name.clone());
        self.registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .chain(unseeded)
            .collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_value_is_exposed_from_the_start() {
        let metrics = Metrics::new();
        let text = String::from_utf8(metrics.render()).unwrap();
        for reason in ShedReason::ALL {
            let series = format!("sluice_shed_total{{reason=\"{}\"}} 0", reason.as_str());
            assert!(text.contains(&series), "{series} missing");
        }
        assert!(text.contains("sluice_db_commands_total{op=\"insert\",outcome=\"ok\"} 0"));
        assert!(text.contains("sluice_build_info{version="));
        metrics.cache_hits.get(Tier::L2).inc();
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(text.contains("sluice_cache_hits_total{tier=\"l2\"} 1"));
    }
}
