//! sluice keeps an HTTP API fast in front of one MongoDB node whose disk does about 100
//! I/O operations a second.
//!
//! The data flow, one module each:
//!
//! ```text
//! request → server → http ─┬─ reads:  L1 moka → shared (L2 Redis) → store (MongoDB)
//!                          └─ writes: channel → flusher (batch) → sink → store (insert_many)
//!                                     every store command pays a budget token
//! ```
//!
//! `app` holds the handles the handlers get; `startup` builds it and owns shutdown;
//! `config` is the only place settings come from, `secret` keeps the URLs' credentials
//! out of logs, `status` is the status page's shape, `operator` the admin subcommands.

pub mod app;
pub mod background;
pub mod budget;
pub mod claims;
pub mod config;
pub mod health;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod reads;
pub mod record;
pub mod secret;
pub mod server;
pub mod shared;
pub mod startup;
pub mod stats;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod writes;
