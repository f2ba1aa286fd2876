//! `POST /api/v1/auth/oauth/{provider}/start` and `…/callback`.

use axum::extract::State;
use axum::response::Response;
use cairn_domain::{Email, UserCommand, UserStatus};
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, RequestContext};
use cairn_platform::secrets::random_token;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::OAuth;
use crate::auth::complete_sign_in;
use crate::users::RegisterUser;
use crate::CommandState;

/// The OAuth routes.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new().routes(routes!(start)).routes(routes!(callback))
}

/// Starts an OAuth sign-in: the URL to send the user to (authorization code with PKCE).
#[utoipa::path(post, path = "/api/v1/auth/oauth/{provider}/start", tag = "auth",
    params(("provider" = String, Path, description = "a configured provider (google, github, …)")),
    responses((status = 200, description = "authorize_url and state"), (status = 404, description = "no such provider")))]
async fn start(State(oauth): State<OAuth>, ApiPath(provider): ApiPath<String>) -> Result<ApiResponse<Value>, ApiError> {
    let (authorize_url, state) = oauth.start(&provider).await?;
    Ok(ApiResponse::ok(json!({ "authorize_url": authorize_url, "state": state })))
}

/// `POST /api/v1/auth/oauth/{provider}/callback` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallbackBody {
    code: String,
    state: String,
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
            .finish()
    }
}

/// Finishes an OAuth sign-in with the `code` and `state` the provider returned. The account with
/// the provider's verified email is signed in; a new address opens a new, verified account.
#[utoipa::path(post, path = "/api/v1/auth/oauth/{provider}/callback", tag = "auth", request_body = CallbackBody,
    params(("provider" = String, Path, description = "a configured provider")),
    responses((status = 200, description = "signed in, as with a password"), (status = 400, description = "state unknown, spent or expired"),
              (status = 401, description = "the provider's answer was not accepted"),
              (status = 403, description = "no verified email"), (status = 423, description = "account locked")))]
async fn callback(
    State(state): State<CommandState>,
    ctx: RequestContext,
    ApiPath(provider): ApiPath<String>,
    ApiJson(body): ApiJson<CallbackBody>,
) -> Result<Response, ApiError> {
    let identity = state.oauth.finish(&provider, &body.code, &body.state).await?;
    let email = Email::parse(&identity.email)
        .map_err(|_| ApiError::Forbidden("the provider's email address is not usable".to_owned()))?;
    let users = &state.users;
    let id = match users.find_id_by_email(&email).await? {
        Some(id) => id,
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
                Ok((id, _)) => id,
                // Registered in the meantime by another request: link to it.
                Err(ApiError::Conflict(_)) => {
                    users.find_id_by_email(&email).await?.ok_or_else(|| ApiError::Conflict("retry".to_owned()))?
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
        // The provider vouches for the address.
        users.execute(id, UserCommand::VerifyEmail, &ctx, Some(id)).await?;
        account = users.load(id).await?;
    }
    let mut ctx = ctx;
    ctx.user_agent = Some(format!("{} (oauth:{provider})", ctx.user_agent.unwrap_or_default()).trim().to_owned());
    complete_sign_in(&state, id, &account, &ctx, body.refresh_token_in_body).await
}
