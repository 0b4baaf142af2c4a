//! The counters behind both `/metrics` and `/api/cache/status`.
//!
//! One registry per [`App`](crate::startup::App), no globals, so a test or benchmark can
//! build several apps in one process. The status page reads the same counters that
//! Prometheus scrapes, so the two can never disagree.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by route and status code.
    pub http_requests: IntCounterVec,
    /// Latency by route and status code.
    pub http_duration: HistogramVec,
    /// Requests refused to protect the service: queue full, database down, connection cap.
    pub shed: IntCounterVec,
    /// Read cache lookups by tier (`l1`, `l2`).
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub cache_errors: IntCounterVec,
    /// Read refreshes by outcome (`database`, `shared`, `error`).
    pub refreshes: IntCounterVec,
    /// MongoDB commands by operation and outcome.
    pub db_commands: IntCounterVec,
    pub queue_depth: IntGauge,
    pub batch_documents: Histogram,
    pub flush_seconds: Histogram,
    pub documents_stored: IntCounter,
    pub write_retries: IntCounter,
    /// Requests answered 503 because their documents could not be stored in time.
    pub write_failures: IntCounter,
    /// This pod's share of the cluster budget, in commands per second.
    pub budget_share: Gauge,
    /// Commands this pod sent during the last whole second.
    pub budget_used: IntGauge,
    pub live_pods: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
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
        let budget_share = Gauge::new(
            "sluice_budget_share_commands_per_second",
            "This pod's share of the cluster's MongoDB command budget",
        )
        .expect("valid metric");
        registry
            .register(Box::new(budget_share.clone()))
            .expect("unique metric");

        let metrics = Metrics {
            http_requests: counter_vec(
                "sluice_http_requests_total",
                "HTTP requests",
                &["route", "status"],
            ),
            http_duration,
            shed: counter_vec(
                "sluice_shed_total",
                "Requests refused to protect the service",
                &["reason"],
            ),
            cache_hits: counter_vec("sluice_cache_hits_total", "Read cache hits", &["tier"]),
            cache_misses: counter_vec("sluice_cache_misses_total", "Read cache misses", &["tier"]),
            cache_errors: counter_vec(
                "sluice_cache_errors_total",
                "Read cache tier errors",
                &["tier"],
            ),
            refreshes: counter_vec(
                "sluice_cache_refreshes_total",
                "Read refreshes by where the value came from",
                &["source"],
            ),
            db_commands: counter_vec(
                "sluice_db_commands_total",
                "MongoDB commands sent",
                &["op", "outcome"],
            ),
            queue_depth: int_gauge(
                "sluice_writer_queue_depth",
                "Requests waiting in the write queue",
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
            write_failures: counter(
                "sluice_writer_failed_requests_total",
                "Requests whose documents could not be stored before their deadline",
            ),
            budget_share,
            budget_used: int_gauge(
                "sluice_budget_used_commands_last_second",
                "MongoDB commands this pod sent during the last whole second",
            ),
            live_pods: int_gauge("sluice_live_pods", "Pods sharing the command budget"),
            registry,
        };
        // Known label values start at zero, so dashboards and rate() see them from the
        // first scrape rather than from the first incident.
        for reason in ["queue_full", "database", "shutting_down", "connections"] {
            metrics.shed.with_label_values(&[reason]);
        }
        for tier in ["l1", "l2"] {
            metrics.cache_hits.with_label_values(&[tier]);
            metrics.cache_misses.with_label_values(&[tier]);
            metrics.cache_errors.with_label_values(&[tier]);
        }
        for source in ["database", "shared", "error"] {
            metrics.refreshes.with_label_values(&[source]);
        }
        metrics
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
