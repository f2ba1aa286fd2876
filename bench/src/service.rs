//! The service under test: `cairn serve` as a separate process on a free local port, its memory
//! read from `/proc/<pid>/status`, stopped with SIGTERM. Also finds (or builds) the release binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::env::BenchEnv;

/// The workspace this crate belongs to.
fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The release `cairn` binary: `CAIRN_BIN` when set, else `<target>/release/cairn`, built
/// first when missing or when `rebuild` is set.
///
/// # Errors
/// When the build fails or `CAIRN_BIN` names no file.
pub async fn cairn_binary(rebuild: bool) -> anyhow::Result<PathBuf> {
    if let Some(given) = std::env::var_os("CAIRN_BIN") {
        let given = PathBuf::from(given);
        if !given.is_file() {
            bail!("CAIRN_BIN={} is not a file", given.display());
        }
        // Absolute, since the service runs in a scratch directory.
        return std::fs::canonicalize(&given).with_context(|| format!("CAIRN_BIN={}", given.display()));
    }
    let workspace = workspace_dir();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let target = if target.is_relative() { workspace.join(target) } else { target };
    let binary = target.join("release").join("cairn");
    if rebuild || !binary.exists() {
        crate::report::note("building the service: cargo build --release --bin cairn");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--release", "--bin", "cairn"])
            .current_dir(&workspace)
            .status()
            .await
            .context("cannot run cargo")?;
        if !status.success() {
            bail!("cargo build --release --bin cairn failed ({status})");
        }
    }
    if !binary.exists() {
        bail!("{} is missing after the build", binary.display());
    }
    Ok(binary)
}

/// Memory of the service process, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    /// Peak resident set size so far (`VmHWM`).
    pub peak_mib: f64,
    /// Resident set size now (`VmRSS`).
    pub rss_mib: f64,
}

/// Reads `VmHWM` and `VmRSS` of process `pid`.
///
/// # Errors
/// When the process is gone or the file has neither field.
pub fn memory_of(pid: u32) -> anyhow::Result<Memory> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    match (field("VmHWM:"), field("VmRSS:")) {
        (Some(peak_mib), Some(rss_mib)) => Ok(Memory { peak_mib, rss_mib }),
        _ => bail!("/proc/{pid}/status has no VmHWM or VmRSS"),
    }
}

/// CPU time (user + system) used so far by process `pid`, in seconds.
///
/// # Errors
/// When the process is gone.
pub fn cpu_seconds_of(pid: u32, ticks_per_second: f64) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid} is gone"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((ticks(11) + ticks(12)) / ticks_per_second)
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 when it cannot be asked.
pub async fn clock_ticks() -> f64 {
    let asked = Command::new("getconf").arg("CLK_TCK").output().await;
    asked.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
}

/// A running `cairn serve`.
pub struct Service {
    child: Child,
    pid: u32,
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    log: PathBuf,
}

impl Service {
    /// Starts `cairn serve` with `extra_env` on a free port and waits until `/ready` answers 200.
    ///
    /// # Errors
    /// When it does not start, exits, or is not ready within two minutes.
    pub async fn start(env: &BenchEnv, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        // BENCH_LOG_DIR keeps the service's log after the run (it goes to the scratch directory otherwise).
        let log = match std::env::var_os("BENCH_LOG_DIR") {
            Some(dir) => std::path::PathBuf::from(dir).join(format!("serve-{port}.log")),
            None => env.scratch_file(&format!("serve-{port}.log")),
        };
        let log_file = std::fs::File::create(&log)?;
        let mut vars: Vec<(&str, &str)> = vec![("CAIRN_LISTEN", listen.as_str())];
        vars.extend_from_slice(extra_env);
        let child = env
            .cairn_command(&["serve"], &vars)
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", env.cairn.display()))?;
        let pid = child.id().context("the service exited at once")?;
        let mut service = Self { child, pid, base_url: format!("http://{listen}"), log };
        service.wait_ready(Duration::from_secs(120)).await?;
        crate::report::note(&format!("cairn serve ready: pid {pid}, {}", service.base_url));
        Ok(service)
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Current and peak memory.
    ///
    /// # Errors
    /// When the process is gone.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        memory_of(self.pid)
    }

    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let url = format!("{}/ready", self.base_url);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("cairn serve exited ({status}) before it was ready: {}", self.log_tail());
            }
            if let Ok(response) = http.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("cairn serve was not ready within {limit:?}: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines the service logged.
    #[must_use]
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Reads the memory one last time, sends SIGTERM and waits for the process to exit (SIGKILL
    /// after 30 seconds). Returns the memory read just before the signal.
    ///
    /// # Errors
    /// When the memory cannot be read or the process cannot be signalled.
    pub async fn stop(mut self) -> anyhow::Result<Memory> {
        let memory = self.memory();
        let signalled = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status().await;
        if !matches!(signalled, Ok(s) if s.success()) {
            self.child.kill().await?;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    crate::report::note(&format!("cairn serve exited with {status}: {}", self.log_tail()));
                }
            }
            Err(_) => {
                crate::report::note("cairn serve did not stop within 30 s of SIGTERM; killing it");
                self.child.kill().await?;
            }
        }
        memory
    }
}

/// A port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
