//! The job queue's settings (`CAIRN_JOBS_*`, `CAIRN_SCHEDULES_FILE`, `CAIRN_WEBHOOK_*`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::settings::{Environment, RateLimit};

/// A value per job kind, with a default for the kinds not named: `16` or
/// `default=16,webhook.deliver=4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerKind<T> {
    /// For kinds not named.
    pub default: T,
    /// Named kinds.
    pub kinds: BTreeMap<String, T>,
}

impl<T: Clone> PerKind<T> {
    /// The value for `kind`.
    #[must_use]
    pub fn get(&self, kind: &str) -> T {
        self.kinds.get(kind).cloned().unwrap_or_else(|| self.default.clone())
    }

    /// Parses `value` or `kind=value,…` (with `default=value`), each value with `parse`.
    ///
    /// # Errors
    /// A value `parse` refuses, or a malformed entry.
    pub fn parse(raw: &str, default: T, parse: impl Fn(&str) -> anyhow::Result<T>) -> anyhow::Result<Self> {
        let mut out = Self { default, kinds: BTreeMap::new() };
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.split_once('=') {
                None => out.default = parse(entry)?,
                Some(("default", value)) => out.default = parse(value.trim())?,
                Some((kind, value)) => {
                    let kind = kind.trim();
                    if kind.is_empty() {
                        bail!("'{entry}': a kind is needed before '='");
                    }
                    out.kinds.insert(kind.to_owned(), parse(value.trim())?);
                }
            }
        }
        Ok(out)
    }
}

/// How jobs are run, retried, kept and what the shipped kinds may do.
#[derive(Clone)]
pub struct JobsSettings {
    /// `CAIRN_JOBS_KINDS`: the kinds this process's workers run (default: every registered kind).
    pub kinds: Option<Vec<String>>,
    /// `CAIRN_JOBS_CONCURRENCY`: jobs of a kind one process runs at once (default 16).
    pub concurrency: PerKind<usize>,
    /// `CAIRN_JOBS_RATE`: jobs of a kind one process starts per period (default: no limit),
    /// such as `webhook.deliver=10/s`.
    pub rate: PerKind<Option<RateLimit>>,
    /// `CAIRN_JOBS_TIMEOUT_SECS`: how long one attempt of a kind may run (default 300).
    pub timeout: PerKind<Duration>,
    /// `CAIRN_JOBS_LEASE_SECS`: how long a running job stays leased without a heartbeat; a
    /// crashed worker's jobs are free again after it (default 30).
    pub lease: Duration,
    /// `CAIRN_JOBS_POLL_MS`: how often workers look for due work when nothing woke them (default 1000).
    pub poll: Duration,
    /// `CAIRN_JOBS_BACKOFF_BASE_SECS`: the first retry's longest delay; each later one doubles
    /// it, with full jitter (default 2).
    pub backoff_base: Duration,
    /// `CAIRN_JOBS_BACKOFF_MAX_SECS`: the longest delay between two attempts (default 3600).
    pub backoff_max: Duration,
    /// `CAIRN_JOBS_KEEP_DONE_HOURS`: how long done and cancelled jobs are kept (default 168).
    pub keep_done: Duration,
    /// `CAIRN_JOBS_KEEP_DEAD_HOURS`: how long dead and failed jobs are kept (default 720).
    pub keep_dead: Duration,
    /// `CAIRN_SCHEDULES_FILE`: schedules defined by configuration (JSON, see the README).
    pub schedules_file: Option<PathBuf>,
    /// `CAIRN_WEBHOOK_ALLOWED_HOSTS`: the `host` or `host:port` entries `webhook.deliver` may
    /// call (default: none).
    pub webhook_allowed_hosts: Vec<String>,
    /// `CAIRN_WEBHOOK_SECRET` (or `CAIRN_WEBHOOK_SECRET_FILE`): the `whsec_<base64>` signing
    /// secret; a development default otherwise, refused in production.
    pub webhook_secret: Vec<u8>,
}

impl std::fmt::Debug for JobsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobsSettings")
            .field("kinds", &self.kinds)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.lease)
            .field("webhook_allowed_hosts", &self.webhook_allowed_hosts)
            .field("webhook_secret", &"REDACTED")
            .finish_non_exhaustive()
    }
}

/// The development webhook secret (`whsec_` + base64 of "cairn development webhook secret"):
/// refused in production.
pub const DEV_WEBHOOK_SECRET: &str = "whsec_Y2Fpcm4gZGV2ZWxvcG1lbnQgd2ViaG9vayBzZWNyZXQ=";

/// Decodes a `whsec_<base64>` secret into its key bytes.
///
/// # Errors
/// Without the prefix, with bad base64, or shorter than 16 bytes.
pub fn parse_webhook_secret(raw: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    let encoded = raw.trim().strip_prefix("whsec_").context("a webhook secret has the form whsec_<base64>")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .context("the part after whsec_ must be standard base64")?;
    if key.len() < 16 {
        bail!("a webhook secret must be at least 16 bytes (24 base64 characters)");
    }
    Ok(key)
}

impl JobsSettings {
    /// Reads the job settings through `lookup`.
    ///
    /// # Errors
    /// A malformed value, or the development webhook secret in production.
    pub fn from_lookup(lookup: &impl Fn(&str) -> Option<String>, environment: Environment) -> anyhow::Result<Self> {
        let var = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let secs = |key: &str, default: u64| -> anyhow::Result<Duration> {
            match var(key) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => Ok(Duration::from_secs(
                    v.trim().parse::<u64>().with_context(|| format!("{key} must be a whole number of seconds"))?,
                )),
            }
        };
        let kinds = var("CAIRN_JOBS_KINDS")
            .map(|v| v.split(',').map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect::<Vec<_>>());
        let concurrency = PerKind::parse(&var("CAIRN_JOBS_CONCURRENCY").unwrap_or_default(), 16, |v| {
            let n = v.parse::<usize>().with_context(|| format!("CAIRN_JOBS_CONCURRENCY: '{v}' is not a number"))?;
            if n == 0 || n > 10_000 {
                bail!("CAIRN_JOBS_CONCURRENCY: {n} must be between 1 and 10000");
            }
            Ok(n)
        })?;
        let rate = PerKind::parse(&var("CAIRN_JOBS_RATE").unwrap_or_default(), None, |v| {
            RateLimit::parse(v).with_context(|| format!("CAIRN_JOBS_RATE: '{v}'"))
        })?;
        let timeout =
            PerKind::parse(&var("CAIRN_JOBS_TIMEOUT_SECS").unwrap_or_default(), Duration::from_secs(300), |v| {
                let n = v.parse::<u64>().with_context(|| format!("CAIRN_JOBS_TIMEOUT_SECS: '{v}' is not a number"))?;
                if n == 0 {
                    bail!("CAIRN_JOBS_TIMEOUT_SECS: a timeout must be at least 1 s");
                }
                Ok(Duration::from_secs(n))
            })?;
        let lease = secs("CAIRN_JOBS_LEASE_SECS", 30)?;
        if lease < Duration::from_secs(1) {
            bail!("CAIRN_JOBS_LEASE_SECS must be at least 1");
        }
        let poll = match var("CAIRN_JOBS_POLL_MS") {
            None => Duration::from_millis(1000),
            Some(v) => Duration::from_millis(
                v.trim().parse::<u64>().context("CAIRN_JOBS_POLL_MS must be a number of milliseconds")?.max(10),
            ),
        };
        let backoff_base = secs("CAIRN_JOBS_BACKOFF_BASE_SECS", 2)?.max(Duration::from_secs(1));
        let backoff_max = secs("CAIRN_JOBS_BACKOFF_MAX_SECS", 3600)?.max(backoff_base);
        let keep_done = secs("CAIRN_JOBS_KEEP_DONE_HOURS", 168)? * 3600;
        let keep_dead = secs("CAIRN_JOBS_KEEP_DEAD_HOURS", 720)? * 3600;
        let webhook_allowed_hosts = var("CAIRN_WEBHOOK_ALLOWED_HOSTS")
            .map(|v| v.split(',').map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default();
        let secret = match (var("CAIRN_WEBHOOK_SECRET"), var("CAIRN_WEBHOOK_SECRET_FILE")) {
            (Some(_), Some(_)) => bail!("set CAIRN_WEBHOOK_SECRET or CAIRN_WEBHOOK_SECRET_FILE, not both"),
            (Some(secret), None) => secret,
            (None, Some(file)) => std::fs::read_to_string(&file)
                .with_context(|| format!("CAIRN_WEBHOOK_SECRET_FILE: cannot read {file}"))?,
            (None, None) => DEV_WEBHOOK_SECRET.to_owned(),
        };
        if environment == Environment::Production && secret.trim() == DEV_WEBHOOK_SECRET {
            bail!("CAIRN_WEBHOOK_SECRET is required in production (the development secret is refused)");
        }
        let webhook_secret = parse_webhook_secret(&secret).context("CAIRN_WEBHOOK_SECRET")?;
        Ok(Self {
            kinds,
            concurrency,
            rate,
            timeout,
            lease,
            poll,
            backoff_base,
            backoff_max,
            keep_done,
            keep_dead,
            schedules_file: var("CAIRN_SCHEDULES_FILE").map(PathBuf::from),
            webhook_allowed_hosts,
            webhook_secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_per_kind_value_names_kinds_and_a_default() {
        let parsed = PerKind::parse("default=4, webhook.deliver=2,noop=64", 16, |v| Ok(v.parse::<usize>()?))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("noop"), 64);
        assert_eq!(parsed.get("webhook.deliver"), 2);
        assert_eq!(parsed.get("files.sweep"), 4);
        let bare = PerKind::parse("8", 16, |v| Ok(v.parse::<usize>()?)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bare.get("noop"), 8);
        assert!(PerKind::parse("=3", 16, |v| Ok(v.parse::<usize>()?)).is_err());
    }

    #[test]
    fn the_development_webhook_secret_is_refused_in_production() {
        let none = |_: &str| None;
        assert!(JobsSettings::from_lookup(&none, Environment::Development).is_ok());
        let err = JobsSettings::from_lookup(&none, Environment::Production).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("CAIRN_WEBHOOK_SECRET")));
        assert!(parse_webhook_secret("not-prefixed").is_err());
        assert!(parse_webhook_secret("whsec_c2hvcnQ=").is_err());
    }
}
