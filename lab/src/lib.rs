//! The local lab: what `lab/setup-local.sh` and `bench-report/` ask of Rust, and what it
//! plays of Kubernetes. The shell scripts start the servers, mount disks and write
//! cgroups; the replicas' lifecycle and everything that measures, decides or judges is
//! here.
//!
//! ```text
//! cargo run --release -p sluice-lab -- <subcommand>
//! ```
//!
//! The modules follow the data: `util`; what the lab reads (`database`, `k8s`, `k6`,
//! `procs`, `procfs`); what runs during a load (`replica`, `autoscaler`, `conductor` with
//! its `chaos`); what judges it afterwards (`report`, `load_report`); the two
//! measurements of their own (`ceiling`, `cost`); and the checks of the manifests that no
//! schema makes (`sizing`: memory against the formula and the nodes; `manifests`: k8s/app
//! against itself and the rest, the NetworkPolicies connection by connection, Redis'
//! password), which read them through `k8s` like everything else. `db_args` is shared
//! with the service's tests. The binary `lab` (main.rs) is the subcommands over these;
//! `lab/tests/` holds the deployment's contract tests, which read the manifests through
//! `k8s`.

pub mod autoscaler;
pub mod ceiling;
pub mod conductor;
pub mod cost;
pub mod database;
pub mod db_args;
pub mod k6;
pub mod k8s;
pub mod load_report;
pub mod manifests;
pub mod procfs;
pub mod procs;
pub mod replica;
pub mod report;
pub mod sizing;
pub mod state;
pub mod util;
