//! What the probes ask of this pod: whether the database answers, whether Redis does,
//! whether it is draining. `/readyz` reports the first two; `/readyz/pod` asks only the
//! last (the readinessProbe must not take every pod out when the shared database stalls).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::shared::Shared;
use crate::store::Store;

/// What the probes ask: is the database answering, is Redis, is the pod draining.
pub struct Health {
    pub(crate) store: Arc<Store>,
    pub(crate) shared: Arc<Shared>,
    draining: AtomicBool,
}

impl Health {
    pub fn new(store: Arc<Store>, shared: Arc<Shared>) -> Self {
        Health {
            store,
            shared,
            draining: AtomicBool::new(false),
        }
    }

    /// `Ok` when the pod should get traffic, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.is_draining() {
            Err("draining for shutdown")
        } else if !self.store.is_healthy() {
            Err("mongodb is not answering")
        } else {
            Ok(())
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether `/api/data` can hope to store anything now.
    pub fn database_up(&self) -> bool {
        self.store.is_healthy()
    }

    pub fn redis_up(&self) -> bool {
        self.shared.is_connected()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}
