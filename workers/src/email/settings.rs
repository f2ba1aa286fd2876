//! The email worker's configuration: the SMTP server, the sender, and the public URL the mailed
//! links point at. Read from the environment by the worker itself, so the process-wide settings
//! stay free of mail concerns.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use lettre::message::Mailbox;

/// `SMTP_HOST` unless set: a local mail catcher.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// `SMTP_PORT` unless set: the usual port of local mail catchers (Mailpit, aiosmtpd).
pub const DEFAULT_PORT: u16 = 1025;
/// `SMTP_FROM` unless set.
pub const DEFAULT_FROM: &str = "cairn <no-reply@localhost>";
/// `CAIRN_PUBLIC_URL` unless set.
pub const DEFAULT_PUBLIC_URL: &str = "http://localhost:8080";
/// `SMTP_TIMEOUT_SECS` unless set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the connection to the SMTP server is secured (`SMTP_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// `none`: plain SMTP. For a mail catcher or a relay on the same host.
    None,
    /// `starttls`: plain connection upgraded with STARTTLS, which the server must offer (usually port 587).
    StartTls,
    /// `tls`: TLS from the first byte, "SMTPS" (usually port 465).
    Tls,
}

impl FromStr for SmtpTls {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "starttls" => Ok(Self::StartTls),
            "tls" => Ok(Self::Tls),
            other => bail!("SMTP_TLS must be none, starttls or tls, not '{other}'"),
        }
    }
}

/// The SMTP password. Its `Debug` never shows it, so settings can be logged whole.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpPassword(String);

impl SmtpPassword {
    /// Wraps a password.
    #[must_use]
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    /// The password itself, for the SMTP login only.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SmtpPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("REDACTED")
    }
}

/// Everything the email worker is configured with. Every field comes from one variable.
#[derive(Debug, Clone)]
pub struct EmailSettings {
    /// `SMTP_HOST`: the SMTP server; also the name its TLS certificate must carry.
    pub host: String,
    /// `SMTP_PORT`.
    pub port: u16,
    /// `SMTP_TLS`: `none`, `starttls` or `tls`.
    pub tls: SmtpTls,
    /// `SMTP_USERNAME`: log in when set.
    pub username: Option<String>,
    /// `SMTP_PASSWORD`, or the contents of the file named by `SMTP_PASSWORD_FILE`.
    pub password: Option<SmtpPassword>,
    /// `SMTP_TLS_CA_FILE`: PEM certificates trusted besides the bundled public roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// `SMTP_FROM`: the sender, `Name <address>` or a bare address.
    pub from: Mailbox,
    /// `CAIRN_PUBLIC_URL`: where the frontend serves `/verify-email` and `/reset-password`; no trailing `/`.
    pub public_url: String,
    /// `SMTP_TIMEOUT_SECS`: limit on connecting, and on one message's whole exchange (from the
    /// greeting to the server's acceptance); a send past it is cut short and retried later.
    pub timeout: Duration,
}

impl EmailSettings {
    /// Reads the environment.
    ///
    /// # Errors
    /// When a variable is malformed, the password file cannot be read, or the credentials are half set.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests). Empty values count as unset.
    ///
    /// # Errors
    /// As [`EmailSettings::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let get = |key: &str| lookup(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());

        let host = get("SMTP_HOST").unwrap_or_else(|| DEFAULT_HOST.to_owned());
        let port = match get("SMTP_PORT") {
            Some(v) => v.parse::<u16>().ok().filter(|p| *p != 0).context("SMTP_PORT must be a port number")?,
            None => DEFAULT_PORT,
        };
        let tls = get("SMTP_TLS").map(|v| v.parse()).transpose()?.unwrap_or(SmtpTls::None);
        let timeout = match get("SMTP_TIMEOUT_SECS") {
            Some(v) => Duration::from_secs(
                v.parse::<u64>().ok().filter(|s| *s > 0).context("SMTP_TIMEOUT_SECS must be a positive number")?,
            ),
            None => DEFAULT_TIMEOUT,
        };

        // The password is not trimmed: spaces may be part of it. Only the line end a file
        // written by an editor or `echo` carries is dropped.
        let password = match (lookup("SMTP_PASSWORD").filter(|v| !v.is_empty()), get("SMTP_PASSWORD_FILE")) {
            (Some(_), Some(_)) => bail!("set SMTP_PASSWORD or SMTP_PASSWORD_FILE, not both"),
            (Some(p), None) => Some(SmtpPassword(p)),
            (None, Some(path)) => {
                let raw =
                    std::fs::read_to_string(&path).with_context(|| format!("cannot read SMTP_PASSWORD_FILE {path}"))?;
                let p = raw.trim_end_matches(['\n', '\r']);
                if p.is_empty() {
                    bail!("SMTP_PASSWORD_FILE {path} is empty");
                }
                Some(SmtpPassword(p.to_owned()))
            }
            (None, None) => None,
        };
        let username = get("SMTP_USERNAME");
        match (&username, &password) {
            (Some(_), None) => bail!("SMTP_USERNAME is set but neither SMTP_PASSWORD nor SMTP_PASSWORD_FILE"),
            (None, Some(_)) => bail!("an SMTP password is set but SMTP_USERNAME is not"),
            _ => {}
        }

        let from_raw = get("SMTP_FROM").unwrap_or_else(|| DEFAULT_FROM.to_owned());
        let from = from_raw
            .parse::<Mailbox>()
            .map_err(|e| anyhow::anyhow!("SMTP_FROM '{from_raw}' is not a mailbox ('Name <address>'): {e}"))?;

        let public_url = get("CAIRN_PUBLIC_URL").unwrap_or_else(|| DEFAULT_PUBLIC_URL.to_owned());
        let public_url = public_url.trim_end_matches('/').to_owned();
        let well_formed = (public_url.starts_with("https://") || public_url.starts_with("http://"))
            && public_url.split_once("://").is_some_and(|(_, rest)| !rest.is_empty())
            && !public_url.contains(['?', '#', ' ', '"', '<', '>']);
        if !well_formed {
            bail!("CAIRN_PUBLIC_URL must be an http(s) URL without query or fragment, not '{public_url}'");
        }

        Ok(Self {
            host,
            port,
            tls,
            username,
            password,
            ca_file: get("SMTP_TLS_CA_FILE").map(PathBuf::from),
            from,
            public_url,
            timeout,
        })
    }

    /// Refuses what must not run in production: a password sent in clear text to another machine.
    ///
    /// # Errors
    /// When credentials are set, `SMTP_TLS` is `none` and `SMTP_HOST` is not a loopback address.
    pub fn check_production(&self) -> anyhow::Result<()> {
        if self.tls == SmtpTls::None && self.username.is_some() && !is_loopback(&self.host) {
            bail!(
                "SMTP_TLS=none would send the SMTP password to {} in clear text; set SMTP_TLS to starttls or tls",
                self.host
            );
        }
        Ok(())
    }

    /// The link that verifies an address.
    #[must_use]
    pub fn verify_email_link(&self, token: &str) -> String {
        format!("{}/verify-email?token={token}", self.public_url)
    }

    /// The link that sets a new password.
    #[must_use]
    pub fn reset_password_link(&self, token: &str) -> String {
        format!("{}/reset-password?token={token}", self.public_url)
    }

    /// The page where a user asks for a password-reset mail (no token).
    #[must_use]
    pub fn reset_password_page(&self) -> String {
        format!("{}/reset-password", self.public_url)
    }
}

/// `localhost`, or an address of the loopback network.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> anyhow::Result<EmailSettings> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        EmailSettings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_point_at_a_local_mail_catcher() -> anyhow::Result<()> {
        let s = settings(&[])?;
        assert_eq!((s.host.as_str(), s.port, s.tls), ("127.0.0.1", 1025, SmtpTls::None));
        assert_eq!(s.from.to_string(), "cairn <no-reply@localhost>");
        assert_eq!(s.public_url, "http://localhost:8080");
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert!(s.username.is_none() && s.password.is_none() && s.ca_file.is_none());
        assert_eq!(s.verify_email_link("abc"), "http://localhost:8080/verify-email?token=abc");
        Ok(())
    }

    #[test]
    fn everything_is_read_and_the_password_never_printed() -> anyhow::Result<()> {
        let s = settings(&[
            ("SMTP_HOST", "smtp.example.com"),
            ("SMTP_PORT", "587"),
            ("SMTP_TLS", "STARTTLS"),
            ("SMTP_USERNAME", "mailer"),
            ("SMTP_PASSWORD", "hunter2 with spaces"),
            ("SMTP_FROM", "Example <no-reply@example.com>"),
            ("CAIRN_PUBLIC_URL", "https://app.example.com/"),
            ("SMTP_TIMEOUT_SECS", "3"),
        ])?;
        assert_eq!((s.port, s.tls), (587, SmtpTls::StartTls));
        assert_eq!(s.password.as_ref().map(SmtpPassword::expose), Some("hunter2 with spaces"));
        assert_eq!(s.public_url, "https://app.example.com");
        assert_eq!(s.reset_password_link("t"), "https://app.example.com/reset-password?token=t");
        assert_eq!(s.timeout, Duration::from_secs(3));
        let debug = format!("{s:?}");
        assert!(debug.contains("REDACTED") && !debug.contains("hunter2"), "{debug}");
        Ok(())
    }

    #[test]
    fn the_password_can_come_from_a_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("smtp-password");
        std::fs::write(&path, "from a file\n")?;
        let file = path.display().to_string();
        let s = settings(&[("SMTP_USERNAME", "u"), ("SMTP_PASSWORD_FILE", &file)])?;
        assert_eq!(s.password.as_ref().map(SmtpPassword::expose), Some("from a file"));
        assert!(settings(&[("SMTP_USERNAME", "u"), ("SMTP_PASSWORD_FILE", &file), ("SMTP_PASSWORD", "x")]).is_err());
        let missing = dir.path().join("missing").display().to_string();
        assert!(settings(&[("SMTP_USERNAME", "u"), ("SMTP_PASSWORD_FILE", &missing)]).is_err());
        Ok(())
    }

    #[test]
    fn malformed_values_are_refused() {
        for vars in [
            &[("SMTP_PORT", "0")][..],
            &[("SMTP_PORT", "smtp")],
            &[("SMTP_TLS", "ssl")],
            &[("SMTP_TIMEOUT_SECS", "0")],
            &[("SMTP_FROM", "not a mailbox")],
            &[("CAIRN_PUBLIC_URL", "app.example.com")],
            &[("CAIRN_PUBLIC_URL", "https://app.example.com/?x=1")],
            &[("SMTP_USERNAME", "u")],
            &[("SMTP_PASSWORD", "p")],
        ] {
            assert!(settings(vars).is_err(), "{vars:?} was accepted");
        }
    }

    #[test]
    fn production_refuses_a_clear_text_password_to_another_host() -> anyhow::Result<()> {
        let creds = [("SMTP_USERNAME", "u"), ("SMTP_PASSWORD", "p")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut vars = creds.to_vec();
            vars.extend_from_slice(extra);
            settings(&vars)
        };
        assert!(with(&[("SMTP_HOST", "smtp.example.com")])?.check_production().is_err());
        with(&[("SMTP_HOST", "smtp.example.com"), ("SMTP_TLS", "tls")])?.check_production()?;
        with(&[("SMTP_HOST", "smtp.example.com"), ("SMTP_TLS", "starttls")])?.check_production()?;
        with(&[("SMTP_HOST", "localhost")])?.check_production()?;
        with(&[("SMTP_HOST", "::1")])?.check_production()?;
        with(&[])?.check_production()?;
        // No credentials, nothing secret on the wire: a relay that trusts the network is allowed.
        settings(&[("SMTP_HOST", "mail.internal")])?.check_production()?;
        Ok(())
    }
}
