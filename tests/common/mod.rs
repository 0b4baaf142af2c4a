//! The test harness: real servers on free ports, never mocks, split by concern:
//! `servers` (Redis, the MongoDB-wire server), `sluice` (in-process or the binary) and
//! `load` (clients and the nothing-lost check).

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod load;
pub mod servers;
pub mod sluice;

pub use load::*;
pub use servers::*;
pub use sluice::*;
