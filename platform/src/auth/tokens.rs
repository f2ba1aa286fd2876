//! Access tokens: short-lived EdDSA JWTs carrying roles, permissions and the session version.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::KeySet;
use crate::clock::SharedClock;

/// What an access token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// Roles held at sign-in.
    pub roles: Vec<String>,
    /// Permissions those roles grant.
    pub perms: Vec<String>,
    /// Session version at sign-in; tokens below the user's current version are refused.
    pub sv: u64,
    /// Session id.
    pub sid: Uuid,
    /// Whether the email address was verified at sign-in.
    #[serde(default)]
    pub ev: bool,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
}

/// What a download token says: one user may download one file until `exp`. Its audience is the
/// access tokens' with `:download` appended, so neither kind is ever accepted as the other. It
/// carries the session and roles of the access token it was issued against, so that signing out,
/// a role lost or the session version moving ends it as it ends that access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadClaims {
    /// The user id.
    pub sub: Uuid,
    /// The file it downloads.
    pub file: Uuid,
    /// Roles the user held at issue.
    pub roles: Vec<String>,
    /// Session version at issue.
    pub sv: u64,
    /// Session id.
    pub sid: Uuid,
    /// Whether the email address was verified at issue.
    #[serde(default)]
    pub ev: bool,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    /// Issuer.
    pub iss: String,
    /// Audience: `<access audience>:download`.
    pub aud: String,
}

/// Whom a token is for.
#[derive(Debug, Clone)]
pub struct TokenSubject {
    /// User id.
    pub user: Uuid,
    /// Roles held.
    pub roles: Vec<String>,
    /// Permissions those roles grant.
    pub perms: Vec<String>,
    /// Current session version.
    pub sv: u64,
    /// Session id.
    pub sid: Uuid,
    /// Whether the email is verified.
    pub email_verified: bool,
}

/// Signs and verifies access tokens with the key set, which can be swapped for a reloaded one.
/// Its `Debug` output shows neither the keys nor the hashes of the tokens it remembers.
#[derive(Clone)]
pub struct TokenIssuer {
    keys: Arc<std::sync::RwLock<Arc<KeySet>>>,
    issuer: String,
    audience: String,
    ttl: Duration,
    verified: Arc<std::sync::Mutex<VerifiedTokens>>,
    clock: SharedClock,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let remembered = self.verified.lock().map_or(0, |v| v.len());
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .field("keys", &"REDACTED")
            .field("verified_tokens", &remembered)
            .finish()
    }
}

/// Tokens already verified, by the SHA-256 of the token: a client presents the same access token
/// on every request for its lifetime, and checking its Ed25519 signature again each time is most
/// of what an authenticated read costs. An entry is used only while the token has not expired and
/// the key that signed it still verifies.
type VerifiedTokens = std::collections::HashMap<[u8; 32], (Claims, String)>;

/// How many verified tokens are remembered.
const VERIFIED_TOKENS: usize = 50_000;

/// Seconds of clock skew allowed on `exp`.
const LEEWAY_SECS: i64 = 5;

/// Why a token was refused (the message goes to the client as UNAUTHENTICATED).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

impl TokenIssuer {
    /// An issuer over `keys`.
    #[must_use]
    pub fn new(keys: Arc<KeySet>, issuer: &str, audience: &str, ttl: Duration) -> Self {
        Self {
            keys: Arc::new(std::sync::RwLock::new(keys)),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl,
            verified: Arc::default(),
            clock: crate::clock::system(),
        }
    }

    /// The same issuer, reading the time (`iat`, `exp` and their checks) from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    fn current(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(keys) => Arc::clone(&keys),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the key set (after `cairn admin rotate-key` added one).
    pub fn replace_keys(&self, keys: KeySet) {
        if let Ok(mut current) = self.keys.write() {
            *current = Arc::new(keys);
        }
    }

    /// Re-reads the keys directory every `every` until `shutdown`, so a rotated key reaches every
    /// process without a restart.
    pub fn spawn_reload(
        &self,
        dir: std::path::PathBuf,
        production: bool,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let issuer = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                match KeySet::load_with_ttl(&dir, production, issuer.ttl) {
                    Ok(keys) => issuer.replace_keys(keys),
                    Err(e) => tracing::warn!(error = %e, "keeping the loaded signing keys"),
                }
            }
        });
    }

    /// Lifetime of new tokens.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The public keys as JWKS.
    #[must_use]
    pub fn jwks(&self) -> serde_json::Value {
        self.current().jwks()
    }

    /// Signs a token for `subject`.
    ///
    /// # Errors
    /// When there is no signing key or signing fails.
    pub fn issue(&self, subject: TokenSubject) -> anyhow::Result<String> {
        let TokenSubject { user, roles, perms, sv, sid, email_verified } = subject;
        let keys = self.current();
        let (kid, key) = keys.signing().ok_or_else(|| anyhow::anyhow!("no signing key"))?;
        let now = self.clock.now().timestamp();
        let claims = Claims {
            sub: user,
            roles,
            perms,
            sv,
            sid,
            ev: email_verified,
            iat: now,
            exp: now + i64::try_from(self.ttl.as_secs()).unwrap_or(900),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, key)?)
    }

    /// The audience of download tokens.
    fn download_audience(&self) -> String {
        format!("{}:download", self.audience)
    }

    /// Signs a token that lets the holder of `access` download `file_id` for `ttl` (by this
    /// issuer's clock), with no `Authorization` header: for `<img src>` and plain links.
    ///
    /// # Errors
    /// When there is no signing key or signing fails.
    pub fn issue_download(&self, file_id: Uuid, access: &Claims, ttl: Duration) -> anyhow::Result<String> {
        let keys = self.current();
        let (kid, key) = keys.signing().ok_or_else(|| anyhow::anyhow!("no signing key"))?;
        let now = self.clock.now().timestamp();
        let claims = DownloadClaims {
            sub: access.sub,
            file: file_id,
            roles: access.roles.clone(),
            sv: access.sv,
            sid: access.sid,
            ev: access.ev,
            iat: now,
            exp: now + i64::try_from(ttl.as_secs()).unwrap_or(300),
            iss: self.issuer.clone(),
            aud: self.download_audience(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, key)?)
    }

    /// Verifies a download token as [`TokenIssuer::verify`] verifies an access token, and that it
    /// is for `file_id`: a token for another file is refused like a forged one.
    ///
    /// # Errors
    /// A [`TokenError`] saying why.
    pub fn verify_download(&self, token: &str, file_id: Uuid) -> Result<DownloadClaims, TokenError> {
        let (claims, _) = self.verify_signed::<DownloadClaims>(token, &self.download_audience())?;
        if claims.exp < self.clock.now().timestamp() - LEEWAY_SECS {
            return Err(TokenError("download token expired".into()));
        }
        if claims.file != file_id {
            return Err(TokenError("download token is for another file".into()));
        }
        Ok(claims)
    }

    /// Verifies signature, algorithm (EdDSA only: `none` and HS256 are refused), key id,
    /// expiry, issuer and audience.
    ///
    /// # Errors
    /// A [`TokenError`] saying why.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(digest.as_ref());
        let now = self.clock.now().timestamp();
        let cached = self.verified.lock().ok().and_then(|cache| cache.get(&fingerprint).cloned());
        if let Some((claims, kid)) = cached {
            if claims.exp >= now - LEEWAY_SECS && self.current().decoding(&kid).is_some() {
                return Ok(claims);
            }
            if let Ok(mut cache) = self.verified.lock() {
                cache.remove(&fingerprint);
            }
        }
        let (claims, kid) = self.verify_signed::<Claims>(token, &self.audience)?;
        // Expiry is judged by this issuer's clock (the library would read the system's).
        if claims.exp < now - LEEWAY_SECS {
            return Err(TokenError("token expired".into()));
        }
        if let Ok(mut cache) = self.verified.lock() {
            if cache.len() >= VERIFIED_TOKENS {
                cache.retain(|_, (c, _)| c.exp >= now - LEEWAY_SECS);
                if cache.len() >= VERIFIED_TOKENS {
                    cache.clear();
                }
            }
            cache.insert(fingerprint, (claims.clone(), kid));
        }
        Ok(claims)
    }

    /// Checks the signature and the claims, for `audience`; returns them with the signing key's id.
    fn verify_signed<C: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(C, String), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError("malformed token".into()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError("token algorithm not accepted".into()));
        }
        let kid = header.kid.ok_or_else(|| TokenError("token has no key id".into()))?;
        let keys = self.current();
        let key = keys.decoding(&kid).ok_or_else(|| TokenError("token signed by an unknown or retired key".into()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[audience]);
        validation.leeway = LEEWAY_SECS.unsigned_abs();
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<C>(token, key, &validation).map(|d| (d.claims, kid)).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            TokenError(
                match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::InvalidAudience => "token is for another audience",
                    ErrorKind::InvalidIssuer => "token is from another issuer",
                    ErrorKind::InvalidSignature => "token signature is invalid",
                    _ => "token is invalid",
                }
                .into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn subject(user: Uuid, sv: u64) -> TokenSubject {
        TokenSubject {
            user,
            roles: vec!["user".into()],
            perms: vec!["profile:write".into()],
            sv,
            sid: Uuid::new_v4(),
            email_verified: false,
        }
    }

    fn issuer(dir: &std::path::Path, audience: &str) -> TokenIssuer {
        let keys = KeySet::load(dir, false).expect("keys");
        TokenIssuer::new(Arc::new(keys), "cairn", audience, Duration::from_secs(60))
    }

    #[test]
    fn a_token_verifies_with_its_claims() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = issuer(dir.path(), "api");
        let user = Uuid::new_v4();
        let token = tokens.issue(subject(user, 3)).expect("issue");
        let claims = tokens.verify(&token).expect("verifies");
        assert_eq!((claims.sub, claims.sv), (user, 3));
    }

    #[test]
    fn debug_output_shows_no_key_and_no_remembered_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = issuer(dir.path(), "api");
        let token = tokens.issue(subject(Uuid::new_v4(), 1)).expect("issue");
        tokens.verify(&token).expect("verifies, and is remembered");
        let remembered: Vec<String> = tokens
            .verified
            .lock()
            .expect("lock")
            .keys()
            .map(|k| k.iter().map(|b| format!("{b}")).collect::<Vec<_>>().join(", "))
            .collect();
        assert_eq!(remembered.len(), 1);
        let state = crate::auth::AuthState {
            tokens: tokens.clone(),
            sessions: crate::auth::SessionVersions::default(),
            user_limits: None,
            verified_email_for: Arc::new(vec![]),
        };
        let printed = format!("{tokens:?} {tokens:#?} {state:?}");
        assert!(!printed.contains(&token), "{printed}");
        assert!(!printed.contains(&remembered[0]), "a remembered token's hash printed: {printed}");
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        assert!(printed.contains("REDACTED"));
    }

    #[test]
    fn a_remembered_token_is_refused_once_its_key_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = issuer(dir.path(), "api");
        let token = tokens.issue(subject(Uuid::new_v4(), 1)).expect("issue");
        let first = tokens.verify(&token).expect("verifies");
        assert_eq!(tokens.verify(&token).expect("verifies again, from memory"), first);
        let elsewhere = tempfile::tempdir().expect("tempdir");
        tokens.replace_keys(KeySet::load(elsewhere.path(), false).expect("keys"));
        assert!(tokens.verify(&token).is_err(), "the key that signed it no longer verifies");
    }

    #[test]
    fn a_token_expires_when_its_issuers_clock_passes_its_lifetime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = crate::clock::TestClock::new();
        let tokens = issuer(dir.path(), "api").with_clock(clock.clone());
        let token = tokens.issue(subject(Uuid::new_v4(), 1)).expect("issue");
        assert!(tokens.verify(&token).is_ok(), "fresh");
        clock.advance(Duration::from_secs(60 + u64::try_from(LEEWAY_SECS).unwrap_or(5) + 1));
        let refused = tokens.verify(&token).expect_err("expired, also when remembered as verified");
        assert_eq!(refused.0, "token expired");
        let fresh = issuer(dir.path(), "api").with_clock(clock.clone());
        let issued_later = fresh.issue(subject(Uuid::new_v4(), 1)).expect("issue");
        assert!(fresh.verify(&issued_later).is_ok(), "a token issued on the moved clock is valid on it");
    }

    #[test]
    fn download_tokens_and_access_tokens_are_never_taken_for_each_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = crate::clock::TestClock::new();
        let tokens = issuer(dir.path(), "api").with_clock(clock.clone());
        let access = tokens.issue(subject(Uuid::new_v4(), 2)).expect("issue");
        let claims = tokens.verify(&access).expect("verifies");
        let (file, other) = (Uuid::new_v4(), Uuid::new_v4());
        let download = tokens.issue_download(file, &claims, Duration::from_secs(30)).expect("issue download");

        let verified = tokens.verify_download(&download, file).expect("a download token for its file");
        assert_eq!((verified.sub, verified.file, verified.sv, verified.sid), (claims.sub, file, 2, claims.sid));
        assert_eq!(
            tokens.verify_download(&download, other).expect_err("another file").0,
            "download token is for another file"
        );
        assert!(tokens.verify(&download).is_err(), "a download token is no access token");
        assert!(tokens.verify_download(&access, file).is_err(), "an access token is no download token");

        clock.advance(Duration::from_secs(30 + u64::try_from(LEEWAY_SECS).unwrap_or(5) + 1));
        assert_eq!(tokens.verify_download(&download, file).expect_err("expired").0, "download token expired");
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = issuer(dir.path(), "api");
        let token = tokens.issue(subject(Uuid::new_v4(), 0)).expect("issue");
        // Another audience.
        let other_dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            std::fs::read_dir(dir.path()).expect("dir").next().expect("key").expect("entry").path(),
            other_dir.path().join("x.pem"),
        )
        .expect("copy");
        assert!(issuer(dir.path(), "other").verify(&token).is_err());
        // Another key.
        let stranger = tempfile::tempdir().expect("tempdir");
        assert!(issuer(stranger.path(), "api").verify(&token).is_err());
        // alg: none.
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = token.split('.').nth(1).expect("payload");
        let none = format!("{}.{payload}.", engine.encode(br#"{"alg":"none","typ":"JWT"}"#));
        assert!(tokens.verify(&none).is_err());
        // Tampered payload.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = engine.encode(br#"{"sub":"00000000-0000-0000-0000-000000000000"}"#);
        assert!(tokens.verify(&parts.join(".")).is_err());
    }
}
