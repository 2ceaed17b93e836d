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

/// Which release of Waldur the simulator copies, where releases differ in more than one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaldurVersion {
    /// A current server (8.0.x and later): what the flags `vocabulary`, `affinity_only` and
    /// `pre_8_0_0` say, `set_ok`/`set_erred` present unless `pre_8_0_0`, descriptions up to 4096
    /// characters, `PUT`/`PATCH` 405.
    #[default]
    Current,
    /// A 7.0.x server, as measured on 7.0.7: the old state labels ("Creation Scheduled", "Erred",
    /// ...), only the `affinity` policy, no `set_ok`/`set_erred` routes (HTML 404), descriptions
    /// up to 2000 characters, and `PUT`/`PATCH` answered with a 500 HTML page. It overrides
    /// `vocabulary`, `affinity_only` and `pre_8_0_0`.
    V7_0,
}

impl WaldurVersion {
    /// Parses `7.0`, `7.0.7`, `7`, `v7.0` (→ [`WaldurVersion::V7_0`]) or `current`, `8`, `latest`.
    pub fn parse(s: &str) -> Option<WaldurVersion> {
        let v = s.trim().trim_start_matches(['v', 'V']).to_ascii_lowercase();
        if v == "7" || v == "7.0" || v.starts_with("7.0.") {
            Some(WaldurVersion::V7_0)
        } else if matches!(v.as_str(), "current" | "latest" | "8" | "8.0") || v.starts_with("8.") {
            Some(WaldurVersion::Current)
        } else {
            None
        }
    }
}

impl std::str::FromStr for WaldurVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WaldurVersion::parse(s)
            .ok_or_else(|| format!("unknown Waldur version {s:?} (use 7.0 or current)"))
    }
}

/// The order of the list when the request has no `o=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultOrder {
    /// What a real server does: by tenant name only, so the rows of one tenant come in an order
    /// that changes with every request (a per-request shuffle). The shuffles are drawn from a
    /// generator seeded with `seed`, so the same sequence of requests sees the same orders.
    /// Paging without `o=` can then repeat or skip rows, as on a real server.
    Shuffled { seed: u64 },
    /// The simulator's old default: oldest first (creation, then insertion), across tenants.
    /// Stable, but kinder than any real server.
    Created,
}

impl Default for DefaultOrder {
    fn default() -> Self {
        DefaultOrder::Shuffled { seed: 0 }
    }
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
    /// Pre-8.0.0 mode: `set_ok` and `set_erred` do not exist (404 with an HTML body).
    pub pre_8_0_0: bool,
    /// The release to copy; [`WaldurVersion::V7_0`] turns on all of 7.0.x's differences.
    pub version: WaldurVersion,
    /// The list's order without `o=`: shuffled per request (the real server) by default.
    pub default_order: DefaultOrder,
    /// Background worker timing.
    pub delays: Delays,
    /// Token of a staff user: sees everything, may unlink / set_ok / set_erred.
    pub staff_token: String,
    /// More tokens of the staff user (a rotated token: the same user, another key).
    pub staff_token_aliases: Vec<String>,
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
            version: WaldurVersion::Current,
            default_order: DefaultOrder::default(),
            delays: Delays::default(),
            staff_token: "staff-token".to_string(),
            staff_token_aliases: Vec::new(),
            user_token: "user-token".to_string(),
            tenants: vec![DEFAULT_TENANT.to_string()],
            user_tenants: Vec::new(),
            resync_interval: None,
        }
    }
}
