//! The session service: starts sessions at sign-in, rotates refresh tokens, ends sessions, and
//! issues the access tokens that go with them.

use cairn_domain::{RefreshOutcome, RevokeReason, Session, SessionCommand, SessionPolicy, User, UserStatus};
use cairn_platform::auth::{SessionVersions, TokenIssuer, TokenSubject};
use cairn_platform::clock::SharedClock;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_platform::secrets::{hash_token, random_token};
use cairn_relay::RelayWakeup;
use sqlx::PgPool;
use uuid::Uuid;

use crate::executor::{Executor, Refusal};
use crate::roles::RoleCatalog;
use crate::users::UserCommands;

/// A refresh's result.
pub struct Refreshed {
    /// The session.
    pub sid: Uuid,
    /// Its user.
    pub user_id: Uuid,
    /// The user as of now.
    pub user: User,
    /// The next refresh token; `None` when the grace interval answered with the current session.
    pub refresh_token: Option<String>,
    /// Seconds until the session's absolute end.
    pub remaining_secs: i64,
}

impl std::fmt::Debug for Refreshed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refreshed")
            .field("sid", &self.sid)
            .field("user_id", &self.user_id)
            .field("user", &self.user)
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "REDACTED"))
            .field("remaining_secs", &self.remaining_secs)
            .finish()
    }
}

/// Starts, refreshes and ends sessions.
#[derive(Clone)]
pub struct SessionService {
    executor: Executor<Session>,
    policy: SessionPolicy,
    clock: SharedClock,
}

fn split_token(token: &str) -> Option<(Uuid, &str)> {
    let (sid, secret) = token.split_once('.')?;
    if secret.is_empty() {
        return None;
    }
    Some((sid.parse().ok()?, secret))
}

impl SessionService {
    /// A service over `pool` with `policy`, judging lifetimes by `clock`.
    #[must_use]
    pub fn new(
        pool: PgPool,
        sessions: SessionVersions,
        wake: RelayWakeup,
        policy: SessionPolicy,
        clock: SharedClock,
    ) -> Self {
        Self { executor: Executor::new(pool, sessions, wake), policy, clock }
    }

    /// Starts a session for `user_id` and returns its id and first refresh token (`<sid>.<secret>`).
    ///
    /// # Errors
    /// 503 when Postgres is down.
    pub async fn start(
        &self,
        user_id: Uuid,
        user: &User,
        ctx: &RequestContext,
    ) -> Result<(Uuid, String, ConsistencyToken), ApiError> {
        let secret = random_token()?;
        let sid = Uuid::now_v7();
        let command = SessionCommand::StartSession {
            user_id,
            session_version: user.session_version,
            refresh_hash: hash_token(&secret).into(),
            at: self.clock.now(),
            lifetime: self.policy.absolute,
            device: ctx.user_agent.clone(),
            ip: ctx.client_ip.clone(),
        };
        let position = self.executor.execute(&sid.to_string(), command, ctx, Some(user_id)).await?;
        Ok((sid, format!("{sid}.{secret}"), position))
    }

    /// Exchanges `presented` for the next refresh token.
    ///
    /// # Errors
    /// UNAUTHENTICATED when the token is unknown, expired, idle, revoked or reused (reuse ends the
    /// whole family).
    pub async fn refresh(
        &self,
        presented: &str,
        users: &UserCommands,
        ctx: &RequestContext,
    ) -> Result<Refreshed, ApiError> {
        let invalid = || ApiError::Unauthenticated("refresh token is not valid".to_owned());
        let (sid, secret) = split_token(presented).ok_or_else(invalid)?;
        let presented_hash = hash_token(secret);
        // Two refreshes racing on one session: the loser sees a concurrent-modification conflict,
        // reloads, and is then judged again (normally as the grace case).
        for _ in 0..3 {
            let session = self.executor.load(&sid.to_string()).await?;
            let user_id = session.user_id.ok_or_else(invalid)?;
            let user = users.load(user_id).await?;
            if user.status != UserStatus::Active {
                return Err(ApiError::Unauthenticated("account is not active".to_owned()));
            }
            let now = self.clock.now();
            let remaining_secs = session.expires_at.map_or(0, |e| (e - now).num_seconds());
            let outcome = session.refresh_outcome(&presented_hash, now, user.session_version, self.policy);
            let next_secret = random_token()?;
            let command = SessionCommand::RefreshSession {
                presented_hash: presented_hash.clone().into(),
                new_hash: hash_token(&next_secret).into(),
                at: now,
                user_session_version: user.session_version,
                policy: self.policy,
                ip: ctx.client_ip.clone(),
            };
            match outcome {
                RefreshOutcome::Grace => {
                    return Ok(Refreshed { sid, user_id, user, refresh_token: None, remaining_secs });
                }
                RefreshOutcome::Refused(e) => return Err(e.to_api()),
                RefreshOutcome::Rotate | RefreshOutcome::Reuse => {}
            }
            match self.executor.execute(&sid.to_string(), command, ctx, Some(user_id)).await {
                Ok(_) if outcome == RefreshOutcome::Reuse => {
                    tracing::warn!(session = %sid, user = %user_id, "refresh token reuse: session family revoked");
                    return Err(ApiError::Unauthenticated(
                        "refresh token was already used; this sign-in has been ended everywhere".to_owned(),
                    ));
                }
                Ok(_) => {
                    let token = format!("{sid}.{next_secret}");
                    return Ok(Refreshed { sid, user_id, user, refresh_token: Some(token), remaining_secs });
                }
                Err(ApiError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Conflict("the session is being refreshed concurrently; retry".to_owned()))
    }

    /// Ends session `sid`, which must belong to `owner` when given.
    ///
    /// # Errors
    /// NOT_FOUND when it is not the owner's; UNAUTHENTICATED when already ended.
    pub async fn revoke(
        &self,
        sid: Uuid,
        owner: Option<Uuid>,
        reason: RevokeReason,
        ctx: &RequestContext,
        actor: Uuid,
    ) -> Result<ConsistencyToken, ApiError> {
        let session = self.executor.load(&sid.to_string()).await?;
        if session.user_id.is_none() || (owner.is_some() && session.user_id != owner) {
            return Err(ApiError::NotFound("session not found".to_owned()));
        }
        if session.revoked.is_some() {
            return Err(ApiError::Conflict("session has already ended".to_owned()));
        }
        self.executor.execute(&sid.to_string(), SessionCommand::RevokeSession { reason }, ctx, Some(actor)).await
    }

    /// Keeps session `sid` alive after its user's version moved to `session_version`.
    ///
    /// # Errors
    /// When the session cannot be rebound.
    pub async fn rebind(
        &self,
        sid: Uuid,
        session_version: u64,
        ctx: &RequestContext,
        actor: Uuid,
    ) -> Result<ConsistencyToken, ApiError> {
        self.executor
            .execute(&sid.to_string(), SessionCommand::RebindSession { session_version }, ctx, Some(actor))
            .await
    }
}

/// Issues the access token of session `sid` for `user`, with permissions as the roles define them now.
///
/// # Errors
/// When Postgres fails or there is no signing key.
pub async fn access_token(
    tokens: &TokenIssuer,
    roles: &RoleCatalog,
    user_id: Uuid,
    user: &User,
    sid: Uuid,
) -> Result<String, ApiError> {
    let role_names: Vec<String> = user.roles.iter().cloned().collect();
    let perms = roles.permissions_for(&role_names).await?;
    Ok(tokens.issue(TokenSubject {
        user: user_id,
        roles: role_names,
        perms,
        sv: user.session_version,
        sid,
        email_verified: user.email_verified,
    })?)
}
