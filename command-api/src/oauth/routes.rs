//! `POST /api/v1/auth/oauth/{provider}/start` and `…/callback`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use cairn_domain::{Email, UserCommand, UserStatus};
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, RequestContext};
use cairn_platform::secrets::random_token;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Proof, StartMode, STATE_TTL_SECS};
use crate::answers::{OAuthStartData, SignInData};
use crate::auth::{complete_sign_in, with_cookie, RefreshCookie};
use crate::users::RegisterUser;
use crate::CommandState;
use cairn_platform::http::Envelope;

/// The OAuth routes.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new().routes(routes!(start)).routes(routes!(callback))
}

/// `POST /api/v1/auth/oauth/{provider}/start` body. A browser sends no body (or `{}`); a native
/// client sends its own PKCE challenge and later presents the verifier at the callback.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// Native clients: base64url (no padding) of the SHA-256 of the client's `code_verifier`.
    #[schema(pattern = "^[A-Za-z0-9_-]{43}$", min_length = 43, max_length = 43)]
    code_challenge: Option<String>,
    /// With `code_challenge`: `S256`, the only method accepted.
    #[schema(pattern = "^S256$", example = "S256")]
    code_challenge_method: Option<String>,
}

/// The mode a start body asks for.
fn start_mode(body: StartBody) -> Result<StartMode, ApiError> {
    match (body.code_challenge, body.code_challenge_method.as_deref()) {
        (None, None) => Ok(StartMode::Browser),
        (None, Some(_)) => Err(ApiError::field("code_challenge", "is required with code_challenge_method")),
        (Some(_), None) => Err(ApiError::field("code_challenge_method", "is required with code_challenge: S256")),
        (Some(_), Some(method)) if method != "S256" => {
            Err(ApiError::field("code_challenge_method", "must be S256 (plain is not accepted)"))
        }
        (Some(challenge), Some(_)) => {
            if challenge.len() == 43 && challenge.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                Ok(StartMode::Native { code_challenge: challenge })
            } else {
                Err(ApiError::field(
                    "code_challenge",
                    "must be the base64url (no padding) SHA-256 of the code_verifier: 43 characters",
                ))
            }
        }
    }
}

/// Starts an OAuth sign-in: the URL to send the user to (authorization code with PKCE S256).
///
/// With no body (or `{}`) the sign-in is a browser's: the answer sets the `cairn_oauth` cookie
/// (HttpOnly, SameSite=Lax, ten minutes) holding a hash of the state, and only a callback carrying
/// it is accepted. With `{code_challenge, code_challenge_method: "S256"}` it is a native client's:
/// no cookie, the provider gets the client's challenge, and the callback must carry the client's
/// `code_verifier`.
#[utoipa::path(post, path = "/api/v1/auth/oauth/{provider}/start", tag = "auth",
    params(("provider" = String, Path, description = "a configured provider (google, github, …)", pattern = r"^[a-z0-9_-]{1,64}$")),
    request_body(content = Option<StartBody>, description = "none or {} for a browser; the client's PKCE challenge for a native client"),
    responses((status = 200, description = "authorize_url, state and mode (browser or native)", body = Envelope<OAuthStartData>,
               headers(("Set-Cookie" = String, description = "browser sign-ins: cairn_oauth, HttpOnly, SameSite=Lax, ten minutes"))),
              (status = 400, description = "code_challenge or code_challenge_method missing or malformed"),
              (status = 404, description = "no such provider")))]
async fn start(
    State(state): State<CommandState>,
    ApiPath(provider): ApiPath<String>,
    body: Option<ApiJson<StartBody>>,
) -> Result<Response, ApiError> {
    let mode = start_mode(body.map(|ApiJson(b)| b).unwrap_or_default())?;
    let started = state.oauth.start(&provider, mode).await?;
    let mode = if started.browser_binding.is_some() { "browser" } else { "native" };
    let cookie = started.browser_binding.as_deref().map(|binding| state.cookie.set_oauth(binding, STATE_TTL_SECS));
    let data = json!({ "authorize_url": started.authorize_url, "state": started.state, "mode": mode });
    Ok(with_cookie(ApiResponse::ok(data), cookie))
}

/// `POST /api/v1/auth/oauth/{provider}/callback` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallbackBody {
    /// The `code` the provider returned.
    code: String,
    /// The `state` the provider returned.
    state: String,
    /// Native clients: the PKCE verifier whose challenge started the sign-in.
    #[schema(pattern = "^[A-Za-z0-9._~-]{43,128}$", min_length = 43, max_length = 128)]
    code_verifier: Option<String>,
    /// Native clients: return the refresh token in the body instead of a cookie.
    #[serde(default)]
    refresh_token_in_body: bool,
}

impl std::fmt::Debug for CallbackBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackBody")
            .field("refresh_token_in_body", &self.refresh_token_in_body)
            .field("code", &"REDACTED")
            .field("state", &"REDACTED")
            .field("code_verifier", &self.code_verifier.as_ref().map(|_| "REDACTED"))
            .finish()
    }
}

/// RFC 7636: 43 to 128 unreserved characters.
fn check_verifier(verifier: &str) -> Result<(), ApiError> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if (43..=128).contains(&verifier.len()) && verifier.bytes().all(unreserved) {
        Ok(())
    } else {
        Err(ApiError::field("code_verifier", "must be 43 to 128 characters of A-Z, a-z, 0-9, '-', '.', '_' and '~'"))
    }
}

/// Finishes an OAuth sign-in with the `code` and `state` the provider returned, from the client
/// that started it: a browser's sign-in needs the `cairn_oauth` cookie its start set (and clears
/// it), a native client's needs its `code_verifier`. The account with the provider's verified
/// email is signed in; a new address opens a new, verified account. An existing account whose
/// address was never verified loses its password and every session first (PasswordRemoved):
/// whoever set them never proved they own the address.
#[utoipa::path(post, path = "/api/v1/auth/oauth/{provider}/callback", tag = "auth", request_body = CallbackBody,
    params(("provider" = String, Path, description = "a configured provider", pattern = r"^[a-z0-9_-]{1,64}$")),
    responses((status = 200, description = "signed in, as with a password", body = Envelope<SignInData>,
               headers(("Set-Cookie" = String, description = "the refresh cookie (unless refresh_token_in_body); cairn_oauth cleared"))),
              (status = 400, description = "state unknown, spent or expired; code_verifier missing or malformed"),
              (status = 401, description = "started by another browser or client (cookie missing or for another sign-in, code_verifier not matching), or the provider's answer was not accepted, or the account is not active"),
              (status = 403, description = "no verified email"),
              (status = 404, description = "no such provider"),
              (status = 423, description = "account locked")))]
async fn callback(
    State(state): State<CommandState>,
    ctx: RequestContext,
    headers: HeaderMap,
    ApiPath(provider): ApiPath<String>,
    ApiJson(body): ApiJson<CallbackBody>,
) -> Result<Response, ApiError> {
    let cookie = RefreshCookie::read_oauth(&headers);
    let response = match sign_in(&state, ctx, &provider, &body, cookie.as_deref()).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    // The cookie served this sign-in (or none): it is cleared whatever the outcome.
    Ok(with_cookie(response, cookie.is_some().then(|| state.cookie.clear_oauth())))
}

async fn sign_in(
    state: &CommandState,
    ctx: RequestContext,
    provider: &str,
    body: &CallbackBody,
    cookie: Option<&str>,
) -> Result<Response, ApiError> {
    if let Some(verifier) = &body.code_verifier {
        check_verifier(verifier)?;
    }
    let proof = Proof { cookie, code_verifier: body.code_verifier.as_deref() };
    let identity = state.oauth.finish(provider, &body.code, &body.state, proof).await?;
    let email = Email::parse(&identity.email)
        .map_err(|_| ApiError::Forbidden("the provider's email address is not usable".to_owned()))?;
    let users = &state.users;
    let (id, opened) = match users.find_id_by_email(&email).await? {
        Some(id) => (id, false),
        None => {
            // A new account; its password is random and unknown, so only this provider (or a
            // password reset) signs it in.
            let display_name = identity
                .name
                .clone()
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| email.as_str().split('@').next().unwrap_or("user").to_owned());
            let input = RegisterUser {
                email: email.as_str().to_owned(),
                password: random_token()?,
                display_name,
                roles: vec![],
            };
            match users.register(input, &ctx, None).await {
                Ok((id, _)) => (id, true),
                // Registered in the meantime by another request: link to it.
                Err(ApiError::Conflict(_)) => {
                    let id = users.find_id_by_email(&email).await?;
                    (id.ok_or_else(|| ApiError::Conflict("retry".to_owned()))?, false)
                }
                Err(e) => return Err(e),
            }
        }
    };
    let mut account = users.load(id).await?;
    if let Some(secs) = account.locked_for(Utc::now()) {
        return Err(ApiError::AccountLocked { retry_after_s: u64::try_from(secs).unwrap_or(1) });
    }
    if account.status != UserStatus::Active {
        return Err(ApiError::Unauthenticated("account is not active".to_owned()));
    }
    if !account.email_verified {
        // The provider vouches for the address. An account this sign-in just opened has nothing
        // to undo; one someone else registered may carry their password and sessions, which the
        // link removes.
        let command =
            if opened { UserCommand::VerifyEmail } else { UserCommand::LinkProvider { provider: provider.to_owned() } };
        users.execute(id, command, &ctx, Some(id)).await?;
        account = users.load(id).await?;
    }
    let mut ctx = ctx;
    ctx.user_agent = Some(format!("{} (oauth:{provider})", ctx.user_agent.unwrap_or_default()).trim().to_owned());
    complete_sign_in(state, id, &account, &ctx, body.refresh_token_in_body).await
}
