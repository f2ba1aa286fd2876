//! The authenticated caller, extracted from `Authorization: Bearer …`.

use axum::extract::{FromRef, FromRequestParts, OptionalFromRequestParts};
use axum::http::request::Parts;
use uuid::Uuid;

use std::sync::Arc;

use super::{Claims, SessionVersions, TokenIssuer};
use crate::http::limits::Limiter;
use crate::http::ApiError;

/// What authentication needs: the keys, the session-version map and the per-user rate limit.
#[derive(Debug, Clone)]
pub struct AuthState {
    /// Verifies (and on the command side, issues) tokens.
    pub tokens: TokenIssuer,
    /// Current session versions.
    pub sessions: SessionVersions,
    /// Per-user limit on authenticated calls (`CAIRN_RATE_LIMIT_USER`), on top of the per-IP one.
    pub user_limits: Option<Arc<Limiter<Uuid>>>,
    /// Permissions that also need a verified email address (`CAIRN_VERIFIED_EMAIL_FOR`).
    pub verified_email_for: Arc<Vec<String>>,
}

/// A caller with a valid, current access token. Permissions come from the token, never the
/// database, less any a role has lost since (the in-memory role map, fed by the stream).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The verified claims.
    pub claims: Claims,
    verified_email_for: Arc<Vec<String>>,
}

impl Caller {
    /// The caller's user id.
    #[must_use]
    pub fn id(&self) -> Uuid {
        self.claims.sub
    }

    /// Whether the caller holds the admin role (moderates every room, manages every file).
    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.claims.roles.iter().any(|r| r == "admin")
    }

    /// Whether the token grants `permission`.
    #[must_use]
    pub fn has(&self, permission: &str) -> bool {
        self.claims.perms.iter().any(|p| p == permission)
    }

    /// Requires `permission`, and a verified email where the deployment says that permission needs one.
    ///
    /// # Errors
    /// FORBIDDEN naming the missing permission; EMAIL_NOT_VERIFIED.
    pub fn require(&self, permission: &str) -> Result<(), ApiError> {
        if !self.has(permission) {
            return Err(ApiError::Forbidden(format!("this action needs the '{permission}' permission")));
        }
        if self.verified_email_for.iter().any(|p| p == permission) {
            self.require_verified_email()?;
        }
        Ok(())
    }

    /// Requires a verified email address.
    ///
    /// # Errors
    /// EMAIL_NOT_VERIFIED.
    pub fn require_verified_email(&self) -> Result<(), ApiError> {
        if self.claims.ev {
            Ok(())
        } else {
            Err(ApiError::EmailNotVerified)
        }
    }

    /// Requires `permission`, unless the caller is `user` itself.
    ///
    /// # Errors
    /// FORBIDDEN.
    pub fn require_self_or(&self, user: Uuid, permission: &str) -> Result<(), ApiError> {
        if self.id() == user {
            Ok(())
        } else {
            self.require(permission)
        }
    }
}

fn authenticate(parts: &Parts, auth: &AuthState) -> Result<Option<Caller>, ApiError> {
    let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = header.to_str().map_err(|_| ApiError::Unauthenticated("malformed Authorization header".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthenticated("expected 'Authorization: Bearer <token>'".into()))?;
    let caller = auth.caller(token)?;
    if let Some(limits) = &auth.user_limits {
        limits.check(&caller.claims.sub)?;
    }
    Ok(Some(caller))
}

impl AuthState {
    /// The caller a bearer token stands for, when it is valid and its session current (no rate
    /// limit applied): what the HTTP extractor and a socket's `auth` frame both check.
    ///
    /// # Errors
    /// UNAUTHENTICATED when the token is malformed, expired, wrongly signed or its session over.
    pub fn caller(&self, token: &str) -> Result<Caller, ApiError> {
        let mut claims = self.tokens.verify(token).map_err(|e| ApiError::Unauthenticated(e.0))?;
        if !self.sessions.is_current(claims.sub, claims.sv, claims.sid) {
            return Err(ApiError::Unauthenticated("session has ended; sign in again".into()));
        }
        // A permission taken from a role since the token was issued is gone at once.
        claims.perms = self.sessions.still_granted(&claims.roles, std::mem::take(&mut claims.perms));
        Ok(Caller { claims, verified_email_for: Arc::clone(&self.verified_email_for) })
    }

    /// The caller a download token for `file_id` stands for: its user, with the access token's
    /// session still current, holding `files:read` only if one of its roles still grants it.
    /// The per-user rate limit applies as to a bearer token.
    ///
    /// # Errors
    /// UNAUTHENTICATED when the token is malformed, expired, wrongly signed, for another file, or
    /// its session is over; RATE_LIMITED.
    pub fn download_caller(&self, token: &str, file_id: Uuid) -> Result<Caller, ApiError> {
        let download = self.tokens.verify_download(token, file_id).map_err(|e| ApiError::Unauthenticated(e.0))?;
        if !self.sessions.is_current(download.sub, download.sv, download.sid) {
            return Err(ApiError::Unauthenticated("session has ended; sign in again".into()));
        }
        if let Some(limits) = &self.user_limits {
            limits.check(&download.sub)?;
        }
        let perms = self.sessions.still_granted(&download.roles, vec!["files:read".to_owned()]);
        let claims = Claims {
            sub: download.sub,
            roles: download.roles,
            perms,
            sv: download.sv,
            sid: download.sid,
            ev: download.ev,
            iat: download.iat,
            exp: download.exp,
            iss: download.iss,
            aud: download.aud,
        };
        Ok(Caller { claims, verified_email_for: Arc::clone(&self.verified_email_for) })
    }
}

impl<S> FromRequestParts<S> for Caller
where
    AuthState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        authenticate(parts, &AuthState::from_ref(state))?
            .ok_or_else(|| ApiError::Unauthenticated("authentication required".into()))
    }
}

impl<S> OptionalFromRequestParts<S> for Caller
where
    AuthState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Option<Self>, Self::Rejection> {
        authenticate(parts, &AuthState::from_ref(state))
    }
}
