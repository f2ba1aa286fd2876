//! Value types that parse rather than validate: once built, a value is known to be valid; and
//! [`Secret`], which never prints.

use serde::{Deserialize, Serialize};

/// A value that must never be printed or logged: a password hash, the hash of a refresh token.
/// It is stored as the bare string (events keep their shape), and its `Debug` prints `REDACTED`,
/// so an aggregate, command or event printed with `{:?}` gives nothing away.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for the code that must use it (verifying, comparing, storing).
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("REDACTED")
    }
}

/// Why a value was refused; the message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

/// An email address, trimmed and lower-cased, so one mailbox is one account whatever its case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Parses an address: one `@`, a non-empty local part, a dotted domain, at most 254 bytes.
    ///
    /// # Errors
    /// A [`ValueError`] saying what is wrong.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let email = raw.trim().to_lowercase();
        if email.is_empty() {
            return Err(ValueError("email is required".into()));
        }
        if email.len() > 254 {
            return Err(ValueError("email is longer than 254 characters".into()));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(ValueError("email must contain '@'".into()));
        };
        let domain_ok = !domain.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..");
        if local.is_empty() || local.len() > 64 || !domain_ok {
            return Err(ValueError("email is not a valid address".into()));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ValueError("email must not contain spaces".into()));
        }
        Ok(Self(email))
    }

    /// The normalised address.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name: 1 to 100 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DisplayName(String);

impl DisplayName {
    /// Parses a display name.
    ///
    /// # Errors
    /// A [`ValueError`] when empty, too long or holding control characters.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(ValueError("display_name is required".into()));
        }
        if name.chars().count() > 100 {
            return Err(ValueError("display_name is longer than 100 characters".into()));
        }
        if name.chars().any(char::is_control) {
            return Err(ValueError("display_name must not contain control characters".into()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as given, trimmed.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A role name: 1 to 64 of `a-z`, `0-9`, `_`, `-`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoleName(String);

impl RoleName {
    /// Parses a role name.
    ///
    /// # Errors
    /// A [`ValueError`] when the name has other characters or the wrong length.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let ok = (1..=64).contains(&raw.len())
            && raw.starts_with(|c: char| c.is_ascii_lowercase())
            && raw.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ValueError("role must be 1-64 characters of a-z, 0-9, '_' or '-', starting with a letter".into()))
        }
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_normalised_to_lower_case() {
        assert_eq!(Email::parse("  Ada@Example.COM ").map(|e| e.0), Ok("ada@example.com".into()));
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@example..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(DisplayName::parse(" Ada ").map(|d| d.0), Ok("Ada".into()));
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse(&"x".repeat(101)).is_err());
        assert!(DisplayName::parse("a\u{0}b").is_err());
    }

    #[test]
    fn role_names_are_restricted() {
        assert!(RoleName::parse("operator").is_ok());
        assert!(RoleName::parse("Admin").is_err());
        assert!(RoleName::parse("1st").is_err());
        assert!(RoleName::parse("").is_err());
    }
}
