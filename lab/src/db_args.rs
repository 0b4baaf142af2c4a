//! The MongoDB-wire server's command line, in one place for the lab (`lab db-args`, which
//! lab/setup-local.sh runs the database with) and the tests (tests/common/servers.rs
//! includes this file): real `mongod` with the assessment's flags, as
//! k8s/mongodb/deployment.yaml passes them, or secantusd-rs with the same mapped.

use std::ffi::OsString;
use std::path::Path;

/// Whether `bin` is real mongod; anything else is taken for secantusd-rs.
pub fn is_mongod(bin: &Path) -> bool {
    bin.file_name().is_some_and(|n| n == "mongod")
}

/// The arguments for `bin` to listen on 127.0.0.1:`port` with its files in `dbpath`,
/// under the assessment's constraints: a 0.25 GB cache and 10 concurrent write (and, on
/// mongod, read) transactions. For secantusd-rs this writes an empty
/// `scratch/secantusd.toml` and points `--config` at it: without `--config` it reads the
/// first secantusd.toml it finds (./, ~/.secantus/, /etc/secantus/), which could change
/// any of these.
pub fn db_args(
    bin: &Path,
    port: u16,
    dbpath: &Path,
    scratch: &Path,
) -> std::io::Result<Vec<OsString>> {
    let port = port.to_string();
    let mut args: Vec<OsString> = if is_mongod(bin) {
        [
            "--port",
            &port,
            "--bind_ip",
            "127.0.0.1",
            "--wiredTigerCacheSizeGB",
            "0.25",
            "--setParameter",
            "wiredTigerConcurrentReadTransactions=10",
            "--setParameter",
            "wiredTigerConcurrentWriteTransactions=10",
            "--dbpath",
        ]
        .map(OsString::from)
        .into()
    } else {
        let config = scratch.join("secantusd.toml");
        std::fs::write(&config, "")?;
        let mut a: Vec<OsString> = vec!["--config".into(), config.into()];
        a.extend(
            [
                "--port",
                &port,
                "--host",
                "127.0.0.1",
                // Drivers see a standalone server, as they do a mongod without --replSet.
                "--standalone",
                "--cache-size",
                "256M",
                // Write tickets only: secantusd-rs has no flag for concurrent reads.
                "--write-tickets",
                "10",
                // A journaled write (j: true, as sluice writes) waits for an fsync of the
                // log, as on mongod; without it secantusd-rs acknowledges before the disk.
                "--sync-on-commit",
                "--storage-path",
            ]
            .map(OsString::from),
        );
        a
    };
    args.push(dbpath.into());
    Ok(args)
}
