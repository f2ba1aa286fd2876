//! Access tokens: short-lived EdDSA JWTs carrying roles, permissions and the session version.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::KeySet;

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
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
}

/// Signs and verifies access tokens with the key set.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    keys: Arc<KeySet>,
    issuer: String,
    audience: String,
    ttl: Duration,
}

/// Why a token was refused (the message goes to the client as UNAUTHENTICATED).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

impl TokenIssuer {
    /// An issuer over `keys`.
    #[must_use]
    pub fn new(keys: Arc<KeySet>, issuer: &str, audience: &str, ttl: Duration) -> Self {
        Self { keys, issuer: issuer.to_owned(), audience: audience.to_owned(), ttl }
    }

    /// Lifetime of new tokens.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The key set (for JWKS).
    #[must_use]
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Signs a token for `user`.
    ///
    /// # Errors
    /// When there is no signing key or signing fails.
    pub fn issue(
        &self,
        user: Uuid,
        roles: Vec<String>,
        perms: Vec<String>,
        sv: u64,
        sid: Uuid,
    ) -> anyhow::Result<String> {
        let (kid, key) = self.keys.signing().ok_or_else(|| anyhow::anyhow!("no signing key"))?;
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user,
            roles,
            perms,
            sv,
            sid,
            iat: now,
            exp: now + i64::try_from(self.ttl.as_secs()).unwrap_or(900),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, &claims, key)?)
    }

    /// Verifies signature, algorithm (EdDSA only: `none` and HS256 are refused), key id,
    /// expiry, issuer and audience.
    ///
    /// # Errors
    /// A [`TokenError`] saying why.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError("malformed token".into()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError("token algorithm not accepted".into()));
        }
        let kid = header.kid.ok_or_else(|| TokenError("token has no key id".into()))?;
        let key = self.keys.decoding(&kid).ok_or_else(|| TokenError("token signed by an unknown key".into()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, key, &validation).map(|d| d.claims).map_err(|e| {
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

    fn issuer(dir: &std::path::Path, audience: &str) -> TokenIssuer {
        let keys = KeySet::load(dir, false).expect("keys");
        TokenIssuer::new(Arc::new(keys), "cairn", audience, Duration::from_secs(60))
    }

    #[test]
    fn a_token_verifies_with_its_claims() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = issuer(dir.path(), "api");
        let user = Uuid::new_v4();
        let token =
            tokens.issue(user, vec!["user".into()], vec!["profile:write".into()], 3, Uuid::new_v4()).expect("issue");
        let claims = tokens.verify(&token).expect("verifies");
        assert_eq!((claims.sub, claims.sv), (user, 3));
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = issuer(dir.path(), "api");
        let token = tokens.issue(Uuid::new_v4(), vec![], vec![], 0, Uuid::new_v4()).expect("issue");
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
