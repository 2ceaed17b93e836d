//! The operator under test, as users run it: the `waldur-operator` binary in a child process,
//! killed with SIGKILL and started again as the campaign says, each run logging to its own
//! file so that a panic in any run is found afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// How one run of the operator ended.
#[derive(Clone, Debug)]
pub enum Ending {
    Running,
    /// We sent SIGKILL.
    Killed,
    /// We sent SIGTERM and it exited (with this status) or was killed after the grace.
    Terminated(String),
    /// It exited by itself: never expected while the campaign runs.
    Exited(String),
}

pub struct Run {
    pub log: PathBuf,
    pub started: Instant,
    /// How long it ran (up to now while running).
    pub ran: std::time::Duration,
    pub ending: Ending,
}

pub struct Operator {
    binary: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    /// The log files' prefix: `operator` for the replica the points act on.
    name: String,
    child: Option<Child>,
    pub runs: Vec<Run>,
}

impl Operator {
    pub fn new(binary: &Path, env: Vec<(String, String)>, dir: &Path) -> Operator {
        Operator::named(binary, env, dir, "operator")
    }

    /// Another replica, logging to `<name>-<run>.log`.
    pub fn named(binary: &Path, env: Vec<(String, String)>, dir: &Path, name: &str) -> Operator {
        Operator {
            binary: binary.to_path_buf(),
            env,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            child: None,
            runs: Vec::new(),
        }
    }

    /// Starts a new run (no-op if one is running). The child dies with this process.
    pub fn start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = self
            .dir
            .join(format!("{}-{}.log", self.name, self.runs.len()));
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env_clear();
        for key in ["PATH", "HOME", "TMPDIR"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.env("RUST_BACKTRACE", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = control_plane::spawn_tied_to_this_process(cmd)
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        self.runs.push(Run {
            log,
            started: Instant::now(),
            ran: std::time::Duration::ZERO,
            ending: Ending::Running,
        });
        Ok(())
    }

    /// SIGKILL: whatever the operator was doing stops where it stands.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(run) = self.runs.last_mut() {
                run.ending = Ending::Killed;
                run.ran = run.started.elapsed();
            }
        }
    }

    /// SIGTERM, as Kubernetes stops a pod: the operator is asked to stop and chooses how.
    /// False if no run is going or the signal could not be sent.
    pub fn terminate(&mut self) -> bool {
        let Some(child) = self.child.as_ref() else {
            return false;
        };
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// After [`Operator::terminate`]: the exit status once the run has ended (recorded as
    /// terminated, not as exited by itself), `None` while it still runs.
    pub fn terminated(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        self.child = None;
        let how = status.to_string();
        if let Some(run) = self.runs.last_mut() {
            run.ending = Ending::Terminated(how.clone());
            run.ran = run.started.elapsed();
        }
        Some(how)
    }

    /// Whether the current run exited by itself; it is recorded, and `None` means running
    /// (or not started).
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        self.child = None;
        let how = status.to_string();
        if let Some(run) = self.runs.last_mut() {
            run.ending = Ending::Exited(how.clone());
            run.ran = run.started.elapsed();
        }
        Some(how)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines of a log that show a panic (`thread '...' panicked at ...`), with the run's file.
pub fn panics(runs: &[Run]) -> Vec<String> {
    runs.iter()
        .flat_map(|run| {
            let text = std::fs::read_to_string(&run.log).unwrap_or_default();
            text.lines()
                .filter(|l| l.contains("panicked"))
                .map(|l| format!("{}: {l}", run.log.display()))
                .collect::<Vec<_>>()
        })
        .collect()
}
