//! HTTP handlers of sign-in and sessions.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cairn_domain::{Email, RevokeReason, SessionsEndedReason, User, UserCommand, UserEvent, UserStatus};
use cairn_platform::auth::{AuthState, Caller};
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, RequestContext};
use cairn_platform::secrets::hash_token;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::guard::Admission;
use super::sessions::access_token;
use super::{LoginGuard, RefreshCookie, SessionService};
use crate::answers::{AcceptedData, EmailVerifiedData, SessionIdData, SignInData, TokensData, UserIdData};
use crate::users::UserCommands;
use crate::CommandState;
use cairn_platform::http::Envelope;

/// The sign-in and session routes.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(change_password))
        .routes(routes!(verify_email))
        .routes(routes!(resend_verification))
        .routes(routes!(request_password_reset))
        .routes(routes!(confirm_password_reset))
        .routes(routes!(end_my_session))
        .routes(routes!(end_user_sessions))
}

/// Adds `Set-Cookie` to an answer.
pub(crate) fn with_cookie(response: impl IntoResponse, cookie: Option<HeaderValue>) -> Response {
    let mut response = response.into_response();
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

fn tokens_body(access: String, auth: &AuthState, refresh_in_body: Option<&str>) -> Value {
    let mut body = json!({ "access_token": access, "token_type": "Bearer", "expires_in": auth.tokens.ttl().as_secs() });
    if let Some(refresh) = refresh_in_body {
        body["refresh_token"] = json!(refresh);
    }
    body
}

/// `POST /api/v1/auth/login` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    /// The address signed up with (any text: a wrong one is a wrong sign-in, 401).
    email: String,
    /// The password.
    password: String,
    /// Native clients: return the refresh token in the body instead of a cookie.
    #[serde(default)]
    refresh_token_in_body: bool,
}

impl std::fmt::Debug for LoginBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginBody")
            .field("email", &self.email)
            .field("refresh_token_in_body", &self.refresh_token_in_body)
            .field("password", &"REDACTED")
            .finish()
    }
}

/// Signs in: an access token, and a refresh token in an HttpOnly cookie (or the body for native
/// clients). Five wrong passwords for one address lock it, for a minute doubling up to 15; an
/// address nobody registered is answered and locked the same way.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginBody,
    responses((status = 200, description = "access_token, token_type, expires_in, user; refresh cookie", body = Envelope<SignInData>,
               headers(("set-cookie" = String, description = "the refresh token, HttpOnly, unless asked for in the body"))),
              (status = 401, description = "wrong email or password, or account not active"),
              (status = 423, description = "ACCOUNT_LOCKED with details.retry_after_s")))]
async fn login(
    State(state): State<CommandState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Response, ApiError> {
    let refused = || ApiError::Unauthenticated("invalid email or password".to_owned());
    // Decided by the database before anything else: a locked address, known or not, is refused
    // here, with nothing looked up and nothing hashed.
    let reservation = match state.guard.admit(&LoginGuard::key(&body.email)).await? {
        Admission::Granted(reservation) => reservation,
        Admission::Refused { retry_after_s } => return Err(ApiError::AccountLocked { retry_after_s }),
    };
    let users = &state.users;
    let id = match Email::parse(&body.email) {
        Ok(email) => users.find_id_by_email(&email).await?,
        Err(_) => None,
    };
    let user = match id {
        Some(id) => Some((id, users.load(id).await?)),
        None => None,
    };
    let hash = user.as_ref().map(|(_, u)| u.password_hash.expose().to_owned());
    // Unknown accounts are checked against a dummy hash: the answer takes as long either way.
    let matches = users.passwords().verify(body.password, hash).await?;
    if !matches {
        let failure = reservation.wrong().await?;
        if let Some((id, account)) = &user {
            let command = UserCommand::RecordLoginFailure { failures: failure.failures, lock: failure.lock };
            record_sign_in(&state, *id, account, command, &ctx).await;
        }
        return Err(match failure.lock {
            Some(lock) => ApiError::AccountLocked {
                retry_after_s: u64::try_from((lock.until - state.clock.now()).num_seconds()).unwrap_or(0).max(1),
            },
            None => refused(),
        });
    }
    // Right, but a lock that began while it was checked still holds.
    if let Some(retry_after_s) = reservation.right().await? {
        return Err(ApiError::AccountLocked { retry_after_s });
    }
    let Some((id, account)) = user else { return Err(refused()) };
    match account.status {
        UserStatus::Active => {}
        UserStatus::Deactivated => return Err(ApiError::Unauthenticated("account is deactivated".to_owned())),
        _ => return Err(refused()),
    }
    record_sign_in(&state, id, &account, UserCommand::RecordLoginSuccess, &ctx).await;
    complete_sign_in(&state, id, &account, &ctx, body.refresh_token_in_body).await
}

/// How many times an audit event of a sign-in is tried when other commands on the account got
/// there first: the guard lets at most the lockout threshold's worth of them race.
const AUDIT_ATTEMPTS: u32 = 10;

/// Records on the account what the guard decided (LoginFailed, AccountLocked, LoginSucceeded),
/// after an AccountUnlocked when the lock it last recorded has run out. The guard, not these
/// events, decides who may sign in: they are the audit trail, so a sign-in never fails because
/// one could not be written; a lost race is retried, anything else is logged.
async fn record_sign_in(state: &CommandState, id: Uuid, account: &User, command: UserCommand, ctx: &RequestContext) {
    let now = state.clock.now();
    let mut commands = Vec::with_capacity(2);
    if account.locked_until.is_some_and(|until| until <= now) {
        commands.push(UserCommand::UnlockAccount { at: now });
    }
    commands.push(command);
    for command in commands {
        let recorded = state.users.execute_retrying(id, command, ctx, Some(id), AUDIT_ATTEMPTS).await;
        match recorded {
            Ok(_) => {}
            // Refused on the account's own state: recorded already by a request that came first.
            Err(e @ ApiError::Conflict(_)) => tracing::debug!(user_id = %id, error = %e, "sign-in recorded already"),
            Err(e) => tracing::warn!(user_id = %id, error = %e, "sign-in not recorded on the account"),
        }
    }
}

/// Starts a session for a user who proved who they are, and answers with the tokens: the refresh
/// token as an HttpOnly cookie, or in the body for native clients.
pub(crate) async fn complete_sign_in(
    state: &CommandState,
    id: Uuid,
    account: &User,
    ctx: &RequestContext,
    refresh_in_body: bool,
) -> Result<Response, ApiError> {
    let (sid, refresh_token, _) = state.sessions.start(id, account, ctx).await?;
    let access = access_token(&state.auth.tokens, state.users.roles(), id, account, sid).await?;
    let perms = state.users.roles().permissions_for(&account.roles.iter().cloned().collect::<Vec<_>>()).await?;
    let mut data = tokens_body(access, &state.auth, refresh_in_body.then_some(refresh_token.as_str()));
    data["user"] = json!({
        "id": id, "email": account.email, "display_name": account.display_name,
        "roles": account.roles, "permissions": perms, "email_verified": account.email_verified,
    });
    data["session_id"] = json!(sid);
    let cookie = (!refresh_in_body).then(|| state.cookie.set(&refresh_token, state.sessions_lifetime_secs));
    Ok(with_cookie(ApiResponse::ok(data), cookie))
}

/// `POST /api/v1/auth/refresh` body (native clients; browsers send the cookie and no body).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    /// The refresh token of the last sign-in or refresh: `<session id>.<secret>`.
    #[schema(pattern = r"^[0-9a-fA-F-]{36}\.[A-Za-z0-9_-]{43}$")]
    refresh_token: String,
}

impl std::fmt::Debug for RefreshBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshBody").field("refresh_token", &"REDACTED").finish()
    }
}

/// Where a refresh token came from decides where the next one goes.
enum Presented {
    Cookie(String),
    Body(String),
}

fn presented_refresh(headers: &HeaderMap, body: &Bytes, cookie: &RefreshCookie) -> Result<Presented, ApiError> {
    // Native clients send the token in the body; no body (or `null`) means the cookie.
    if let Some(parsed) = cairn_platform::http::json_from_slice::<RefreshBody>(body)? {
        return Ok(Presented::Body(parsed.refresh_token));
    }
    let token = RefreshCookie::read(headers).ok_or_else(|| ApiError::Unauthenticated("no refresh token".to_owned()))?;
    cookie.check_origin(headers)?;
    Ok(Presented::Cookie(token))
}

/// Rotates the refresh token and issues a new access token. Reusing an already-rotated token
/// ends the whole sign-in (except the one just rotated, within a short grace interval).
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body(content = Option<RefreshBody>),
    responses((status = 200, description = "access_token; the next refresh token (cookie or body)", body = Envelope<TokensData>),
              (status = 401, description = "refresh token unknown, expired, idle, revoked or reused"),
              (status = 403, description = "cookie sent from an origin that is not allowed")))]
async fn refresh(
    State(state): State<CommandState>,
    ctx: RequestContext,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let presented = presented_refresh(&headers, &body, &state.cookie)?;
    let (token, from_cookie) = match &presented {
        Presented::Cookie(t) => (t.as_str(), true),
        Presented::Body(t) => (t.as_str(), false),
    };
    let refreshed = match state.sessions.refresh(token, &state.users, &ctx).await {
        Ok(r) => r,
        Err(e) => {
            let clear = from_cookie.then(|| state.cookie.clear());
            return Ok(with_cookie(e, clear));
        }
    };
    let access =
        access_token(&state.auth.tokens, state.users.roles(), refreshed.user_id, &refreshed.user, refreshed.sid)
            .await?;
    let next = refreshed.refresh_token.as_deref();
    let data = tokens_body(access, &state.auth, if from_cookie { None } else { next });
    let cookie = if from_cookie { next.map(|t| state.cookie.set(t, refreshed.remaining_secs)) } else { None };
    Ok(with_cookie(ApiResponse::ok(data), cookie))
}

/// Signs out of this session.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "signed out", body = Envelope<SessionIdData>),
              (status = 403, description = "the refresh cookie came from an origin that is not allowed"),
              (status = 409, description = "the session has ended already")))]
async fn logout(
    State(state): State<CommandState>,
    caller: Caller,
    ctx: RequestContext,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if RefreshCookie::read(&headers).is_some() {
        state.cookie.check_origin(&headers)?;
    }
    let token =
        state.sessions.revoke(caller.claims.sid, Some(caller.id()), RevokeReason::Logout, &ctx, caller.id()).await?;
    let answer = ApiResponse::ok(json!({ "session_id": caller.claims.sid })).consistency(token);
    Ok(with_cookie(answer, Some(state.cookie.clear())))
}

/// Signs out everywhere: every session and access token of the caller ends.
#[utoipa::path(post, path = "/api/v1/auth/logout-all", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "signed out everywhere", body = Envelope<UserIdData>),
              (status = 403, description = "the refresh cookie came from an origin that is not allowed"),
              (status = 404, description = "the caller's account is gone")))]
async fn logout_all(
    State(state): State<CommandState>,
    caller: Caller,
    ctx: RequestContext,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if RefreshCookie::read(&headers).is_some() {
        state.cookie.check_origin(&headers)?;
    }
    let command = UserCommand::EndAllSessions { reason: SessionsEndedReason::LogoutAll };
    let token = state.users.execute(caller.id(), command, &ctx, Some(caller.id())).await?;
    let answer = ApiResponse::ok(json!({ "user_id": caller.id() })).consistency(token);
    Ok(with_cookie(answer, Some(state.cookie.clear())))
}

/// `POST /api/v1/auth/password` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordBody {
    /// The password now.
    current_password: String,
    /// 8 to 128 characters, and strong enough.
    #[schema(min_length = 8, max_length = 128)]
    new_password: String,
}

impl std::fmt::Debug for ChangePasswordBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangePasswordBody")
            .field("current_password", &"REDACTED")
            .field("new_password", &"REDACTED")
            .finish()
    }
}

/// Changes the caller's password (PasswordChanged). Every other session ends; this one goes on
/// with the new access token in the answer.
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", request_body = ChangePasswordBody, security(("bearer" = [])),
    responses((status = 200, description = "changed; a new access_token", body = Envelope<TokensData>),
              (status = 400, description = "new password too weak"),
              (status = 401, description = "current password wrong"), (status = 404, description = "the caller's account is gone")))]
async fn change_password(
    State(state): State<CommandState>,
    caller: Caller,
    ctx: RequestContext,
    ApiJson(body): ApiJson<ChangePasswordBody>,
) -> Result<ApiResponse<Value>, ApiError> {
    let id = caller.id();
    let user = state.users.load(id).await?;
    if !state.users.passwords().verify(body.current_password, Some(user.password_hash.expose().to_owned())).await? {
        return Err(ApiError::Unauthenticated("current password is wrong".to_owned()));
    }
    let password_hash = state.users.hash_new_password(body.new_password, &user, "new_password").await?;
    state
        .users
        .execute(id, UserCommand::ChangePassword { password_hash: password_hash.into() }, &ctx, Some(id))
        .await?;
    let user = state.users.load(id).await?;
    let token = state.sessions.rebind(caller.claims.sid, user.session_version, &ctx, id).await?;
    let access = access_token(&state.auth.tokens, state.users.roles(), id, &user, caller.claims.sid).await?;
    Ok(ApiResponse::ok(tokens_body(access, &state.auth, None)).consistency(token))
}

/// An emailed token that was consumed: spent for good once the command it allowed succeeded, or
/// given back with [`SpentEmailToken::give_back`] when that command failed.
///
/// No transaction is held from the token to the command: the command runs in transactions of its
/// own (and may wait for a pool connection), and a transaction that holds a transaction id
/// holds back the relay for the whole cluster. Single use is decided by the database: the token
/// is consumed by one conditional `UPDATE`, which only one request can win.
struct SpentEmailToken {
    hash: String,
    user_id: Uuid,
    used_at: chrono::DateTime<Utc>,
}

impl SpentEmailToken {
    /// Consumes an emailed token of `purpose`, unless it is unknown, expired, used already or
    /// superseded.
    async fn take(pool: &sqlx::PgPool, token: &str, purpose: &str) -> Result<Self, ApiError> {
        let hash = hash_token(token);
        let row: Option<(Uuid, chrono::DateTime<Utc>)> = sqlx::query_as(&format!(
            "UPDATE email_tokens t SET used_at = clock_timestamp() \
             WHERE t.token_hash = $1 AND t.purpose = $2 AND t.used_at IS NULL AND t.expires_at > now() \
               AND {NOT_SUPERSEDED} \
             RETURNING t.user_id, t.used_at"
        ))
        .bind(&hash)
        .bind(purpose)
        .bind(superseded_by(purpose))
        .fetch_optional(pool)
        .await?;
        let (user_id, used_at) = row.ok_or_else(invalid_email_token)?;
        Ok(Self { hash, user_id, used_at })
    }

    /// Makes the token usable again after the command it allowed failed, so a failure never
    /// burns it. Only this consumption is undone (matched by its time stamp). Best effort: if
    /// Postgres is gone too, the user asks for a new link.
    async fn give_back(self, pool: &sqlx::PgPool) {
        let restored = sqlx::query("UPDATE email_tokens SET used_at = NULL WHERE token_hash = $1 AND used_at = $2")
            .bind(&self.hash)
            .bind(self.used_at)
            .execute(pool)
            .await;
        if let Err(e) = restored {
            tracing::warn!(user_id = %self.user_id, error = %e, "cannot give back an emailed token after a failed command");
        }
    }
}

/// The user an unspent, unexpired, current emailed token of `purpose` belongs to, without
/// consuming it.
async fn peek_email_token(pool: &sqlx::PgPool, token: &str, purpose: &str) -> Result<Uuid, ApiError> {
    let user: Option<Uuid> = sqlx::query_scalar(&format!(
        "SELECT t.user_id FROM email_tokens t \
         WHERE t.token_hash = $1 AND t.purpose = $2 AND t.used_at IS NULL AND t.expires_at > now() \
           AND {NOT_SUPERSEDED}"
    ))
    .bind(hash_token(token))
    .bind(purpose)
    .bind(superseded_by(purpose))
    .fetch_optional(pool)
    .await?;
    user.ok_or_else(invalid_email_token)
}

/// A token `t` is current while its account's stream holds none of the events `$3` after the
/// event that asked for the mail: decided from the log, in the statement that reads or spends
/// the token, so a link mailed earlier dies the moment a newer one is asked for or the password
/// changes, whether or not the newer mail has gone out yet.
const NOT_SUPERSEDED: &str = "NOT EXISTS (SELECT 1 FROM events asked JOIN events later \
       ON later.aggregate_type = asked.aggregate_type AND later.aggregate_id = asked.aggregate_id \
      AND later.sequence > asked.sequence \
    WHERE asked.event_id = t.event_id AND later.event_type = ANY($3))";

/// The events that end a token of `purpose`.
fn superseded_by(purpose: &str) -> &'static [&'static str] {
    match purpose {
        "reset_password" => UserEvent::ENDS_RESET_LINKS,
        _ => &[],
    }
}

fn invalid_email_token() -> ApiError {
    ApiError::field("token", "is invalid, expired or already used")
}

/// `POST /api/v1/auth/verify-email` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyEmailBody {
    /// The token from the mailed link.
    #[schema(pattern = r"^[A-Za-z0-9_-]{43}$")]
    token: String,
}

impl std::fmt::Debug for VerifyEmailBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyEmailBody").field("token", &"REDACTED").finish()
    }
}

/// Verifies the email address with the emailed token (EmailVerified).
#[utoipa::path(post, path = "/api/v1/auth/verify-email", tag = "auth", request_body = VerifyEmailBody,
    responses((status = 200, description = "verified", body = Envelope<EmailVerifiedData>),
              (status = 400, description = "token invalid, expired or used")))]
async fn verify_email(
    State(state): State<CommandState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<VerifyEmailBody>,
) -> Result<ApiResponse<Value>, ApiError> {
    let spent = SpentEmailToken::take(&state.pool, &body.token, "verify_email").await?;
    let id = spent.user_id;
    let token = match state.users.execute(id, UserCommand::VerifyEmail, &ctx, Some(id)).await {
        Ok(token) => Some(token),
        // Verified already (an older link): the token is spent all the same.
        Err(ApiError::Conflict(_)) => None,
        Err(e) => {
            spent.give_back(&state.pool).await;
            return Err(e);
        }
    };
    let answer = ApiResponse::ok(json!({ "user_id": id, "email_verified": true }));
    Ok(match token {
        Some(t) => answer.consistency(t),
        None => answer,
    })
}

/// `POST /api/v1/auth/verify-email/resend` and `/password-reset` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailBody {
    /// The account's address.
    #[schema(format = Email, max_length = 254)]
    email: String,
}

/// Runs `command` for the account of `email`, if there is one, after answering: the answer is the
/// same, and takes the same time, whether or not the address has an account. Each address may
/// ask only a few times an hour, and at most [`MAIL_REQUESTS_IN_FLIGHT`] requests are looked up at
/// once: a flood of addresses is dropped rather than queued without bound behind the database.
/// Only text that is no address at all is refused.
fn request_mail(
    state: &CommandState,
    email: &str,
    ctx: RequestContext,
    command: fn(&User) -> Option<UserCommand>,
) -> Result<(), ApiError> {
    let email = Email::parse(email).map_err(|e| ApiError::field("email", e.0))?;
    if state.mail_requests.as_ref().is_some_and(|limit| limit.check(&email.as_str().to_owned()).is_err()) {
        return Ok(());
    }
    let Ok(permit) = Arc::clone(&state.mail_lookups).try_acquire_owned() else {
        metrics::counter!("cairn_mail_requests_dropped_total").increment(1);
        return Ok(());
    };
    let users = state.users.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let Ok(Some(id)) = users.find_id_by_email(&email).await else { return };
        let Ok(user) = users.load(id).await else { return };
        if let Some(command) = command(&user) {
            if let Err(e) = users.execute(id, command, &ctx, Some(id)).await {
                tracing::info!(error = %e, "mail request not recorded");
            }
        }
    });
    Ok(())
}

fn accepted() -> ApiResponse<Value> {
    ApiResponse::with_status(StatusCode::ACCEPTED, json!({ "accepted": true }))
}

/// Sends the verification mail again, if the address has an unverified account. Always 202.
#[utoipa::path(post, path = "/api/v1/auth/verify-email/resend", tag = "auth", request_body = EmailBody,
    responses((status = 202, description = "accepted, whether or not the address has an account", body = Envelope<AcceptedData>),
              (status = 400, description = "not an email address")))]
async fn resend_verification(
    State(state): State<CommandState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<EmailBody>,
) -> Result<ApiResponse<Value>, ApiError> {
    request_mail(&state, &body.email, ctx, |user| {
        (!user.email_verified).then_some(UserCommand::RequestEmailVerification)
    })?;
    Ok(accepted())
}

/// Sends a password-reset mail, if the address has an active account. Always 202.
#[utoipa::path(post, path = "/api/v1/auth/password-reset", tag = "auth", request_body = EmailBody,
    responses((status = 202, description = "accepted, whether or not the address has an account", body = Envelope<AcceptedData>),
              (status = 400, description = "not an email address")))]
async fn request_password_reset(
    State(state): State<CommandState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<EmailBody>,
) -> Result<ApiResponse<Value>, ApiError> {
    request_mail(&state, &body.email, ctx, |user| {
        (user.status == UserStatus::Active).then_some(UserCommand::RequestPasswordReset)
    })?;
    Ok(accepted())
}

/// `POST /api/v1/auth/password-reset/confirm` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmResetBody {
    /// The token from the mailed link.
    #[schema(pattern = r"^[A-Za-z0-9_-]{43}$")]
    token: String,
    /// 8 to 128 characters, and strong enough.
    #[schema(min_length = 8, max_length = 128)]
    new_password: String,
}

impl std::fmt::Debug for ConfirmResetBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfirmResetBody").field("token", &"REDACTED").field("new_password", &"REDACTED").finish()
    }
}

/// Sets a new password with the emailed token (PasswordReset); every session ends.
#[utoipa::path(post, path = "/api/v1/auth/password-reset/confirm", tag = "auth", request_body = ConfirmResetBody,
    responses((status = 200, description = "password set; sign in again", body = Envelope<UserIdData>),
              (status = 400, description = "token invalid, expired or used, or password too weak")))]
async fn confirm_password_reset(
    State(state): State<CommandState>,
    ctx: RequestContext,
    ApiJson(body): ApiJson<ConfirmResetBody>,
) -> Result<ApiResponse<Value>, ApiError> {
    // Checked, not consumed, while the password is checked and hashed (slow on purpose): a weak
    // password leaves the token unspent, and no transaction waits on the hashing.
    let id = peek_email_token(&state.pool, &body.token, "reset_password").await?;
    let user = state.users.load(id).await?;
    let password_hash = state.users.hash_new_password(body.new_password, &user, "new_password").await?;
    // Consumed now; a request with the same token that got here first wins, this one is refused.
    let spent = SpentEmailToken::take(&state.pool, &body.token, "reset_password").await?;
    let token = match state
        .users
        .execute(id, UserCommand::ResetPassword { password_hash: password_hash.into() }, &ctx, Some(id))
        .await
    {
        Ok(token) => token,
        Err(e) => {
            spent.give_back(&state.pool).await;
            return Err(e);
        }
    };
    Ok(ApiResponse::ok(json!({ "user_id": id })).consistency(token))
}

/// Ends one of the caller's sessions.
#[utoipa::path(delete, path = "/api/v1/users/me/sessions/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "session id")),
    responses((status = 200, description = "ended", body = Envelope<SessionIdData>), (status = 404, description = "not one of the caller's sessions"),
              (status = 409, description = "already ended")))]
async fn end_my_session(
    State(sessions): State<SessionService>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(sid): ApiPath<Uuid>,
) -> Result<ApiResponse<Value>, ApiError> {
    let token = sessions.revoke(sid, Some(caller.id()), RevokeReason::UserRevoked, &ctx, caller.id()).await?;
    Ok(ApiResponse::ok(json!({ "session_id": sid })).consistency(token))
}

/// Ends every session of a user (SessionsEnded). Needs `users:write`.
#[utoipa::path(delete, path = "/api/v1/users/{id}/sessions", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 200, description = "ended", body = Envelope<UserIdData>), (status = 403, description = "lacks users:write"),
              (status = 404, description = "no such user")))]
async fn end_user_sessions(
    State(users): State<UserCommands>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<ApiResponse<Value>, ApiError> {
    caller.require("users:write")?;
    let command = UserCommand::EndAllSessions { reason: SessionsEndedReason::Administrator };
    let token = users.execute(id, command, &ctx, Some(caller.id())).await?;
    Ok(ApiResponse::ok(json!({ "user_id": id })).consistency(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `T` read from `json` as a request would be, then printed with `{:?}` and `{:#?}`.
    fn printed<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: Value) -> String {
        let value: T = serde_json::from_value(json).expect("a valid body");
        format!("{value:?} {value:#?}")
    }

    #[test]
    fn request_bodies_print_no_password_token_or_code() {
        let secret = "s3cret-value-that-must-not-print";
        let printed = [
            printed::<LoginBody>(json!({ "email": "ada@example.com", "password": secret })),
            printed::<RefreshBody>(json!({ "refresh_token": secret })),
            printed::<ChangePasswordBody>(json!({ "current_password": secret, "new_password": secret })),
            printed::<VerifyEmailBody>(json!({ "token": secret })),
            printed::<ConfirmResetBody>(json!({ "token": secret, "new_password": secret })),
            printed::<crate::users::routes::RegisterBody>(
                json!({ "email": "ada@example.com", "password": secret, "display_name": "Ada" }),
            ),
            printed::<crate::oauth::routes::CallbackBody>(json!({ "code": secret, "state": secret })),
            format!(
                "{:?}",
                crate::users::RegisterUser {
                    email: "ada@example.com".into(),
                    password: secret.into(),
                    display_name: "Ada".into(),
                    roles: vec![],
                }
            ),
            format!(
                "{:?}",
                super::super::Refreshed {
                    sid: Uuid::nil(),
                    user_id: Uuid::nil(),
                    user: User { password_hash: secret.into(), ..User::default() },
                    refresh_token: Some(secret.into()),
                    remaining_secs: 1,
                }
            ),
        ];
        for text in printed {
            assert!(!text.contains(secret), "a secret printed: {text}");
            assert!(text.contains("REDACTED"), "{text}");
        }
    }
}
