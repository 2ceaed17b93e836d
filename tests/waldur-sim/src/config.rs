//! Start-up configuration of a simulated Waldur.

use std::time::Duration;

/// The tenant every default simulator has, so scripts and examples can hard-code it.
pub const DEFAULT_TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";

/// Which state labels the server speaks. Real servers changed vocabulary around March 2025,
/// and clients must cope with both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Vocabulary {
    /// `CREATION_SCHEDULED`, `CREATING`, ..., `OK`, `ERRED` (servers from about March 2025).
    #[default]
    Modern,
    /// `Creation Scheduled`, `Creating`, ..., `OK`, `Erred` (older servers).
    Legacy,
}

/// How long the background workers take for each asynchronous operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delays {
    /// Time spent in the `*_SCHEDULED` state before the worker starts.
    pub schedule: Duration,
    /// Time spent in the running state (`CREATING`, `UPDATING`, `DELETING`).
    pub run: Duration,
}

impl Delays {
    /// Short delays for tests: 20 ms scheduled, 20 ms running.
    pub fn fast() -> Self {
        Self {
            schedule: Duration::from_millis(20),
            run: Duration::from_millis(20),
        }
    }
}

impl Default for Delays {
    /// About what a real Waldur takes: the Celery worker picks the task up after ~2 s.
    fn default() -> Self {
        Self {
            schedule: Duration::from_secs(2),
            run: Duration::from_secs(2),
        }
    }
}

/// Everything a simulator is started with. Faults and tenants can also change at run time.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// State labels spoken by the server.
    pub vocabulary: Vocabulary,
    /// Pre-8.0.4 mode: only the `affinity` policy (or an empty one) is accepted.
    pub affinity_only: bool,
    /// Pre-8.0.0 mode: `set_ok` and `set_erred` do not exist (404).
    pub pre_8_0_0: bool,
    /// Background worker timing.
    pub delays: Delays,
    /// Token of a staff user: sees everything, may unlink / set_ok / set_erred.
    pub staff_token: String,
    /// Token of an ordinary user: sees only `user_tenants`.
    pub user_token: String,
    /// Tenant UUIDs (dashed or not) that exist at start, all in state OK.
    pub tenants: Vec<String>,
    /// Tenants visible to `user_token`. Empty means every tenant, including tenants added later.
    pub user_tenants: Vec<String>,
    /// Period of Waldur's own tenant re-sync (every 2 hours on real servers); `None` = only on demand.
    pub resync_interval: Option<Duration>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            vocabulary: Vocabulary::Modern,
            affinity_only: false,
            pre_8_0_0: false,
            delays: Delays::default(),
            staff_token: "staff-token".to_string(),
            user_token: "user-token".to_string(),
            tenants: vec![DEFAULT_TENANT.to_string()],
            user_tenants: Vec::new(),
            resync_interval: None,
        }
    }
}
