//! The kinds that ship with cairn, and what their arguments must be. The handlers live in the
//! workers; the API checks a request against these before it accepts it, so a job that could
//! never run is refused with 400 rather than left to die.

use super::JobsSettings;

/// Does nothing (tests and benchmarks); `{sleep_ms}` (at most 600000) makes it take that long.
pub const NOOP: &str = "noop";
/// POSTs `{body}` to `{url}`, signed as Standard Webhooks do; the host must be allowed.
pub const WEBHOOK_DELIVER: &str = "webhook.deliver";
/// Removes the stored bytes of uploads whose FileUploaded never got appended.
pub const FILES_SWEEP: &str = "files.sweep";
/// Removes the stored bytes of one deleted file.
pub const FILES_REMOVE: &str = "files.remove";
/// Rolls the analytics daily rows up into DAU, WAU and MAU.
pub const ANALYTICS_ROLLUP: &str = "analytics.rollup";
/// Removes expired and revoked sessions from the read model.
pub const SESSIONS_PURGE: &str = "sessions.purge";

/// Every shipped kind.
pub const SHIPPED: &[&str] = &[NOOP, WEBHOOK_DELIVER, FILES_SWEEP, FILES_REMOVE, ANALYTICS_ROLLUP, SESSIONS_PURGE];

/// Checks that `kind` is known and `args` are what its handler needs. The message says what is
/// wrong, for a 400.
///
/// # Errors
/// An unknown kind, or arguments its handler would refuse.
pub fn validate(kind: &str, args: &serde_json::Value, settings: &JobsSettings) -> Result<(), String> {
    if !SHIPPED.contains(&kind) {
        return Err(format!("unknown job kind '{kind}'; known kinds: {}", SHIPPED.join(", ")));
    }
    if !args.is_object() {
        return Err("args must be a JSON object".to_owned());
    }
    match kind {
        NOOP => match args.get("sleep_ms") {
            None => Ok(()),
            Some(v) if v.as_u64().is_some_and(|ms| ms <= 600_000) => Ok(()),
            Some(_) => Err("args.sleep_ms must be a whole number of milliseconds up to 600000".to_owned()),
        },
        WEBHOOK_DELIVER => {
            let url = args.get("url").and_then(|u| u.as_str()).ok_or("args.url must be a string")?;
            webhook_target(url, &settings.webhook_allowed_hosts)?;
            if args.get("body").is_none() {
                return Err("args.body is required (the JSON to POST)".to_owned());
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The request field a [`validate`] refusal is about: `kind` for an unknown kind, `args` otherwise.
#[must_use]
pub fn field_of(problem: &str) -> &'static str {
    if problem.starts_with("unknown job kind") {
        "kind"
    } else {
        "args"
    }
}

/// Checks a webhook URL: `http` or `https`, no credentials, and a host (with its port when one
/// is given, or the scheme's default) on `allowed` (`host` allows any port; `host:port` only
/// that one). Returns the URL parsed.
///
/// # Errors
/// Why the URL is refused.
pub fn webhook_target(raw: &str, allowed: &[String]) -> Result<url::Url, String> {
    let parsed = url::Url::parse(raw).map_err(|e| format!("args.url is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("args.url must be http or https".to_owned());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("args.url must not carry credentials".to_owned());
    }
    let host = parsed.host_str().ok_or("args.url has no host")?.to_ascii_lowercase();
    let port = parsed.port_or_known_default().unwrap_or(0);
    let with_port = format!("{host}:{port}");
    if allowed.iter().any(|entry| *entry == host || *entry == with_port) {
        Ok(parsed)
    } else if allowed.is_empty() {
        Err("webhooks are not enabled: no host is on CAIRN_WEBHOOK_ALLOWED_HOSTS".to_owned())
    } else {
        Err(format!("host '{with_port}' is not on CAIRN_WEBHOOK_ALLOWED_HOSTS"))
    }
}
