//! sluice keeps an HTTP API fast in front of one MongoDB node whose disk does about 100
//! I/O operations a second.
//!
//! The data flow, one module each:
//!
//! ```text
//! request → server → http ─┬─ reads:  L1 moka → shared (L2 Redis) → store (MongoDB)
//!                          └─ writes: channel → batch → store (insert_many)
//!                                     every store command pays a budget token
//! ```
//!
//! `startup` wires it together and owns shutdown; `config` is the only place settings
//! come from.

pub mod budget;
pub mod config;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod reads;
pub mod record;
pub mod server;
pub mod shared;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod writes;
