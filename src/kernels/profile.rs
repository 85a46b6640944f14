//! Opt-in wall-clock timing of the inference path by operation, for
//! `beitv2 bench --profile`. Off by default: a disabled scope costs one atomic
//! load.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, OpTotal>> = Mutex::new(BTreeMap::new());

/// Accumulated time and work of one operation kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTotal {
    pub seconds: f64,
    pub calls: u64,
    /// Floating-point operations (multiply and add counted separately), when known.
    pub flops: f64,
}

/// Turns recording on or off and clears what was recorded.
pub fn enable(on: bool) {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ENABLED.store(on, Ordering::Relaxed);
}

/// Everything recorded since [`enable`].
pub fn snapshot() -> BTreeMap<&'static str, OpTotal> {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Times the enclosing scope under `name` when profiling is on.
pub struct Scope {
    start: Option<(Instant, &'static str, f64)>,
}

/// Starts a scope; `flops` is the work done inside it (0 when not meaningful).
pub fn scope(name: &'static str, flops: f64) -> Scope {
    Scope {
        start: ENABLED
            .load(Ordering::Relaxed)
            .then(|| (Instant::now(), name, flops)),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((t, name, flops)) = self.start.take() {
            let secs = t.elapsed().as_secs_f64();
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let e = totals.entry(name).or_default();
            e.seconds += secs;
            e.calls += 1;
            e.flops += flops;
        }
    }
}
