//! Logs: text or JSON, with a level that can be changed while the operator runs
//! (`PUT /debug/loglevel` on the admin port, `--admin-addr`, loopback by default).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// Sets a new filter: a level (`debug`) or directives (`info,waldur_operator=debug`).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives.trim())
            .map_err(|e| format!("{directives:?} is not a log filter: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))
    }

    pub fn current(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_default()
    }
}

/// Installs the global subscriber. Call once, at start-up.
pub fn init(directives: &str, format: LogFormat) -> Result<LogControl, String> {
    let filter = EnvFilter::try_new(directives)
        .map_err(|e| format!("--log-level {directives:?} is not a log filter: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let output = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(LogControl { handle })
}
